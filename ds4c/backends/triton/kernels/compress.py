"""``compress`` (gated pooling of a window's slots + RMS norm), ``indexer.topk`` (lightning indexer scores + top-k)
and ``compress.rows`` (a serving step's compressor rows: kv ++ gate + position bias, one program per
``BLOCK_N`` tokens x ``BLOCK_D`` channels, the sum in fp32 rounded once as torch's bf16 add).

``compress``: the slot softmax is per channel, so a program pools one block of channels of one row
(a decode step has one row per sequence: a single program per row left 128 slots x 512 channels
of HCA to one SM, 55 us on an H100). With every slot in one tile it is one pass; otherwise three
passes (per-channel max, sum of exponentials, weighted sum) compute ``softmax(dim=-2)`` exactly;
the weights, products and pooled row are rounded to kv's dtype where the reference rounds them.
The RMS norm of the pooled rows is then the ``rms_norm`` kernel.

``indexer.topk``: the scores ``I[b,t,s] = Σ_h w[b,t,h]·weights_scale·ReLU(q[b,t,h]·keys[b,s])·softmax_scale``
come from a Triton kernel with the indexer heads on the GEMM's M axis (one query, a block of
entries per program); ``indexer.topk.rows`` runs the same kernel reading each key from its pool row
(a serving step's keys through its page tables, no gathered copy; a block of entries with no row
skips its dot products), ``indexer.topk.table`` finds the rows through the page table itself
(no [B, C] list of rows either); ``top_indices`` then picks the k largest (``topk_config``: a bitwise search
for the k-th largest key + one compaction; a bitonic top-k as the tunable alternative).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.attention import dot_operand, interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import (
    TOPK_MAX_ENTRIES,
    KernelContext,
    Launch,
    TopkConfig,
    compress_config,
    dot_precision,
    elementwise_launch,
    index_scores_config,
    topk_config,
)
from ds4c.backends.triton.kernels.norms import rms_norm
from ds4c.backends.triton.kernels.pdl import wait_for_producers
from ds4c.ops.norms import rms_norm_reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _score_tile(score_row, s0, offs_s, offs_d, d_ok, SLOTS, ssc_s, ssc_d):
    """(mask, fp32 scores) of slots ``s0 + offs_s`` x channels ``offs_d``; -inf where masked."""
    ok = ((s0 + offs_s) < SLOTS)[:, None] & d_ok[None, :]
    sc = tl.load(score_row + (s0 + offs_s)[:, None] * ssc_s + offs_d[None, :] * ssc_d, mask=ok,
                 other=float("-inf")).to(tl.float32)
    return ok, sc


@triton.jit
def _pooled_part(kv, e, total, ok, INTERPRETER_BF16: tl.constexpr):
    """Σ_slots kv · (e / total) of one tile, the weights and products rounded to kv's dtype."""
    weight = round_to(e / total[None, :], kv.dtype, INTERPRETER_BF16)
    product = round_to(kv.to(tl.float32) * weight.to(tl.float32), kv.dtype, INTERPRETER_BF16)
    return tl.sum(tl.where(ok, product.to(tl.float32), 0.0), axis=0)


