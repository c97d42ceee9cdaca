"""``paged.rows`` and ``paged.gather`` (``ds4c.ops.paged``): a serving step's page-table addressing
in two launches instead of some twenty small ATen kernels per attention layer.

``paged.rows``: a program owns ``BLOCK_N`` tokens x ``BLOCK_C`` of their ``count`` positions
``q = first[n] + i``, reads the page of each from its sequence's row of the table
(``table[seq[n], (q // page) % S]``, int32 or int64, any strides) and writes
``page_id * page + q % page``, or -1 where ``q < 0`` or ``q >= limit[n]``.

``paged.gather``: a program owns ``BLOCK_K`` rows x ``BLOCK_D`` channels of the output and copies
them from the pool (rows of any stride, unit channel stride), zeros where the row is -1.
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
                 PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    i = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < n
    mask = t_ok[:, None] & (i < count)[None, :]
    seq = tl.load(seq_ptr + t, mask=t_ok, other=0).to(tl.int64)
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


@register_kernel("paged.rows")
def paged_rows(ctx: KernelContext, table: torch.Tensor, seq: torch.Tensor, first: torch.Tensor | None = None,
               limit: torch.Tensor | None = None, *, count: int, page: int):
    """Launcher with ``PagedRows.reference``'s signature; declines tensors on different devices,
    a table that is not int32/int64 [R, S] and 1-D operands that are not contiguous."""
    if table.dim() != 2 or table.dtype not in (torch.int32, torch.int64) or seq.dim() != 1:
        return NotImplemented
    operands = [t for t in (seq, first, limit) if t is not None]
    if any(t.device != table.device or t.dim() != 1 or t.stride(0) != 1 or t.shape != seq.shape for t in operands):
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
