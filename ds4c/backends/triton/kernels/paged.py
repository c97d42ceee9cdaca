"""``paged.rows``, ``paged.gather``, ``paged.window_index``, ``paged.window_gather`` and
``paged.ring_rows`` (``ds4c.ops.paged``): a serving step's page-table addressing in a few
launches instead of some twenty small ATen kernels per attention layer and fifty per compressor.

``paged.rows``: a program owns ``BLOCK_N`` tokens x ``BLOCK_C`` of their ``count`` positions
``q = first[n] + i`` (``paged.rows_at``: ``q = entries[n, i]``), reads the page of each from its sequence's row of the table
(``table[seq[n], (q // page) % S]``, int32 or int64, any strides) and writes
``page_id * page + q % page``, or -1 where ``q < 0`` or ``q >= limit[n]``.

``paged.gather``: a program owns ``BLOCK_K`` rows x ``BLOCK_D`` channels of the output and copies
them from the pool (rows of any stride, unit channel stride), zeros where the row is -1.

``paged.window_index``: a program owns ``BLOCK_E`` candidate rows x their window's ``span`` rows
and derives each row's source (chunk start, ring slot, validity) and the entry's pool row.
``paged.window_gather``: a program owns one candidate x ``BLOCK_S`` window rows x ``BLOCK_D``
output channels and reads each row from the step's rows or the ring (masked loads), the rows of no
source filled (kv 0, gate -inf); for an overlapping compressor (``OVERLAP``) output channel ``c``
of row ``s`` reads source channel ``(c // d) * 2d + (s >= m) * d + c % d`` (``d`` a quarter of
the source row).

``paged.ring_rows``: one program per ``BLOCK_N`` tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.configs import KernelContext, elementwise_launch
from ds4c.backends.triton.kernels.pdl import wait_for_producers


@triton.jit
def _rows_kernel(table_ptr, seq_ptr, first_ptr, limit_ptr, out_ptr, n, count, page, slots, st0, st1,
                 HAS_FIRST: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 PDL: tl.constexpr, ENTRIES: tl.constexpr = False):
    wait_for_producers(PDL)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < n
    mask = t_ok[:, None] & (i < count)[None, :]
    seq = tl.load(seq_ptr + t, mask=t_ok, other=0).to(tl.int64)
    if ENTRIES:  # paged.rows_at: the positions are given, [n, count] (first_ptr)
        q = tl.load(first_ptr + t.to(tl.int64)[:, None] * count + i[None, :], mask=mask, other=-1).to(tl.int64)
    else:
        q = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int64) + i[None, :].to(tl.int64)
    if HAS_FIRST:
        q += tl.load(first_ptr + t, mask=t_ok, other=0).to(tl.int64)[:, None]
    valid = q >= 0
    if HAS_LIMIT:
        valid = valid & (q < tl.load(limit_ptr + t, mask=t_ok, other=0).to(tl.int64)[:, None])
    qc = tl.maximum(q, 0)
    slot = (qc // page) % slots
    page_id = tl.load(table_ptr + seq[:, None] * st0 + slot * st1, mask=mask & valid, other=0).to(tl.int64)
    rows = tl.where(valid, page_id * page + qc % page, -1)
    tl.store(out_ptr + t.to(tl.int64)[:, None] * count + i[None, :], rows, mask=mask)


@triton.jit
def _gather_kernel(pool_ptr, rows_ptr, out_ptr, k, d, sp0,
                   BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j_ok = j < k
    c_ok = c < d
    r = tl.load(rows_ptr + j, mask=j_ok, other=-1).to(tl.int64)
    keep = (r >= 0)[:, None] & c_ok[None, :]
    vals = tl.load(pool_ptr + tl.maximum(r, 0)[:, None] * sp0 + c[None, :], mask=keep & j_ok[:, None], other=0.0)
    tl.store(out_ptr + j.to(tl.int64)[:, None] * d + c[None, :], vals, mask=j_ok[:, None] & c_ok[None, :])


@triton.jit
def _window_index_kernel(emit_ptr, pos_ptr, tseq_ptr, first_ptr, slot_ptr, table_ptr, src_ptr, epos_ptr, at_ptr, e_n,
                         ratio, span, ring_rows, page, slots, st0, st1, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                         PDL: tl.constexpr):
    wait_for_producers(PDL)
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    s = tl.arange(0, BLOCK_S)
    e_ok = e < e_n
    cand = tl.load(emit_ptr + e, mask=e_ok, other=-1).to(tl.int64)
    row = tl.maximum(cand, 0)
    p = tl.load(pos_ptr + row, mask=e_ok, other=0).to(tl.int64)
    valid = (cand >= 0) & ((p + 1) % ratio == 0)
    w = p // ratio
    seq = tl.load(tseq_ptr + row, mask=e_ok, other=0).to(tl.int64)
    first = tl.load(first_ptr + seq, mask=e_ok, other=0).to(tl.int64)
    start = tl.load(pos_ptr + first, mask=e_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + seq, mask=e_ok, other=0).to(tl.int64)
    q = (w * ratio + ratio - span)[:, None] + s[None, :].to(tl.int64)
    ok = (valid[:, None] & (q >= 0)) != 0
    ringed = -2 - (slot[:, None] * ring_rows + tl.maximum(q, 0) % ring_rows)
    src = tl.where(ok & (q >= start[:, None]), first[:, None] + q - start[:, None], tl.where(ok, ringed, -1))
    tl.store(src_ptr + e.to(tl.int64)[:, None] * span + s[None, :], src, mask=e_ok[:, None] & (s < span)[None, :])
    page_id = tl.load(table_ptr + seq * st0 + ((w // page) % slots) * st1, mask=e_ok & valid, other=0).to(tl.int64)
    tl.store(epos_ptr + e, w * ratio, mask=e_ok)
    tl.store(at_ptr + e, tl.where(valid, page_id * page + w % page, 0), mask=e_ok)


@triton.jit
def _window_gather_kernel(rows_ptr, ring_ptr, src_ptr, out_ptr, out_width, out_half, sr0, sg0, span, m,
                          OVERLAP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    e = tl.program_id(0)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    s_ok, c_ok = s < span, c < out_width
    src = tl.load(src_ptr + e.to(tl.int64) * span + s, mask=s_ok, other=-1).to(tl.int64)
    from_rows = src >= 0
    from_ring = src <= -2
    if OVERLAP:  # out_half = d: kv_a ++ kv_b ++ gate_a ++ gate_b, the a halves for s < m
        col = (c // out_half)[None, :] * (2 * out_half) + (s >= m).to(tl.int32)[:, None] * out_half \
            + (c % out_half)[None, :]
    else:
        col = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.int32) + c[None, :]
    a = tl.load(rows_ptr + tl.maximum(src, 0)[:, None] * sr0 + col, mask=from_rows[:, None] & c_ok[None, :],
                other=0.0)
    b = tl.load(ring_ptr + tl.maximum(-2 - src, 0)[:, None] * sg0 + col, mask=from_ring[:, None] & c_ok[None, :],
                other=0.0)
    v = tl.where(from_rows[:, None], a, b)
    v = tl.where((src == -1)[:, None] & (c >= out_half)[None, :], float("-inf"), v)
    tl.store(out_ptr + e.to(tl.int64) * span * out_width + s[:, None] * out_width + c[None, :], v,
             mask=s_ok[:, None] & c_ok[None, :])


@triton.jit
def _ring_rows_kernel(pos_ptr, tseq_ptr, last_ptr, slot_ptr, out_ptr, n, ring_rows, BLOCK_N: tl.constexpr,
                      PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < n
    p = tl.load(pos_ptr + t, mask=t_ok, other=0).to(tl.int64)
    seq = tl.load(tseq_ptr + t, mask=t_ok, other=0).to(tl.int64)
    last = tl.load(last_ptr + seq, mask=t_ok, other=0).to(tl.int64)
    end = tl.load(pos_ptr + last, mask=t_ok, other=0).to(tl.int64) + 1
    slot = tl.load(slot_ptr + seq, mask=t_ok, other=0).to(tl.int64)
    keep = p >= end - ring_rows
    tl.store(out_ptr + t, tl.where(keep, slot, 0) * ring_rows + p % ring_rows, mask=t_ok)


def _vectors(*ts: torch.Tensor) -> bool:
    """Integer vectors, contiguous, on one device."""
    return all(t.dim() == 1 and t.stride(0) == 1 and t.dtype in (torch.int32, torch.int64) and t.device == ts[0].device
               for t in ts)


@register_kernel("paged.window_index")
def paged_window_index(ctx: KernelContext, emit: torch.Tensor, positions: torch.Tensor, token_seq: torch.Tensor,
                       seq_first: torch.Tensor, slot: torch.Tensor, comp_table: torch.Tensor, *, ratio: int,
                       span: int, ring_rows: int, page: int):
    """Launcher with ``WindowIndex.reference``'s signature; declines index vectors that are not
    contiguous on one device and a table that is not int32/int64 [R, S] there."""
    if not _vectors(emit, positions, token_seq, seq_first, slot) or comp_table.dim() != 2 \
            or comp_table.dtype not in (torch.int32, torch.int64) or comp_table.device != emit.device:
        return NotImplemented
    e, dev = emit.shape[0], emit.device
    src = result_buffer(0, (e, span), torch.int64, dev)
    epos = result_buffer(1, (e,), torch.int64, dev)
    at = result_buffer(2, (e,), torch.int64, dev)
    if e == 0:
        return src, epos, at
    block_s = triton.next_power_of_2(span)
    block_e = max(1, min(64, 4096 // block_s))
    _window_index_kernel[(triton.cdiv(e, block_e),)](
        emit, positions, token_seq, seq_first, slot, comp_table, src, epos, at, e, ratio, span, ring_rows, page,
        comp_table.shape[1], comp_table.stride(0), comp_table.stride(1), BLOCK_E=block_e, BLOCK_S=block_s,
        **elementwise_launch(4).kwargs(ctx))
    return src, epos, at


@register_kernel("paged.window_gather")
def paged_window_gather(ctx: KernelContext, rows: torch.Tensor, ring: torch.Tensor, sources: torch.Tensor, *,
                        overlap: int = 0):
    """Launcher with ``WindowGather.reference``'s signature; declines rows / ring that are not
    [M, W] of one dtype with unit channel stride, and sources that are not contiguous int64 there."""
    if rows.dim() != 2 or ring.dim() != 2 or rows.dtype != ring.dtype or rows.shape[1] != ring.shape[1] \
            or rows.stride(1) != 1 or ring.stride(1) != 1 or ring.device != rows.device or sources.dim() != 2 \
            or sources.dtype != torch.int64 or not sources.is_contiguous() or sources.device != rows.device:
        return NotImplemented
    (e, span), width = sources.shape, rows.shape[1] // (2 if overlap else 1)
    out = result_buffer(0, (e, span, width), rows.dtype, rows.device)
    if e == 0 or span == 0:
        return out
    block_d = min(triton.next_power_of_2(width), 512)
    block_s = max(1, min(triton.next_power_of_2(span), 4096 // block_d))
    _window_gather_kernel[(e, triton.cdiv(span, block_s), triton.cdiv(width, block_d))](
        rows, ring, sources, out, width, width // 2, rows.stride(0), ring.stride(0), span, overlap,
        OVERLAP=bool(overlap), BLOCK_S=block_s, BLOCK_D=block_d, **elementwise_launch(4).kwargs(ctx))
    return out


@register_kernel("paged.ring_rows")
def paged_ring_rows(ctx: KernelContext, positions: torch.Tensor, token_seq: torch.Tensor, seq_last: torch.Tensor,
                    slot: torch.Tensor, *, ring_rows: int):
    """Launcher with ``RingRows.reference``'s signature; declines index vectors that are not
    contiguous on one device."""
    if not _vectors(positions, token_seq, seq_last, slot) or token_seq.shape != positions.shape:
        return NotImplemented
    n = positions.shape[0]
    out = result_buffer(0, (n,), torch.int64, positions.device)
    if n == 0:
        return out
    block_n = min(triton.next_power_of_2(n), 1024)
    _ring_rows_kernel[(triton.cdiv(n, block_n),)](positions, token_seq, seq_last, slot, out, n, ring_rows,
                                                  BLOCK_N=block_n, **elementwise_launch(4).kwargs(ctx))
    return out


@register_kernel("paged.rows")
def paged_rows(ctx: KernelContext, table: torch.Tensor, seq: torch.Tensor, first: torch.Tensor | None = None,
               limit: torch.Tensor | None = None, *, count: int, page: int):
    """Launcher with ``PagedRows.reference``'s signature; declines tensors on different devices,
    a table that is not int32/int64 [R, S] and 1-D operands that are not contiguous."""
    operands = [t for t in (seq, first, limit) if t is not None]
    if table.dim() != 2 or table.dtype not in (torch.int32, torch.int64) or not _vectors(*operands) \
            or seq.device != table.device or any(t.shape != seq.shape for t in operands):
        return NotImplemented
    n = seq.shape[0]
    out = result_buffer(0, (n, count), torch.int64, seq.device)
    if n == 0:
        return out
    block_c = min(triton.next_power_of_2(count), 256)
    block_n = max(1, min(64, 1024 // block_c))
    _rows_kernel[(triton.cdiv(n, block_n), triton.cdiv(count, block_c))](
        table, seq, first if first is not None else seq, limit if limit is not None else seq, out, n, count, page,
        table.shape[1], table.stride(0), table.stride(1),
        HAS_FIRST=first is not None, HAS_LIMIT=limit is not None, BLOCK_N=block_n, BLOCK_C=block_c,
        **elementwise_launch(4).kwargs(ctx))
    return out


@register_kernel("paged.rows_at")
def paged_rows_at(ctx: KernelContext, table: torch.Tensor, seq: torch.Tensor, entries: torch.Tensor,
                  limit: torch.Tensor | None = None, *, page: int):
    """Launcher with ``PagedRowsAt.reference``'s signature (``_rows_kernel`` reading the positions);
    declines what ``paged_rows`` declines and entries that are not contiguous int64 [N, K]."""
    operands = [t for t in (seq, limit) if t is not None]
    if table.dim() != 2 or table.dtype not in (torch.int32, torch.int64) or not _vectors(*operands) \
            or seq.device != table.device or any(t.shape != seq.shape for t in operands) or entries.dim() != 2 \
            or entries.dtype != torch.int64 or not entries.is_contiguous() or entries.device != seq.device \
            or entries.shape[0] != seq.shape[0]:
        return NotImplemented
    n, count = entries.shape
    out = result_buffer(0, (n, count), torch.int64, seq.device)
    if n == 0 or count == 0:
        return out
    block_c = min(triton.next_power_of_2(count), 256)
    block_n = max(1, min(64, 1024 // block_c))
    _rows_kernel[(triton.cdiv(n, block_n), triton.cdiv(count, block_c))](
        table, seq, entries, limit if limit is not None else seq, out, n, count, page,
        table.shape[1], table.stride(0), table.stride(1),
        HAS_FIRST=False, HAS_LIMIT=limit is not None, BLOCK_N=block_n, BLOCK_C=block_c, ENTRIES=True,
        **elementwise_launch(4).kwargs(ctx))
    return out


@register_kernel("paged.gather")
def paged_gather(ctx: KernelContext, pool: torch.Tensor, rows: torch.Tensor):
    """Launcher with ``PagedGather.reference``'s signature; declines a pool that is not [M, D]
    with unit channel stride, integer rows on another device or not contiguous."""
    if pool.dim() != 2 or pool.stride(1) != 1 or rows.dtype not in (torch.int32, torch.int64) \
            or rows.device != pool.device or not rows.is_contiguous():
        return NotImplemented
    d = pool.shape[1]
    out = result_buffer(0, (*rows.shape, d), pool.dtype, pool.device)
    k = rows.numel()
    if k == 0 or d == 0:
        return out
    block_d = min(triton.next_power_of_2(d), 512)
    block_k = max(1, min(32, 4096 // block_d))
    _gather_kernel[(triton.cdiv(k, block_k), triton.cdiv(d, block_d))](
        pool, rows, out, k, d, pool.stride(0), BLOCK_K=block_k, BLOCK_D=block_d, **elementwise_launch(4).kwargs(ctx))
    return out
