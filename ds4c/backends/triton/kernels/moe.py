"""``moe``: routed experts as two grouped GEMMs over (token, pick) pairs sorted by expert.

Routing (router GEMM, score, top-k or hash table, normalisation) and the shared expert stay in
torch. The ``P = tokens x top_k`` pairs are sorted by expert on the device (``torch.sort`` and
``torch.searchsorted``: no ``bincount``, whose CUDA version reads the maximum back to the host),
giving ``segments[e]:segments[e+1]``, the sorted rows of expert ``e``. Then:

1. ``gate_up``: a program owns ``block_m`` sorted rows of one expert and ``block_n`` columns of
   each half of ``gate_up[e]`` (rows ``[gate; up]``); it gathers the tokens' hidden rows, runs both
   GEMMs against the same A tile and writes ``silu(min(g, L)) * clamp(u, -L, L)`` (x's dtype);
2. ``down``: the same row blocks times ``down[e]ᵀ``; the epilogue scales by the routing weight
   and writes the fp32 row of the pair at its original index ``t * top_k + j``. The sum over
   the k picks is then one deterministic torch reduction (the reference's order, no atomics).

A program learns its expert from the segments alone: with ``blocks_e = ceil(rows_e / block_m)``,
M-block ``b`` belongs to the expert whose cumulative block range holds it. The grid is the
static worst case, ``floor((P - m) / block_m) + m`` M-blocks with ``m = min(P, experts)``, and
programs past the last block return at once — so each expert's weight tile is read once per
M-block (once per expert in decode, where an expert holds a few tokens), only experts with
tokens are read, and nothing synchronises with the host: a decode step can be captured whole
in a CUDA graph.

``moe.packed`` (the kernel backends' form of ``moe`` over packed weights, see
the lowering pass ``ds4c.passes.lower_packed_weights``) runs the same kernels on FP8, INT8 or MXFP4
expert weights as stored: a tile is loaded in its storage type and converted in registers, each K
step's partial product is scaled by its 128x128 block's scale (FP8; K tiles never straddle a
block), or the accumulator by the row scales (INT8); MXFP4's e2m1 nibbles are decoded and scaled
by their 32-input UE8M0 scales in the tile (weight-only dequantisation: sm_90a has no FP4 tensor
cores). The shared expert goes through ``linear.packed``.

Routing runs as one kernel after the router GEMM (``_route_kernel``: score, top-k by argmax or
the hash table, normalisation, each step rounded to x's dtype where torch rounds). Decode (up to
``MoeDecodeConfig.max_pairs`` pairs) skips the sort: the picked experts rarely repeat, so a GEMV
program per (pair, column block) reads its expert's rows directly, the shared expert rides along
as one more "pair" per token,
the (tensor-core) down GEMV writes each pair's weighted row, and a last kernel sums a token's
rows with the reference's roundings. A decode MoE is then five kernels: router GEMM, routing,
gate_up, down, combine (against about thirty with torch routing, sorting and shared expert).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.act_quant import FP8_SCALE_BLOCK, activation
from ds4c.backends.triton.kernels.attention import dot_operand, interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import (
    KernelContext,
    Launch,
    MoeConfig,
    MoeDecodeConfig,
    dot_precision,
    moe_config,
    moe_decode_config,
)
from ds4c.backends.triton.kernels.linear import (
    _MODES,
    BLOCK_F32,
    BLOCK_UE8M0,
    MXFP4,
    block_scale,
    linear_packed,
    mxfp4_tile,
    pipeline_stages,
    row_dot,
    storage_to_dot,
)
from ds4c.backends.triton.kernels.pdl import wait_for_producers
from ds4c.ir.registry import get_op
from ds4c.ops.moe import _route, _shared
from ds4c.ops.quant import packed_operand_count
from ds4c.quant.activations import ACTIVATION_BLOCKS
from ds4c.quant.formats import FP8_BLOCK, MX_BLOCK

__all__ = ["MoeConfig", "MoeDecodeConfig", "moe", "moe_config", "moe_decode_config"]


@triton.jit
def _expert_rows(seg_ptr, n_experts, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row, live) of M-block ``pid_m`` from the segment offsets."""
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < n_experts
    lo = tl.load(seg_ptr + e_idx, mask=e_ok, other=0)
    hi = tl.load(seg_ptr + e_idx + 1, mask=e_ok, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    total = tl.sum(blocks, 0)
    # experts whose blocks all come before pid_m; padded lanes end at `total` > pid_m when live
    expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
    mine = e_idx == expert
    first_block = tl.sum(tl.where(mine, ends - blocks, 0), 0)
    row0 = tl.sum(tl.where(mine, lo, 0), 0) + (pid_m - first_block) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row0, row_end, pid_m < total


@triton.jit
def _block_scale(s_ptr, expert, rows, cols_total, out_rows, k0, row_ok, SCALE: tl.constexpr):
    """The 128x128-block scales of weight rows ``out_rows`` at input ``k0`` of one expert's
    [rows, cols_total] matrix (fp32, or UE8M0 exponent bytes when SCALE == 2)."""
    s_cols = (cols_total + FP8_SCALE_BLOCK - 1) // FP8_SCALE_BLOCK
    base = s_ptr + expert.to(tl.int64) * ((rows + FP8_SCALE_BLOCK - 1) // FP8_SCALE_BLOCK) * s_cols
    return block_scale(base, out_rows, row_ok, s_cols, k0, SCALE)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, order_ptr, seg_ptr, h_ptr,
                    n_experts, top_k, inter, hidden, limit, w_expert, s_expert,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                    EVEN_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                    INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end, live = _expert_rows(seg_ptr, n_experts, pid_m, BLOCK_M, BLOCK_E)
    if not live:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    token = tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + token.to(tl.int64)[:, None] * hidden + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * w_expert
    # [BLOCK_K, BLOCK_N] views of the gate rows `cols` and the up rows `inter + cols`
    g_ptrs = w_base + cols.to(tl.int64)[None, :] * hidden + offs_k[:, None]
    u_ptrs = g_ptrs + inter * hidden
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if SCALE == 4:  # MXFP4: decoded and scaled in registers
            k_ok = (k0 + offs_k) < hidden
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            sx_base = s_ptr + expert.to(tl.int64) * s_expert
            wmask = k_ok[:, None] & col_ok[None, :]
            wg = mxfp4_tile(w_base, sx_base, cols.to(tl.int64), k0 + offs_k, wmask, hidden)
            wu = mxfp4_tile(w_base, sx_base, (inter + cols).to(tl.int64), k0 + offs_k, wmask, hidden)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < hidden
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = dot_operand(a, INTERPRETER_BF16)
        wg = storage_to_dot(wg, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        wu = storage_to_dot(wu, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        if SCALE == 1 or SCALE == 2:  # one scale per 128x128 block: scale each K step's partials
            sg = _block_scale(s_ptr, expert, 2 * inter, hidden, cols, k0, col_ok, SCALE)
            su = _block_scale(s_ptr, expert, 2 * inter, hidden, inter + cols, k0, col_ok, SCALE)
            acc_g += tl.dot(a, wg, input_precision=PRECISION) * sg[None, :]
            acc_u += tl.dot(a, wu, input_precision=PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    if SCALE == 3:  # one scale per output row
        s_base = s_ptr + expert.to(tl.int64) * (2 * inter)
        acc_g = acc_g * tl.load(s_base + cols, mask=col_ok, other=0.0)[None, :]
        acc_u = acc_u * tl.load(s_base + inter + cols, mask=col_ok, other=0.0)[None, :]
    g = tl.minimum(acc_g, limit)
    u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(h_ptrs, round_to(h, h_ptr.dtype.element_ty, INTERPRETER_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, order_ptr, seg_ptr, weight_ptr, y_ptr,
                 n_experts, inter, hidden, w_expert, s_expert,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                 EVEN_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                 INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end, live = _expert_rows(seg_ptr, n_experts, pid_m, BLOCK_M, BLOCK_E)
    if not live:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * inter + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * w_expert + cols.to(tl.int64)[None, :] * inter + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if SCALE == 4:  # MXFP4: decoded and scaled in registers
            k_ok = (k0 + offs_k) < inter
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = mxfp4_tile(w_ptr + expert.to(tl.int64) * w_expert, s_ptr + expert.to(tl.int64) * s_expert,
                           cols.to(tl.int64), k0 + offs_k, k_ok[:, None] & col_ok[None, :], inter)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < inter
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = dot_operand(a, INTERPRETER_BF16)
        w = storage_to_dot(w, h_ptr.dtype.element_ty, INTERPRETER_BF16)
        if SCALE == 1 or SCALE == 2:
            sw = _block_scale(s_ptr, expert, hidden, inter, cols, k0, col_ok, SCALE)
            acc += tl.dot(a, w, input_precision=PRECISION) * sw[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SCALE == 3:
        acc = acc * tl.load(s_ptr + expert.to(tl.int64) * hidden + cols, mask=col_ok, other=0.0)[None, :]
    pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
    scale = tl.load(weight_ptr + pair, mask=row_ok, other=0.0)
    y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(y_ptrs, acc * scale[:, None], mask=row_ok[:, None] & col_ok[None, :])



# -- routing --------------------------------------------------------------------------------------

SCORE_CODES = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}
MAX_ROUTED_EXPERTS = 4096  # one program holds a token's scores


@triton.jit
def _as_dtype(x, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` and back: where torch keeps an intermediate in x's dtype."""
    return round_to(x, dtype, INTERPRETER_BF16).to(tl.float32)


@triton.jit
def _route_kernel(logits_ptr, sel_ptr, ids_ptr, idx_ptr, w_ptr, n_experts, route_scale,
                  TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr, HASH: tl.constexpr,
                  SCORE: tl.constexpr, KEY_ROUND: tl.constexpr, INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    """One token: ``_route``'s scores, picks and normalised weights (int64 picks, fp32 weights)."""
    wait_for_producers(PDL)
    t = tl.program_id(0)
    dt: tl.constexpr = logits_ptr.dtype.element_ty
    e = tl.arange(0, BLOCK_E)
    ok = e < n_experts
    lg = tl.load(logits_ptr + t.to(tl.int64) * n_experts + e, mask=ok, other=0.0).to(tl.float32)
    if SCORE == 0:  # sqrt(softplus): torch's softplus is log1p(exp(x)) below 20, rounded, then sqrt
        ex = tl.exp(lg)
        u = 1.0 + ex
        d = u - 1.0
        log1p = tl.where(d == 0.0, ex, tl.log(u) * tl.div_rn(ex, tl.where(d == 0.0, 1.0, d)))
        sp = _as_dtype(tl.where(lg > 20.0, lg, log1p), dt, INTERPRETER_BF16)
        s = _as_dtype(tl.sqrt_rn(sp), dt, INTERPRETER_BF16)
    elif SCORE == 1:
        s = _as_dtype(tl.div_rn(1.0, 1.0 + tl.exp(-lg)), dt, INTERPRETER_BF16)
    else:
        m = tl.max(tl.where(ok, lg, float("-inf")), 0)
        p = tl.where(ok, tl.exp(lg - m), 0.0)
        s = _as_dtype(tl.div_rn(p, tl.sum(p, 0)), dt, INTERPRETER_BF16)
    kk = tl.arange(0, BLOCK_TOPK)
    picks = tl.zeros([BLOCK_TOPK], dtype=tl.int64)
    w = tl.zeros([BLOCK_TOPK], dtype=tl.float32)
    if HASH:
        tok = tl.load(ids_ptr + t).to(tl.int64)
        picks = tl.load(sel_ptr + tok * TOP_K + kk, mask=kk < TOP_K, other=0).to(tl.int64)
        for j in tl.static_range(TOP_K):
            pj = tl.sum(tl.where(kk == j, picks, 0), 0)
            w = tl.where(kk == j, tl.sum(tl.where(e == pj, s, 0.0), 0), w)
    else:
        key = s + tl.load(sel_ptr + e, mask=ok, other=0.0).to(tl.float32)
        if KEY_ROUND:
            key = _as_dtype(key, dt, INTERPRETER_BF16)
        key = tl.where(ok, key, float("-inf"))
        for j in tl.static_range(TOP_K):
            best = tl.argmax(key, 0)
            picks = tl.where(kk == j, best.to(tl.int64), picks)
            w = tl.where(kk == j, tl.sum(tl.where(e == best, s, 0.0), 0), w)
            key = tl.where(e == best, float("-inf"), key)
    total = _as_dtype(tl.sum(tl.where(kk < TOP_K, w, 0.0), 0), dt, INTERPRETER_BF16)
    total = _as_dtype(total + 1e-20, dt, INTERPRETER_BF16)
    w = _as_dtype(tl.div_rn(w, total + tl.zeros([BLOCK_TOPK], dtype=tl.float32)), dt, INTERPRETER_BF16)
    w = _as_dtype(w * route_scale, dt, INTERPRETER_BF16)
    out = t.to(tl.int64) * TOP_K + kk
    tl.store(idx_ptr + out, picks, mask=kk < TOP_K)
    tl.store(w_ptr + out, w, mask=kk < TOP_K)


def _route_on_device(ctx: KernelContext, x, ids, router, selector, top_k: int, route_scale: float, routing: str, score: str):
    """``_route`` as the router GEMM (torch) plus ``_route_kernel``: (flat x, picks int64 [T, k],
    weights fp32 [T, k]), or None where the kernel does not apply."""
    experts = router.shape[0]
    if router.dtype != x.dtype or experts > MAX_ROUTED_EXPERTS or score not in SCORE_CODES:
        return None
    if routing == "hash" and (selector.dim() != 2 or selector.shape[1] != top_k or selector.is_floating_point()):
        return None
    if routing == "bias" and (selector.dim() != 1 or selector.shape[0] != experts or not selector.is_floating_point()):
        return None
    flat = x.reshape(-1, x.shape[-1])
    tokens = flat.shape[0]
    logits = torch.nn.functional.linear(flat, router).contiguous()
    idx = torch.empty((tokens, top_k), dtype=torch.int64, device=x.device)
    w = torch.empty((tokens, top_k), dtype=torch.float32, device=x.device)
    if tokens:
        key_round = routing == "bias" and torch.promote_types(x.dtype, selector.dtype) == x.dtype != torch.float32
        _route_kernel[(tokens,)](
            logits, selector.contiguous(), ids.reshape(-1).contiguous(), idx, w, experts, float(route_scale),
            TOP_K=top_k, BLOCK_E=triton.next_power_of_2(experts), BLOCK_TOPK=triton.next_power_of_2(top_k),
            HASH=routing == "hash", SCORE=SCORE_CODES[score], KEY_ROUND=key_round,
            INTERPRETER_BF16=interpreter_bf16(x.dtype), **Launch(4).kwargs(ctx))
    return flat, idx, w


# -- decode: one GEMV program per (pair, column block) ----------------------------------------------

@triton.jit
def _row_times_rows(a_ptr, w_base, s_base, row_off, cols, col_ok, k_total, s_cols,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                    INTERPRETER_BF16: tl.constexpr):
    """fp32 [BLOCK_N]: ``a[k_total] . W[row_off + cols, :]`` of one expert's [rows, k_total] matrix
    at ``w_base`` (its scales at ``s_base``: 128x128 blocks of ``s_cols`` per row block, or one per
    row). The row is the first of a 16-row dot tile (tl.dot's minimum; the others are zeros):
    the tensor-core path pipelines the weight tiles, which a multiply-and-sum GEMV measured
    1.3-2.3x slower at streaming them (H100, V4-Flash experts)."""
    offs_m = tl.arange(0, 16)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (row_off + cols).to(tl.int64)
    first = offs_m[:, None] == 0
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_total, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_total
        a = tl.load(a_ptr + offs_m[:, None] * 0 + k[None, :], mask=first & k_ok[None, :], other=0.0)
        if SCALE == 4:  # MXFP4: decoded and scaled in registers
            w = mxfp4_tile(w_base, s_base, rows, k, k_ok[:, None] & col_ok[None, :], k_total)
        else:
            w = tl.load(w_base + rows[None, :] * k_total + k[:, None], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
        a = dot_operand(a, INTERPRETER_BF16)
        w = storage_to_dot(w, a_ptr.dtype.element_ty, INTERPRETER_BF16)
        if SCALE == 1 or SCALE == 2:  # the K step stays in one 128-wide scale block
            acc += tl.dot(a, w, input_precision=PRECISION) * block_scale(s_base, rows, col_ok, s_cols, k0, SCALE)[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if SCALE == 3:
        acc = acc * tl.load(s_base + rows, mask=col_ok, other=0.0)[None, :]
    return tl.sum(acc, 0)


@triton.jit
def _pair_operands(routed, idx_ptr, pid, w_ptr, w_expert, s_ptr, s_expert, shared_w_ptr, shared_s_ptr):
    """(weight, scale) base pointers of program ``pid``'s matrix: its expert's (``routed``: the
    pair's expert id read from ``idx_ptr``) or the shared expert's. Selected with ``tl.where``, not
    an if/else: triton 3.6's ROCm pointer canonicalisation (TritonAMDGPUCanonicalizePointers) fails
    on an ``scf.if`` that yields pointers of different bases (measured: gfx942, both pairs kernels)."""
    expert = tl.load(idx_ptr + pid, mask=routed, other=0).to(tl.int64)
    w_base = tl.where(routed, w_ptr + expert * w_expert, shared_w_ptr)
    s_base = tl.where(routed, s_ptr + expert * s_expert, shared_s_ptr)
    return w_base, s_base


@triton.jit
def _gate_up_pairs_kernel(x_ptr, w_ptr, s_ptr, idx_ptr, sg_ptr, sgs_ptr, su_ptr, sus_ptr, h_ptr,
                          pairs, top_k, inter, hidden, s_cols, w_expert, s_expert, limit,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                          ROW: tl.constexpr, ACT_FP8: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
                          PDL: tl.constexpr, STAGES: tl.constexpr = 1, ROW_SUMS: tl.constexpr = False,
                          PAIRED: tl.constexpr = False):
    """Program (p, n): row p of h. p < pairs: pair p (its token, its expert's gate and up rows);
    p >= pairs: the shared expert of token p - pairs. ROW: FP8 weights on the CUDA cores;
    ACT_FP8 (with ROW): the token's row quantised to e4m3 per 128 inputs in registers first.
    STAGES, ROW_SUMS (with ROW): row_dot's loop form; PAIRED (with ROW): gate and up rows
    interleaved in one tile per K step (one loop), else a loop for each."""
    wait_for_producers(PDL)
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    # Selected without branches: ROCm's pointer canonicalisation (triton 3.6) fails on an if/else
    # that yields pointers (see _pair_operands).
    routed = pid < pairs
    token = tl.where(routed, pid // top_k, pid - pairs)
    g_base, gs_base = _pair_operands(routed, idx_ptr, pid, w_ptr, w_expert, s_ptr, s_expert, sg_ptr, sgs_ptr)
    u_base = tl.where(routed, g_base, su_ptr)
    us_base = tl.where(routed, gs_base, sus_ptr)
    u_off = tl.where(routed, inter, 0)
    a_ptr = x_ptr + token.to(tl.int64) * hidden
    if ROW and PAIRED:  # gate and up rows interleaved in one [2 * BLOCK_N, 128] tile per step
        r = tl.arange(0, 2 * BLOCK_N)
        c = tl.program_id(1) * BLOCK_N + r // 2
        up = (r % 2) == 1
        rows = tl.where(up, u_off + c, c).to(tl.int64)
        w_rows = tl.where(up, u_base, g_base) + rows * hidden
        s_rows = tl.where(up, us_base, gs_base) + (rows // FP8_SCALE_BLOCK) * s_cols
        gu = row_dot(a_ptr, w_rows, s_rows, c < inter, 0, hidden, 2 * BLOCK_N, BLOCK_K, SCALE, ACT_FP8, STAGES,
                     ROW_SUMS)
        g, u = tl.split(tl.reshape(gu, [BLOCK_N, 2]))
    elif ROW:
        rows = cols.to(tl.int64)
        g = row_dot(a_ptr, g_base + rows * hidden, gs_base + (rows // FP8_SCALE_BLOCK) * s_cols, col_ok, 0, hidden, BLOCK_N,
                    BLOCK_K, SCALE, ACT_FP8, STAGES, ROW_SUMS)
        rows = rows + u_off
        u = row_dot(a_ptr, u_base + rows * hidden, us_base + (rows // FP8_SCALE_BLOCK) * s_cols, col_ok, 0, hidden, BLOCK_N,
                    BLOCK_K, SCALE, ACT_FP8, STAGES, ROW_SUMS)
    else:
        g = _row_times_rows(a_ptr, g_base, gs_base, 0, cols, col_ok, hidden, s_cols, BLOCK_N, BLOCK_K, SCALE,
                            PRECISION, INTERPRETER_BF16)
        u = _row_times_rows(a_ptr, u_base, us_base, u_off, cols, col_ok, hidden, s_cols, BLOCK_N, BLOCK_K, SCALE,
                            PRECISION, INTERPRETER_BF16)
    g = tl.minimum(g, limit)
    u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + pid.to(tl.int64) * inter + cols, round_to(h, h_ptr.dtype.element_ty, INTERPRETER_BF16),
             mask=col_ok)


@triton.jit
def _down_pairs_kernel(h_ptr, w_ptr, s_ptr, idx_ptr, wt_ptr, sd_ptr, sds_ptr, y_ptr,
                       pairs, inter, hidden, s_cols, w_expert, s_expert,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                       ROW: tl.constexpr, ACT_FP8: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
                       PDL: tl.constexpr, STAGES: tl.constexpr = 1, ROW_SUMS: tl.constexpr = False):
    """Program (p, n): fp32 row p of y: pair p's down projection times its routing weight, or
    (p >= pairs) the shared expert's down projection of token p - pairs. ROW: FP8 weights on the
    CUDA cores; ACT_FP8 (with ROW): h's row quantised to e4m3 in registers first. STAGES,
    ROW_SUMS (with ROW): row_dot's loop form."""
    wait_for_producers(PDL)
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    routed = pid < pairs  # selected without branches, as in _gate_up_pairs_kernel
    w_base, s_base = _pair_operands(routed, idx_ptr, pid, w_ptr, w_expert, s_ptr, s_expert, sd_ptr, sds_ptr)
    weight = tl.load(wt_ptr + pid, mask=routed, other=1.0)
    if ROW:
        rows = cols.to(tl.int64)
        y = row_dot(h_ptr + pid.to(tl.int64) * inter, w_base + rows * inter, s_base + (rows // FP8_SCALE_BLOCK) * s_cols, col_ok,
                    0, inter, BLOCK_N, BLOCK_K, SCALE, ACT_FP8, STAGES, ROW_SUMS)
    else:
        y = _row_times_rows(h_ptr + pid.to(tl.int64) * inter, w_base, s_base, 0, cols, col_ok, inter, s_cols,
                            BLOCK_N, BLOCK_K, SCALE, PRECISION, INTERPRETER_BF16)
    tl.store(y_ptr + pid.to(tl.int64) * hidden + cols, y * weight, mask=col_ok)


@triton.jit
def _combine_kernel(y_ptr, out_ptr, pairs, hidden, TOP_K: tl.constexpr, SHARED: tl.constexpr,
                    BLOCK_N: tl.constexpr, INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    """Program (t, n): token t's routed sum over its picks (fp32, rounded to x's dtype as the
    reference rounds it), plus its shared expert's row (rounded, then the sum rounded)."""
    wait_for_producers(PDL)
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    dt: tl.constexpr = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + j).to(tl.int64) * hidden + cols, mask=col_ok, other=0.0)
    out = _as_dtype(acc, dt, INTERPRETER_BF16)
    if SHARED:
        sh = tl.load(y_ptr + (pairs + t).to(tl.int64) * hidden + cols, mask=col_ok, other=0.0)
        out = out + _as_dtype(sh, dt, INTERPRETER_BF16)
    tl.store(out_ptr + t.to(tl.int64) * hidden + cols, round_to(out, dt, INTERPRETER_BF16), mask=col_ok)


def _scale_arg(weight, scale, mode):
    """(scale tensor for the kernel, scale elements per expert) of a stacked expert weight; the
    weight itself stands in for the unused pointer when it has no scales."""
    if scale is None or mode == 0:
        return weight, 0
    return scale.contiguous(), scale[0].numel()


def _act_roundtrip(ctx: KernelContext, t: torch.Tensor, act: str | None) -> torch.Tensor:
    """``t`` as a GEMM multiplying in ``act`` sees it, in t's dtype (exact): ``quant.activation``'s
    kernel (FP8), else its reference. For the GEMMs that do not quantise their input in registers;
    None: ``t``."""
    if act is None:
        return t
    block = ACTIVATION_BLOCKS[act]
    y = activation(ctx, t, format=act, block=block)
    return get_op("quant.activation").reference(t, format=act, block=block) if y is NotImplemented else y


def _decode_pairs(ctx: KernelContext, x, flat, idx, w, gate_up, down, shared, cfg: MoeDecodeConfig, swiglu_limit: float,
                  act: str | None = None):
    """The decode path: (output in x's dtype [T, D], whether the shared expert is in it). ``act``:
    the experts' activation format (the shared expert's too when it rides along)."""
    (gate_up, gu_scale, gu_mode), (down, dn_scale, dn_mode) = gate_up, down
    tokens, hidden = flat.shape
    top_k = idx.shape[1]
    inter = down.shape[2] * (2 if dn_mode == MXFP4 else 1)
    pairs = tokens * top_k
    with_shared = shared is not None
    if with_shared:
        (sg, sgs), (su, sus), (sd, sds) = shared
    else:  # unused pointers of the right types
        sg, sgs, su, sus, sd, sds = gate_up, gu_scale, gate_up, gu_scale, down, dn_scale
    gu_s, gu_se = _scale_arg(gate_up, gu_scale, gu_mode)
    dn_s, dn_se = _scale_arg(down, dn_scale, dn_mode)
    sgs = sg if gu_mode == 0 or sgs is None else sgs.contiguous()
    sus = su if gu_mode == 0 or sus is None else sus.contiguous()
    sds = sd if dn_mode == 0 or sds is None else sds.contiguous()
    target = ctx.target
    rows = pairs + (tokens if with_shared else 0)
    h = torch.empty((rows, inter), dtype=x.dtype, device=x.device)
    common = dict(PRECISION=dot_precision(x.dtype, target), INTERPRETER_BF16=interpreter_bf16(x.dtype))
    # FP8 weights (one scale per 128x128 block) on the CUDA cores, the rest on the tensor cores
    gu_row = cfg.fp8_rows and gu_mode in (BLOCK_F32, BLOCK_UE8M0)
    dn_row = cfg.fp8_rows and dn_mode in (BLOCK_F32, BLOCK_UE8M0)
    block_up = cfg.row_block_n_up if gu_row else cfg.block_n_up
    # FP8 activations quantised in the row kernels' registers, or beforehand (once per GEMV input)
    gu_act = act == "fp8" and gu_row and bool(cfg.act_in_registers)
    rows_kw = dict(STAGES=pipeline_stages(cfg.row_pipeline), ROW_SUMS=bool(cfg.row_sums))
    _gate_up_pairs_kernel[(rows, triton.cdiv(inter, block_up))](
        flat if gu_act else _act_roundtrip(ctx, flat, act), gate_up, gu_s, idx, sg.contiguous(), sgs, su.contiguous(), sus, h, pairs, top_k, inter, hidden,
        triton.cdiv(hidden, FP8_BLOCK), gate_up[0].numel(), gu_se, float(swiglu_limit), BLOCK_N=block_up,
        BLOCK_K=FP8_BLOCK if gu_row else cfg.block_k, SCALE=gu_mode, ROW=gu_row, ACT_FP8=gu_act,
        **(rows_kw if gu_row else {}),
        PAIRED=gu_row and bool(cfg.row_paired), **(cfg.row_launch if gu_row else cfg.launch).kwargs(ctx), **common)
    y = torch.empty((rows, hidden), dtype=torch.float32, device=x.device)
    block_down = cfg.row_block_n_down if dn_row else cfg.block_n_down
    dn_act = act == "fp8" and dn_row and bool(cfg.act_in_registers)
    _down_pairs_kernel[(rows, triton.cdiv(hidden, block_down))](
        h if dn_act else _act_roundtrip(ctx, h, act), down, dn_s, idx, w, sd.contiguous(), sds, y, pairs, inter, hidden, triton.cdiv(inter, FP8_BLOCK),
        down[0].numel(), dn_se, BLOCK_N=block_down, BLOCK_K=FP8_BLOCK if dn_row else cfg.block_k, SCALE=dn_mode, ROW=dn_row,
        ACT_FP8=dn_act, **(rows_kw if dn_row else {}), **(cfg.row_launch if dn_row else cfg.launch).kwargs(ctx), **common)
    out = result_buffer(0, (tokens, hidden), x.dtype, x.device)
    _combine_kernel[(tokens, triton.cdiv(hidden, 1024))](
        y, out, pairs, hidden, TOP_K=top_k, SHARED=with_shared, BLOCK_N=1024,
        INTERPRETER_BF16=interpreter_bf16(x.dtype), **Launch(4).kwargs(ctx))
    return out, with_shared

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@register_kernel("moe")
def moe(ctx: KernelContext, x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int, route_scale: float,
        swiglu_limit: float, routing: str, score: str, act: str | None = None, shared_act: str | None = None,
        expert_offset: int = 0, shared: bool = True):
    """Launcher with ``moe_reference``'s signature; declines dtypes other than fp32/bf16/fp16,
    expert weights of another dtype than x, and shapes that do not form [E, 2I, D] / [E, D, I].
    Activation formats (expert weights expanded at load) quantise the GEMMs' inputs first.
    One rank's slice of the experts (``shard_experts``: ``expert_offset``, ``shared=False``) runs
    the same kernels on its experts' picks."""
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        return NotImplemented
    with_shared = None
    if shared and {s_gate.dtype, s_up.dtype, s_down.dtype} == {x.dtype} and shared_act == act:
        with_shared = ((s_gate, None), (s_up, None), (s_down, None))
    routed = _routed(ctx, x, ids, router, selector, (gate_up, None, 0), (down, None, 0), with_shared, top_k=top_k,
                     route_scale=route_scale, swiglu_limit=swiglu_limit, routing=routing, score=score, act=act,
                     expert_offset=expert_offset)
    if routed is NotImplemented:
        return NotImplemented
    out, added = routed
    return out if added or not shared else out + _shared(x, s_gate, s_up, s_down, swiglu_limit, act=shared_act)


@register_kernel("moe.packed")
def moe_packed(ctx: KernelContext, x, ids, router, selector, *packed, formats: list[str], shapes: list[list[int]], top_k: int,
               route_scale: float, swiglu_limit: float, routing: str, score: str, act: str | None = None,
               shared_act: str | None = None, expert_offset: int = 0, shared: bool = True):
    """``moe.packed``: the routed experts' GEMMs read FP8 (128x128 block scales) or INT8 (row
    scales) expert weights as stored; the shared expert joins the decode kernels when its weights
    have the routed experts' format (and activation format), else goes through
    ``linear.packed``'s GEMV (its reference, dequantise + cuBLAS, for many tokens). FP8
    activations (``act``): each GEMM's input is quantised once by the FP8 quantiser kernel first
    (the decode row kernels can quantise in registers instead: ``moe_decode.act_in_registers``).
    Declines other formats. One rank's slice of the experts (``expert_offset``, ``shared=False``)
    runs the same kernels on its experts' picks."""
    if any(f not in _MODES and f != "none" for f in formats):
        return NotImplemented
    weights, i = [], 0
    for fmt, shape in zip(formats, shapes, strict=True):  # (tensors, scale mode, format, shape) per weight
        n = packed_operand_count([fmt], [shape])
        weights.append((packed[i:i + n], _MODES.get(fmt, 0), fmt, shape))
        i += n
    (gu, gu_mode, _, _), (dn, dn_mode, _, _) = weights[:2]
    if gu_mode == 0 and gu[0].dtype != x.dtype or dn_mode == 0 and dn[0].dtype != x.dtype:
        return NotImplemented
    with_shared = None
    sg, su, sd = weights[2:]
    if shared and sg[1] == su[1] == gu_mode and sd[1] == dn_mode and sg[0][0].dtype == su[0][0].dtype == gu[0].dtype \
            and sd[0][0].dtype == dn[0].dtype and shared_act == act:
        with_shared = tuple((w[0][0], w[0][1] if len(w[0]) > 1 else None) for w in (sg, su, sd))
    routed = _routed(ctx, x, ids, router, selector, (gu[0], gu[1] if len(gu) > 1 else None, gu_mode),
                     (dn[0], dn[1] if len(dn) > 1 else None, dn_mode), with_shared, top_k=top_k,
                     route_scale=route_scale, swiglu_limit=swiglu_limit, routing=routing, score=score, act=act,
                     expert_offset=expert_offset)
    if routed is NotImplemented:
        return NotImplemented
    out, added = routed
    if added or not shared:
        return out

    def linear(h, w, act):  # the shared expert's weights: linear.packed's kernel, else its reference
        tensors, _, fmt, shape = w
        if fmt == "none":
            return torch.nn.functional.linear(_act_roundtrip(ctx, h, act), tensors[0])
        y = linear_packed(ctx, h, *tensors, format=fmt, shape=shape, act=act)
        if y is NotImplemented:
            return get_op("linear.packed").reference(h, *tensors, format=fmt, shape=shape, act=act)
        return y

    return out + _shared(x, *weights[2:], swiglu_limit, linear=linear, act=shared_act)


def _routed(ctx: KernelContext, x, ids, router, selector, gate_up, down, shared, *, top_k: int, route_scale: float, swiglu_limit: float,
            routing: str, score: str, act: str | None = None, expert_offset: int = 0):
    """(routed experts' sum [+ the shared expert] in x's dtype and shape, whether the shared
    expert is included). ``gate_up`` / ``down`` may hold one rank's experts (``expert_offset``
    ..): the others' picks get weight 0 (decode: computed against a held expert, so every index
    is in range; grouped GEMMs: sorted past the last segment, never computed). ``gate_up`` / ``down`` are (weight in its storage type, scale or None,
    scale mode of ``linear.SCALE``); ``shared``: ((weight, scale or None),) x 3 in those modes,
    or None to leave the shared expert to the caller; ``act``: the activation format of the
    experts' GEMMs (x before gate/up, h before down)."""
    (gate_up, gu_scale, gu_mode), (down, dn_scale, dn_mode) = gate_up, down
    if x.dtype not in _DTYPES:
        return NotImplemented
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
        return NotImplemented
    experts, two_inter, hidden = gate_up.shape
    hidden *= 2 if gu_mode == MXFP4 else 1  # MXFP4 stores two inputs per byte
    inter = two_inter // 2
    stored_inter = inter // 2 if dn_mode == MXFP4 else inter
    if hidden != x.shape[-1] or tuple(down.shape) != (experts, hidden, stored_inter) \
            or not 0 < top_k <= router.shape[0] or expert_offset + experts > router.shape[0]:
        return NotImplemented
    if (gu_mode == MXFP4 and (hidden % MX_BLOCK or gu_scale is None)) or \
            (dn_mode == MXFP4 and (inter % MX_BLOCK or dn_scale is None)):
        return NotImplemented
    if not (x.device == gate_up.device == down.device):
        return NotImplemented
    gu_in = hidden // 2 if gu_mode == MXFP4 else hidden
    if shared is not None and (tuple(shared[0][0].shape) != (inter, gu_in) or tuple(shared[1][0].shape) != (inter, gu_in)
                               or tuple(shared[2][0].shape) != (hidden, stored_inter)):
        shared = None  # a shared expert of another width than the routed ones: the caller adds it

    target = ctx.target
    routing_out = _route_on_device(ctx, x, ids, router, selector, top_k, route_scale, routing, score)
    if routing_out is None:
        flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
        w = w.to(torch.float32)
    else:
        flat, idx, w = routing_out
    if idx.shape[-1] != top_k:  # a hash table of another width than top_k
        return NotImplemented
    sharded = expert_offset or experts != router.shape[0]
    if sharded:  # one rank's experts: the other ranks' picks weigh 0 here
        local = idx - expert_offset
        mine = (local >= 0) & (local < experts)
        w = w * mine
        idx = local.clamp(0, experts - 1)
        beyond = torch.where(mine, local, experts)  # grouped GEMMs: past the last expert's segment
    tokens = flat.shape[0]
    pairs = tokens * top_k
    blocked = gu_mode in (BLOCK_F32, BLOCK_UE8M0) or dn_mode in (BLOCK_F32, BLOCK_UE8M0)
    dcfg = moe_decode_config(x.dtype, ctx)
    if 0 < pairs <= dcfg.max_pairs and not (blocked and FP8_BLOCK % dcfg.block_k):
        out, with_shared = _decode_pairs(ctx, x, flat.contiguous(), idx.contiguous(), w.contiguous(),
                                         (gate_up.contiguous(), gu_scale, gu_mode),
                                         (down.contiguous(), dn_scale, dn_mode), shared, dcfg, swiglu_limit, act)
        return out.view(x.shape), with_shared

    cfg = moe_config(pairs, experts, x.dtype, target, ctx.tuned("moe_prefill"))
    if blocked and FP8_BLOCK % cfg.block_k:
        return NotImplemented
    routed = torch.zeros((tokens, hidden), dtype=torch.float32, device=x.device)
    if pairs > 0:
        flat = flat.contiguous()
        gate_up, down = gate_up.contiguous(), down.contiguous()
        gu_scale = gate_up if gu_scale is None else gu_scale.contiguous()
        dn_scale = down if dn_scale is None else dn_scale.contiguous()
        sorted_experts, order = torch.sort((beyond if sharded else idx).reshape(-1), stable=True)
        segments = torch.searchsorted(sorted_experts, torch.arange(experts + 1, device=x.device,
                                                                   dtype=sorted_experts.dtype))
        weights = w.reshape(-1).contiguous()

        m = min(pairs, experts)
        m_blocks = (pairs - m) // cfg.block_m + m
        common = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_E=triton.next_power_of_2(experts),
                      PRECISION=dot_precision(x.dtype, target), INTERPRETER_BF16=interpreter_bf16(x.dtype),
                      **cfg.launch.kwargs(ctx))
        h = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
        _gate_up_kernel[(m_blocks, triton.cdiv(inter, cfg.block_n_up))](
            _act_roundtrip(ctx, flat, act), gate_up, gu_scale, order, segments, h, experts, top_k, inter, hidden, float(swiglu_limit),
            gate_up[0].numel(), gu_scale[0].numel() if gu_mode == MXFP4 else 0, BLOCK_N=cfg.block_n_up, EVEN_K=hidden % cfg.block_k == 0, SCALE=gu_mode, **common)
        # (pairs no segment holds, other ranks' picks, are never written: zeros)
        y = (torch.zeros if sharded else torch.empty)((pairs, hidden), dtype=torch.float32, device=x.device)
        _down_kernel[(m_blocks, triton.cdiv(hidden, cfg.block_n_down))](
            _act_roundtrip(ctx, h, act), down, dn_scale, order, segments, weights, y, experts, inter, hidden,
            down[0].numel(), dn_scale[0].numel() if dn_mode == MXFP4 else 0, BLOCK_N=cfg.block_n_down, EVEN_K=inter % cfg.block_k == 0, SCALE=dn_mode, **common)
        routed = y.view(tokens, top_k, hidden).sum(dim=1)
    return routed.to(x.dtype).view(x.shape), False