@triton.jit
def _pool_kernel(
    kv_ptr, score_ptr, out_ptr,
    SLOTS, D,
    skv_n, skv_s, skv_d, ssc_n, ssc_s, ssc_d,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, ONE_TILE: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (n, c): pooled channels [c * BLOCK_D, +BLOCK_D) of row n, ``(kv * softmax(score,
    slots)).sum(slots)`` with the weights, products and sum rounded to kv's dtype as the reference
    rounds them. ONE_TILE: every slot in one tile, a single pass; else three passes over the slots."""
    wait_for_producers(PDL)
    n = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_row = kv_ptr + n.to(tl.int64) * skv_n
    score_row = score_ptr + n.to(tl.int64) * ssc_n
    if ONE_TILE:
        ok, sc = _score_tile(score_row, 0, offs_s, offs_d, d_ok, SLOTS, ssc_s, ssc_d)
        m = tl.where(d_ok, tl.max(sc, axis=0), 0.0)  # padding channels: keep their exponentials finite
        e = tl.where(ok, tl.exp(sc - m[None, :]), 0.0)
        total = tl.where(d_ok, tl.sum(e, axis=0), 1.0)
        kv = tl.load(kv_row + offs_s[:, None] * skv_s + offs_d[None, :] * skv_d, mask=ok, other=0.0)
        pooled = _pooled_part(kv, e, total, ok, INTERPRETER_BF16)
    else:
        m = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
        for s0 in range(0, SLOTS, BLOCK_S):
            ok, sc = _score_tile(score_row, s0, offs_s, offs_d, d_ok, SLOTS, ssc_s, ssc_d)
            m = tl.maximum(m, tl.max(sc, axis=0))
        m = tl.where(d_ok, m, 0.0)
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, SLOTS, BLOCK_S):
            ok, sc = _score_tile(score_row, s0, offs_s, offs_d, d_ok, SLOTS, ssc_s, ssc_d)
            total += tl.sum(tl.where(ok, tl.exp(sc - m[None, :]), 0.0), axis=0)
        total = tl.where(d_ok, total, 1.0)
        pooled = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, SLOTS, BLOCK_S):
            ok, sc = _score_tile(score_row, s0, offs_s, offs_d, d_ok, SLOTS, ssc_s, ssc_d)
            kv = tl.load(kv_row + (s0 + offs_s)[:, None] * skv_s + offs_d[None, :] * skv_d, mask=ok, other=0.0)
            pooled += _pooled_part(kv, tl.exp(sc - m[None, :]), total, ok, INTERPRETER_BF16)
    tl.store(out_ptr + n.to(tl.int64) * D + offs_d, round_to(pooled, out_ptr.dtype.element_ty, INTERPRETER_BF16),
             mask=d_ok)


@register_kernel("compress")
def compress(ctx: KernelContext, kv: torch.Tensor, score: torch.Tensor, norm_w: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Launcher with ``compress_reference``'s signature: the pooling kernel, then the ``rms_norm``
    kernel on the pooled rows (the reference's norm, same roundings). Declines a score shaped
    unlike kv (its softmax would run over broadcast slots), a missing norm weight, and dtypes
    other than fp32/bf16/fp16."""
    if norm_w is None or kv.dim() < 2 or score.shape != kv.shape or kv.dtype not in _DTYPES:
        return NotImplemented
    slots, d = kv.shape[-2], kv.shape[-1]
    if norm_w.shape != (d,) or slots == 0:
        return NotImplemented
    kv3 = kv.reshape(-1, slots, d)
    score3 = score.reshape(-1, slots, d)
    pooled = torch.empty((kv3.shape[0], d), dtype=kv.dtype, device=kv.device)
    if pooled.numel() == 0:
        return pooled.view(*kv.shape[:-2], d)
    block_s, block_d, launch = compress_config(slots, d)
    _pool_kernel[(kv3.shape[0], triton.cdiv(d, block_d))](
        kv3, score3, pooled, slots, d,
        kv3.stride(0), kv3.stride(1), kv3.stride(2), score3.stride(0), score3.stride(1), score3.stride(2),
        BLOCK_S=block_s, BLOCK_D=block_d, ONE_TILE=block_s >= slots, INTERPRETER_BF16=interpreter_bf16(kv.dtype),
        **launch.kwargs(ctx),
    )
    out = rms_norm(ctx, pooled, norm_w, eps=eps)
    if out is NotImplemented:
        out = rms_norm_reference(pooled, norm_w, eps)
    return out.view(*kv.shape[:-2], d)


@triton.jit
def _index_scores_kernel(
    q_ptr, k_ptr, rows_ptr, w_ptr, future_ptr, out_ptr,
    H, C, softmax_scale, weights_scale,
    sq_b, sq_s, sq_h, sq_d, sk_b, sk_c, sk_d, sr_b, sr_c, sw_b, sw_s, sw_h, sf_b, sf_s, sf_c,
    table_ptr, seq_ptr, limit_ptr, st0, st1, page, slots,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    PDL: tl.constexpr, TABLE: tl.constexpr = False, HAS_LIMIT: tl.constexpr = False,
):
    wait_for_producers(PDL)
    pid_c = tl.program_id(0)
    t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * (a batch row's elements) passes 2^31 on a serving step's copies
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * sq_b + t * sq_s
    if TABLE:  # entry c of query b: row table[seq[b], (c // page) % slots] * page + c % page, c < limit[b]
        if HAS_LIMIT:
            c_ok = c_ok & (offs_c < tl.load(limit_ptr + b))
        seq = tl.load(seq_ptr + b).to(tl.int64)
        page_id = tl.load(table_ptr + seq * st0 + ((offs_c // page) % slots) * st1, mask=c_ok, other=0).to(tl.int64)
        k_rows = k_ptr + (page_id * page + offs_c % page) * sk_c
    elif ROWS:  # entry c of query b is row rows[b, c] of the pool [M, D]; -1: a zero key
        row = tl.load(rows_ptr + b * sr_b + offs_c * sr_c, mask=c_ok, other=-1).to(tl.int64)
        c_ok = c_ok & (row >= 0)
        k_rows = k_ptr + tl.maximum(row, 0) * sk_c
    else:
        k_rows = k_ptr + b * sk_b + offs_c * sk_c

    index = tl.zeros([BLOCK_C], dtype=tl.float32)
    if tl.max(c_ok.to(tl.int32), 0) > 0:  # a block of zero keys only (past a sequence's entries) scores 0
        for h0 in range(0, H, BLOCK_H):
            h_ok = (h0 + offs_h) < H
            qk = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
            for d0 in tl.static_range(0, D, BLOCK_D):
                d_ok = (d0 + offs_d) < D
                q = tl.load(q_base + (h0 + offs_h)[:, None] * sq_h + (d0 + offs_d)[None, :] * sq_d,
                            mask=h_ok[:, None] & d_ok[None, :], other=0.0)
                k = tl.load(k_rows[:, None] + (d0 + offs_d)[None, :] * sk_d, mask=c_ok[:, None] & d_ok[None, :],
                            other=0.0)
                qk = tl.dot(dot_operand(q, INTERPRETER_BF16), tl.trans(dot_operand(k, INTERPRETER_BF16)), qk,
                            input_precision=PRECISION)
            w = tl.load(w_ptr + b * sw_b + t * sw_s + (h0 + offs_h) * sw_h, mask=h_ok, other=0.0).to(tl.float32)
            index += tl.sum((tl.maximum(qk, 0.0) * softmax_scale) * (w * weights_scale)[:, None], axis=0)
    c_ok = offs_c < C
    future = tl.load(future_ptr + b * sf_b + t * sf_s + offs_c * sf_c, mask=c_ok, other=1)
    index = tl.where(future != 0, float("-inf"), index)
    tl.store(out_ptr + (b * tl.num_programs(1) + t) * C + offs_c, index, mask=c_ok)


def index_scores(ctx: KernelContext, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, future: torch.Tensor,
                 softmax_scale: float, weights_scale: float, rows: torch.Tensor | None = None,
                 table: tuple | None = None) -> torch.Tensor:
    """Masked index scores [B, S, C] in fp32; q [B, S, H, d], keys [B|1, C, d], w [B, S, H],
    future (bool) broadcastable to [B, S, C]. With ``rows`` [B, C] (S = 1), ``keys`` is a pool
    [M, d] and entry c of query b is its row ``rows[b, c]`` (-1: a zero key). With ``table`` =
    (table [R, S], seq [B], limit [B] or None, count, page) (S = 1), ``keys`` is a pool and entry
    c of query b is its row through the page table (``paged.rows``), a zero key from ``limit`` on."""
    b, s, h, d = q.shape
    tab = (keys, keys, keys, 0, 0, 1, 1)  # unused unless TABLE
    if table is not None:
        t, seq, limit, c, page = table
        sk = (0, keys.stride(0), keys.stride(1))
        sr = (0, 0)
        tab = (t, seq, limit if limit is not None else seq, t.stride(0), t.stride(1), page, t.shape[1])
    elif rows is None:
        c = keys.shape[1]
        keys = keys.expand(b, c, d)
        sk = (keys.stride(0), keys.stride(1), keys.stride(2))
        sr = (0, 0)
    else:
        c = rows.shape[1]
        sk = (0, keys.stride(0), keys.stride(1))
        sr = (rows.stride(0), rows.stride(1))
    future = future.view(torch.uint8).expand(b, s, c)  # stride 0 where it broadcasts
    out = torch.empty((b, s, c), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    target = ctx.target
    cfg = index_scores_config(h, d, q.dtype, target)
    _index_scores_kernel[(triton.cdiv(c, cfg.block_c), s, b)](
        q, keys, rows if rows is not None else keys, w, future, out, h, c, float(softmax_scale), float(weights_scale),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), *sk, *sr,
        w.stride(0), w.stride(1), w.stride(2), future.stride(0), future.stride(1), future.stride(2), *tab,
        D=d, BLOCK_H=cfg.block_h, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d, ROWS=rows is not None,
        TABLE=table is not None, HAS_LIMIT=table is not None and table[2] is not None,
        PRECISION=dot_precision(q.dtype, target), INTERPRETER_BF16=interpreter_bf16(q.dtype),
        **cfg.launch.kwargs(ctx),
    )
    return out


def _scores_top_k(ctx: KernelContext, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, future: torch.Tensor,
                  c: int, k: int, softmax_scale: float, weights_scale: float, **addressing):
    """The indexer launchers' common end: declines a future that is not bool and broadcastable to
    [B, S, c]; else the masked scores (``index_scores``, keys addressed by ``addressing``) and their
    top k."""
    b, s = q.shape[:2]
    if future.dtype != torch.bool or future.dim() > 3:
        return NotImplemented
    try:
        if torch.broadcast_shapes(future.shape, (b, s, c)) != (b, s, c):
            return NotImplemented
    except RuntimeError:
        return NotImplemented
    future = future.reshape((1,) * (3 - future.dim()) + tuple(future.shape))
    return top_indices(ctx, index_scores(ctx, q, keys, w, future, softmax_scale, weights_scale, **addressing), k)


@register_kernel("indexer.topk")
def indexer_topk(ctx: KernelContext, q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, future: torch.Tensor, *, k: int,
                 softmax_scale: float, weights_scale: float) -> torch.Tensor:
    """Launcher with ``IndexerTopk.reference``'s signature; declines q that is not [B, S, H, d],
    keys not [B|1, C, d], w not [B, S, H], a non-bool or non-broadcastable future, and q/keys of
    different dtypes."""
    if q.dim() != 4 or keys.dim() != 3 or q.dtype not in _DTYPES or keys.dtype != q.dtype:
        return NotImplemented
    b, s, h, d = q.shape
    c = keys.shape[1]
    if keys.shape[0] not in (1, b) or keys.shape[2] != d or tuple(w.shape) != (b, s, h):
        return NotImplemented
    return _scores_top_k(ctx, q, keys, w, future, c, k, softmax_scale, weights_scale)


@register_kernel("indexer.topk.rows")
def indexer_topk_rows(ctx: KernelContext, q: torch.Tensor, pool: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                      future: torch.Tensor, *, k: int, softmax_scale: float, weights_scale: float) -> torch.Tensor:
    """Launcher with ``IndexerTopkRows.reference``'s signature: the scores kernel reads each key
    from the pool at its row. Declines q that is not [B, 1, H, d], a pool not [M, d] of q's dtype,
    rows not integer [B, C] on q's device, w not [B, 1, H] and a future not bool broadcastable
    to [B, 1, C]."""
    if q.dim() != 4 or q.shape[1] != 1 or q.dtype not in _DTYPES or pool.dim() != 2 or pool.dtype != q.dtype:
        return NotImplemented
    b, s, h, d = q.shape
    if pool.shape[1] != d or rows.dim() != 2 or rows.shape[0] != b or rows.dtype not in (torch.int32, torch.int64) \
            or rows.device != q.device or pool.device != q.device or tuple(w.shape) != (b, s, h):
        return NotImplemented
    return _scores_top_k(ctx, q, pool, w, future, rows.shape[1], k, softmax_scale, weights_scale, rows=rows)


@register_kernel("indexer.topk.table")
def indexer_topk_table(ctx: KernelContext, q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, seq: torch.Tensor,
                       limit: torch.Tensor | None, w: torch.Tensor, future: torch.Tensor, *, k: int, count: int, page: int,
                       softmax_scale: float, weights_scale: float) -> torch.Tensor:
    """Launcher with ``IndexerTopkTable.reference``'s signature: the scores kernel finds each key's
    pool row through the page table. Declines what ``indexer_topk_rows`` declines, a table that is
    not int32/int64 [R, S], and seq / limit that are not contiguous integer vectors [B]."""
    if q.dim() != 4 or q.shape[1] != 1 or q.dtype not in _DTYPES or pool.dim() != 2 or pool.dtype != q.dtype:
        return NotImplemented
    b, s, h, d = q.shape
    vectors = [seq] + ([limit] if limit is not None else [])
    if pool.shape[1] != d or table.dim() != 2 or table.dtype not in (torch.int32, torch.int64) \
            or any(v.dim() != 1 or v.shape[0] != b or v.stride(0) != 1 or v.dtype not in (torch.int32, torch.int64)
                   or v.device != q.device for v in vectors) \
            or table.device != q.device or pool.device != q.device or tuple(w.shape) != (b, s, h):
        return NotImplemented
    return _scores_top_k(ctx, q, pool, w, future, count, k, softmax_scale, weights_scale,
                         table=(table, seq, limit, count, page))


# -- top-k ----------------------------------------------------------------------------------------

@triton.jit
def _topk_kernel(scores_ptr, out_ptr, C, K,
                 N: tl.constexpr, K_POW2: tl.constexpr, PDL: tl.constexpr):
    """The K largest of one row of C fp32 scores, as indices, largest first. Each entry becomes one
    int64 key: the score's bits made order-preserving as a signed int32 in the high word, and
    ``2^31 - 1 - index`` in the low word (ties go to the smaller index); padding sorts last.
    ``tl.topk`` (bitonic top-k over the whole row) then picks the largest keys."""
    wait_for_producers(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    ok = offs < C
    x = tl.load(scores_ptr + row.to(tl.int64) * C + offs, mask=ok, other=float("-inf"))
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (ordered.to(tl.int64) << 32) + (2147483647 - offs).to(tl.int64)
    key = tl.where(ok, key, -9223372036854775807 - 1)
    top = tl.topk(key[None, :], K_POW2)  # [1, K_POW2], largest first
    idx = 2147483647 - (top & 0xFFFFFFFF)
    offs_k = tl.arange(0, K_POW2)[None, :]
    tl.store(out_ptr + row.to(tl.int64) * K + offs_k, idx, mask=offs_k < K)


@triton.jit
def _order_key(x, ok):
    """fp32 scores as order-preserving unsigned 32-bit keys; entries not ``ok`` get 0, below every
    score (-inf included)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int32 order = float order
    return tl.where(ok, (ordered ^ -2147483648).to(tl.uint32, bitcast=True), 0)


@triton.jit
def _take_k_largest(key, K):
    """Which of the 1-D ``key`` are its K largest (ties to the smaller position), and each taken
    one's output slot in position order. The K-th largest key ``t`` is found bit by bit from the
    top (keep a bit when at least K keys are >= the prefix with it set); then every key > t is
    taken, and the first ``K - #(> t)`` keys equal to t; a prefix sum over the taken flags gives
    the slots."""
    t = tl.full((), 0, tl.uint32)
    bit = tl.full((), 2147483648, tl.uint32)
    for _ in range(32):
        cand = t | bit
        n_ge = tl.sum((key >= cand).to(tl.int32), axis=0)
        t = tl.where(n_ge >= K, cand, t)
        bit = bit >> 1
    above = key > t
    tie = key == t
    need = K - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    return take, slot


@triton.jit
def _select_kernel(scores_ptr, out_ptr, C, K, N: tl.constexpr, PDL: tl.constexpr):
    """The K largest of one row of C fp32 scores, as indices in increasing order (a set, not
    ranked; ties go to the smaller index, as in ``_topk_kernel``), the row's keys held in
    registers (``_take_k_largest``). All tensors are 1-D over the row: a [1, N] form let Triton
    give the scans a layout with the whole row in every thread (2 ms for 528 entries on an H200)."""
    wait_for_producers(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    ok = offs < C
    x = tl.load(scores_ptr + row.to(tl.int64) * C + offs, mask=ok, other=float("-inf"))
    take, slot = _take_k_largest(_order_key(x, ok), K)
    tl.store(out_ptr + row.to(tl.int64) * K + slot, offs.to(tl.int64), mask=take)


@triton.jit
def _select_chunk_kernel(src_ptr, src_idx_ptr, key_ptr, idx_ptr, C, K, CHUNK: tl.constexpr, K_POW2: tl.constexpr,
                         FROM_KEYS: tl.constexpr, PDL: tl.constexpr):
    """A stage of a long row's top-k: chunk ``chunk`` of CHUNK entries of row ``row`` keeps its own
    min(K, entries) largest (keys and row indices, in index order) at candidates ``[row, chunk,
    :K]``; the unused slots (only in a partial last chunk, as CHUNK >= K) get key 0 and index 0,
    after every real candidate, so ties never reach them. The row's K largest are among the
    chunks' (each chunk's share of them is its largest under the same order). The entries are
    fp32 scores (their index is their position) or, ``FROM_KEYS``, an earlier stage's candidates
    (int32 keys and the row indices they carry)."""
    wait_for_producers(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = offs < C
    if FROM_KEYS:
        key = tl.load(src_ptr + row.to(tl.int64) * C + offs, mask=ok, other=0).to(tl.uint32, bitcast=True)
        index = tl.load(src_idx_ptr + row.to(tl.int64) * C + offs, mask=ok, other=0)
    else:
        x = tl.load(src_ptr + row.to(tl.int64) * C + offs, mask=ok, other=float("-inf"))
        key = _order_key(x, ok)
        index = offs
    kept = tl.minimum(K, tl.sum(ok.to(tl.int32), axis=0))
    take, slot = _take_k_largest(key, kept)
    base = (row.to(tl.int64) * tl.num_programs(1) + chunk) * K
    tl.store(key_ptr + base + slot, key.to(tl.int32, bitcast=True), mask=take)
    tl.store(idx_ptr + base + slot, index, mask=take)
    rest = tl.arange(0, K_POW2)
    unused = (rest >= kept) & (rest < K)
    tl.store(key_ptr + base + rest, tl.zeros([K_POW2], dtype=tl.int32), mask=unused)
    tl.store(idx_ptr + base + rest, tl.zeros([K_POW2], dtype=tl.int32), mask=unused)


@triton.jit
def _select_candidates_kernel(key_ptr, idx_ptr, out_ptr, M, K, N: tl.constexpr, PDL: tl.constexpr):
    """Last stage: the K largest of a row's M candidate keys (chunk after chunk, each in index
    order: position order is index order), their row indices written in increasing order."""
    wait_for_producers(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    ok = offs < M
    key = tl.load(key_ptr + row.to(tl.int64) * M + offs, mask=ok, other=0).to(tl.uint32, bitcast=True)
    take, slot = _take_k_largest(key, K)
    idx = tl.load(idx_ptr + row.to(tl.int64) * M + offs, mask=take, other=0)
    tl.store(out_ptr + row.to(tl.int64) * K + slot, idx.to(tl.int64), mask=take)


def _chunked_select(ctx: KernelContext, scores: torch.Tensor, out: torch.Tensor, rows: int, k: int,
                    cfg: TopkConfig) -> None:
    """A row too long for one program's registers: chunks of ``cfg.chunk`` entries keep their k
    largest each (one program per chunk); while the candidates are still too many for one
    program (ctx 1M at ratio 4: 64 chunks x 512), chunks of at least 4k of them do it again;
    then one program per row picks the k largest of the last candidates."""
    k_pow2 = triton.next_power_of_2(k)
    src, src_idx, c, chunk = scores, scores, scores.shape[-1], max(cfg.chunk, k_pow2)  # a full chunk fills its k
    while True:
        chunks = triton.cdiv(c, chunk)
        keys = torch.empty((rows, chunks * k), dtype=torch.int32, device=scores.device)
        idx = torch.empty((rows, chunks * k), dtype=torch.int32, device=scores.device)
        _select_chunk_kernel[(rows, chunks)](src, src_idx, keys, idx, c, k, CHUNK=chunk, K_POW2=k_pow2,
                                              FROM_KEYS=src is not scores, **cfg.launch.kwargs(ctx))
        src, src_idx, c = keys, idx, chunks * k
        if triton.next_power_of_2(c) <= TOPK_MAX_ENTRIES:
            break
        chunk = max(chunk, triton.next_power_of_2(4 * k))  # each further stage keeps at most about a quarter
    n = max(16, triton.next_power_of_2(c))
    _select_candidates_kernel[(rows,)](src, src_idx, out, c, k, N=n, **Launch(min(32, max(4, n // 2048))).kwargs(ctx))


def top_indices(ctx: KernelContext, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest of contiguous fp32 scores [..., C] (``scores.topk(k).indices``
    as a set; torch.topk sorts a decode row of 528 entries by radix sort in 2 kernels, 22 us on an
    H200). ``topk_config`` picks the form: the select (one program per row, rows up to
    ``TOPK_MAX_ENTRIES`` entries held in registers) and the chunked select (longer rows: a program
    per chunk, then per row over the chunks' picks) write the indices in index order, the bitonic
    form (a tunable) largest first; among equal scores the smaller index is chosen (torch leaves it
    unspecified). torch.topk itself (largest first) takes rows with k too large to chunk (8k past
    ``TOPK_MAX_ENTRIES``). ``indexer.topk``'s consumers only use the set."""
    c = scores.shape[-1]
    if not 0 < k <= c or not scores.is_contiguous():
        return scores.topk(k, dim=-1).indices
    cfg = topk_config(c, ctx)
    n = max(16, triton.next_power_of_2(c))
    select = cfg.select
    if (select == 0 and not hasattr(tl, "topk")) or (select == 2 and 8 * k > TOPK_MAX_ENTRIES):
        return scores.topk(k, dim=-1).indices  # (chunks of 4k candidates would not fit registers)
    out = result_buffer(0, scores.shape[:-1] + (k,), torch.int64, scores.device)
    rows = out.numel() // k
    if rows:
        launch = cfg.launch.kwargs(ctx)
        if select == 2:
            _chunked_select(ctx, scores, out, rows, k, cfg)
        elif select == 1:
            _select_kernel[(rows,)](scores, out, c, k, N=n, **launch)
        else:
            _topk_kernel[(rows,)](scores, out, c, k, N=n, K_POW2=triton.next_power_of_2(k), **launch)
    return out


@triton.jit
def _compressor_rows_kernel(kv_ptr, gate_ptr, bias_ptr, pos_ptr, out_ptr, n, w, m, skv, sg, sb,
                            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
                            PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, c_ok = t < n, c < 2 * w
    is_gate = c >= w
    cc = tl.where(is_gate, c - w, c)
    t64 = t.to(tl.int64)
    ok = t_ok[:, None] & c_ok[None, :]
    kv = tl.load(kv_ptr + t64[:, None] * skv + cc[None, :], mask=ok & (~is_gate)[None, :], other=0.0)
    g = tl.load(gate_ptr + t64[:, None] * sg + cc[None, :], mask=ok & is_gate[None, :], other=0.0)
    slot = tl.load(pos_ptr + t, mask=t_ok, other=0).to(tl.int64) % m
    b = tl.load(bias_ptr + slot[:, None] * sb + cc[None, :], mask=ok & is_gate[None, :], other=0.0)
    dtype = out_ptr.dtype.element_ty
    gb = round_to(g.to(tl.float32) + b.to(tl.float32), dtype, INTERPRETER_BF16)
    tl.store(out_ptr + t64[:, None] * (2 * w) + c[None, :], tl.where(is_gate[None, :], gb, kv.to(dtype)), mask=ok)


@register_kernel("compress.rows")
def compressor_rows(ctx: KernelContext, kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor,
                    positions: torch.Tensor):
    """Launcher with ``CompressorRows.reference``'s signature; declines operands of different
    dtypes or devices, channels that are not unit-stride, and non-contiguous positions."""
    if kv.dim() != 2 or gate.shape != kv.shape or position_bias.dim() != 2 or position_bias.shape[1] != kv.shape[1] \
            or not (kv.dtype == gate.dtype == position_bias.dtype) or kv.dtype not in _DTYPES \
            or not (kv.device == gate.device == position_bias.device == positions.device) \
            or kv.stride(1) != 1 or gate.stride(1) != 1 or position_bias.stride(1) != 1 \
            or positions.dim() != 1 or positions.stride(0) != 1 or positions.dtype not in (torch.int32, torch.int64):
        return NotImplemented
    n, w = kv.shape
    out = result_buffer(0, (n, 2 * w), kv.dtype, kv.device)
    if n == 0 or w == 0:
        return out
    block_d = min(triton.next_power_of_2(2 * w), 1024)
    block_n = max(1, min(16, 4096 // block_d))
    _compressor_rows_kernel[(triton.cdiv(n, block_n), triton.cdiv(2 * w, block_d))](
        kv, gate, position_bias, positions, out, n, w, position_bias.shape[0], kv.stride(0), gate.stride(0),
        position_bias.stride(0), BLOCK_N=block_n, BLOCK_D=block_d, INTERPRETER_BF16=interpreter_bf16(kv.dtype),
        **elementwise_launch(4).kwargs(ctx))
    return out
