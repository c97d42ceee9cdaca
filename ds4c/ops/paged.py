"""Paged addressing of the serving pools, as two ops: ``paged.rows`` and ``paged.gather``.

    %rows = paged.rows(%window_table, %token_seq, %first, none, count=128, page=32) : i64[N,128]
    %keys = paged.gather(%pool_rows, %rows) : bf16[N,128,512]

A serving step finds each token's state through its sequence's page table
(``ds4c.models.deepseek_v4.paged``): position ``q`` of sequence ``s`` lives in row
``table[s, (q // page) % S] * page + q % page`` of a pool flattened to rows (``S`` the table's
width: a ring of window pages, or the compressed pages in order). ``paged.rows`` computes the rows
of ``count`` consecutive positions ``first[n] .. first[n] + count - 1`` per token ``n`` (``first``
none: from 0), -1 for positions below 0 or at or past ``limit[n]`` (none: no limit);
``paged.gather`` reads rows of a pool, zeros for -1. Written with ATen ops, the same addressing is
some twenty small integer kernels per attention layer (index_select, gather, div, remainder, where,
...): in a decode step at batch 1 their launches cost more than the reads. As ops they are two
launches (``ds4c.backends.triton.kernels.paged``).

The model calls them through ``torch.ops.ds4c.paged_rows`` / ``paged_gather`` (custom ops with
these references, so eager runs and tracing agree); the importer names them ``paged.rows`` and
``paged.gather`` (``TORCH_OPS``).
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType

__all__ = ["PAGED_GATHER", "PAGED_ROWS", "TORCH_OPS", "gather_reference", "rows_reference"]

PAGED_ROWS, PAGED_GATHER = "paged.rows", "paged.gather"
# the custom torch ops the model calls -> the IR ops they import as
TORCH_OPS = {"ds4c::paged_rows": PAGED_ROWS, "ds4c::paged_gather": PAGED_GATHER}


def rows_reference(table: torch.Tensor, seq: torch.Tensor, first: torch.Tensor | None, limit: torch.Tensor | None,
                   *, count: int, page: int) -> torch.Tensor:
    """[N, count] pool rows of positions first[n] + i of sequence seq[n]; -1 outside [0, limit[n])."""
    q = torch.arange(count, device=seq.device).unsqueeze(0).expand(seq.shape[0], count)
    if first is not None:
        q = q + first.to(device=seq.device, dtype=torch.int64).unsqueeze(1)
    slots = table.shape[1]
    qc = q.clamp(min=0)
    pages = table.to(device=seq.device, dtype=torch.int64)[seq.long().unsqueeze(1), torch.div(qc, page, rounding_mode="floor") % slots]
    rows = pages * page + qc % page
    valid = q >= 0
    if limit is not None:
        valid = valid & (q < limit.to(device=seq.device, dtype=torch.int64).unsqueeze(1))
    return torch.where(valid, rows, torch.full_like(rows, -1))


def gather_reference(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pool`` [M, D] at ``rows`` (any shape); -1 gives a zero row."""
    rows = rows.to(pool.device)
    picked = pool.index_select(0, rows.clamp(min=0).reshape(-1).long()).view(*rows.shape, pool.shape[-1])
    return torch.where((rows >= 0).unsqueeze(-1), picked, torch.zeros_like(picked))


@torch.library.custom_op("ds4c::paged_rows", mutates_args=())
def _paged_rows(table: torch.Tensor, seq: torch.Tensor, first: torch.Tensor | None, limit: torch.Tensor | None, *,
                count: int, page: int) -> torch.Tensor:
    return rows_reference(table, seq, first, limit, count=count, page=page)


@_paged_rows.register_fake
def _(table, seq, first, limit, *, count, page):
    return seq.new_empty((seq.shape[0], count), dtype=torch.int64)


@torch.library.custom_op("ds4c::paged_gather", mutates_args=())
def _paged_gather(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return gather_reference(pool, rows)


@_paged_gather.register_fake
def _(pool, rows):
    return pool.new_empty((*rows.shape, pool.shape[-1]))


@register_op
class PagedRows(OpDef):
    name = PAGED_ROWS
    operands = (Operand("table", "index"), Operand("seq", "index"), Operand("first", "index"),
                Operand("limit", "index"))

    def reference(self, table, seq, first=None, limit=None, *, count: int, page: int) -> torch.Tensor:
        return rows_reference(table, seq, first, limit, count=count, page=page)

    def infer_types(self, operand_types, kwargs):
        table = self.tensor_operand(operand_types, 0, min_rank=2)
        seq = self.tensor_operand(operand_types, 1, min_rank=1)
        if table.rank != 2 or seq.rank != 1 or table.dtype not in (torch.int32, torch.int64) \
                or seq.dtype != torch.int64:
            raise VerificationError(f"{PAGED_ROWS}: table must be int32/int64 [R, S] and seq int64 [N], got "
                                    f"{table} and {seq}")
        for i, name in ((2, "first"), (3, "limit")):
            t = operand_types[i] if i < len(operand_types) else None
            if t is not None and (not isinstance(t, TensorType) or t.shape != seq.shape or t.dtype != torch.int64):
                raise VerificationError(f"{PAGED_ROWS}: {name} must be none or int64 like seq {seq}, got {t}")
        count, page = kwargs.get("count"), kwargs.get("page")
        if not isinstance(count, int) or count < 1 or not isinstance(page, int) or page < 1:
            raise VerificationError(f"{PAGED_ROWS}: count and page must be positive integers, got {count}, {page}")
        return [TensorType(torch.int64, (seq.shape[0], count))]


@register_op
class PagedGather(OpDef):
    name = PAGED_GATHER
    operands = (Operand("pool"), Operand("rows", "index"))

    def reference(self, pool, rows) -> torch.Tensor:
        return gather_reference(pool, rows)

    def infer_types(self, operand_types, kwargs):
        pool = self.tensor_operand(operand_types, 0, min_rank=2)
        rows = self.tensor_operand(operand_types, 1, min_rank=1)
        if pool.rank != 2 or rows.dtype not in (torch.int64, torch.int32):
            raise VerificationError(f"{PAGED_GATHER}: pool must be [M, D] and rows integers, got {pool} and {rows}")
        return [TensorType(pool.dtype, (*rows.shape, pool.shape[1]))]
