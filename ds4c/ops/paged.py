"""Paged addressing of the serving pools, as ops: ``paged.rows``, ``paged.gather``, and the
compressors' two: ``paged.compress_window`` and ``paged.ring_rows``.

    %rows = paged.rows(%window_table, %token_seq, %first, none, count=128, page=32) : i64[N,128]
    %keys = paged.gather(%pool_rows, %rows) : bf16[N,128,512]
    %win, %w, %seq, %valid = paged.compress_window(%kv_gate, %ring, %emit, %positions, %token_seq,
        %seq_first, %slot, ratio=4, span=8, ring_rows=11) : bf16[E,8,2048], i64[E], i64[E], i1[E]
    %at = paged.ring_rows(%positions, %token_seq, %seq_last, %slot, ring_rows=11) : i64[N]

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

A compressor (``Compressor.step``) reads, for every window a step closes, the window's ``span``
kv ++ gate rows from this step's packed tokens where its sequence's chunk holds them and from the
sequence's ring slot (rows written by earlier steps) before that, and writes each token's row
into its ring slot. ``paged.compress_window`` is the read (emitted rows -> window index,
sequence, validity, sources, both gathers and the empty rows' fill: kv 0, gate -inf) and
``paged.ring_rows`` the rows written; in ATen ops they were some fifty launches per compressor.

The model calls them through ``torch.ops.ds4c.paged_rows`` / ``paged_gather`` (custom ops with
these references, so eager runs and tracing agree); the importer names them ``paged.rows`` and
``paged.gather`` (``TORCH_OPS``).
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType

__all__ = ["COMPRESS_WINDOW", "PAGED_GATHER", "PAGED_ROWS", "RING_ROWS", "TORCH_OPS", "compress_window_reference",
           "gather_reference", "ring_rows_reference", "rows_reference"]

PAGED_ROWS, PAGED_GATHER = "paged.rows", "paged.gather"
COMPRESS_WINDOW, RING_ROWS = "paged.compress_window", "paged.ring_rows"
# the custom torch ops the model calls -> the IR ops they import as
TORCH_OPS = {"ds4c::paged_rows": PAGED_ROWS, "ds4c::paged_gather": PAGED_GATHER,
             "ds4c::compress_window": COMPRESS_WINDOW, "ds4c::ring_rows": RING_ROWS}


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


def compress_window_reference(rows: torch.Tensor, ring: torch.Tensor, emit: torch.Tensor, positions: torch.Tensor,
                              token_seq: torch.Tensor, seq_first: torch.Tensor, slot: torch.Tensor, *, ratio: int,
                              span: int, ring_rows: int) -> tuple[torch.Tensor, ...]:
    """The ``span`` kv ++ gate rows of the window each candidate row ``emit`` [E] closes.

    ``rows`` [N, W]: this step's rows per packed token; ``ring`` [slots * ring_rows, W]: the ring
    slots. A candidate is valid when it is a token (>= 0) whose position ``p`` closes a window
    (``(p + 1) % ratio == 0``); its window ``w = p // ratio`` spans positions ``q = w * ratio +
    ratio - span ..``, read from ``rows`` at or after its chunk's start, from its slot's ring row
    ``q % ring_rows`` before. Rows of no source (q < 0, invalid candidates) are kv 0, gate -inf.
    Returns (windows [E, span, W], w [E], sequence [E], valid [E])."""
    row = emit.clamp(min=0)
    p = positions.index_select(0, row)
    valid = (emit >= 0) & ((p + 1) % ratio == 0)
    w = torch.div(p, ratio, rounding_mode="floor")
    seq = token_seq.index_select(0, row)
    q = (w * ratio + ratio - span).unsqueeze(1) + torch.arange(span, device=emit.device)
    first = seq_first.index_select(0, seq).unsqueeze(1)
    start = positions.index_select(0, seq_first).index_select(0, seq).unsqueeze(1)
    sl = slot.long().index_select(0, seq).unsqueeze(1)
    ok = valid.unsqueeze(1) & (q >= 0)
    packed = torch.where(ok & (q >= start), first + q - start, torch.full_like(q, -1))
    ringed = torch.where(ok & (q < start), sl * ring_rows + q % ring_rows, torch.full_like(q, -1))
    got = torch.where((packed >= 0).unsqueeze(-1), gather_reference(rows, packed), gather_reference(ring, ringed))
    half = rows.shape[-1] // 2
    missing = ((packed < 0) & (ringed < 0)).unsqueeze(-1)
    gate = got[..., half:].masked_fill(missing, float("-inf"))
    return torch.cat([got[..., :half], gate], dim=-1), w, seq, valid


def ring_rows_reference(positions: torch.Tensor, token_seq: torch.Tensor, seq_last: torch.Tensor, slot: torch.Tensor,
                        *, ring_rows: int) -> torch.Tensor:
    """[N] ring row each packed token writes: its slot's row ``p % ring_rows`` when a later step may
    read it (one of its sequence's last ``ring_rows`` positions in this step), else the trash
    slot's (slot 0)."""
    end = positions.index_select(0, seq_last).index_select(0, token_seq) + 1
    sl = slot.long().index_select(0, token_seq)
    keep = positions >= end - ring_rows
    return torch.where(keep, sl, torch.zeros_like(sl)) * ring_rows + positions % ring_rows


@torch.library.custom_op("ds4c::compress_window", mutates_args=())
def _compress_window(rows: torch.Tensor, ring: torch.Tensor, emit: torch.Tensor, positions: torch.Tensor,
                     token_seq: torch.Tensor, seq_first: torch.Tensor, slot: torch.Tensor, *, ratio: int, span: int,
                     ring_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return compress_window_reference(rows, ring, emit, positions, token_seq, seq_first, slot, ratio=ratio, span=span,
                                     ring_rows=ring_rows)


@_compress_window.register_fake
def _(rows, ring, emit, positions, token_seq, seq_first, slot, *, ratio, span, ring_rows):
    e = emit.shape[0]
    return (rows.new_empty((e, span, rows.shape[-1])), emit.new_empty((e,), dtype=torch.int64),
            emit.new_empty((e,), dtype=torch.int64), emit.new_empty((e,), dtype=torch.bool))


@torch.library.custom_op("ds4c::ring_rows", mutates_args=())
def _ring_rows(positions: torch.Tensor, token_seq: torch.Tensor, seq_last: torch.Tensor, slot: torch.Tensor, *,
               ring_rows: int) -> torch.Tensor:
    return ring_rows_reference(positions, token_seq, seq_last, slot, ring_rows=ring_rows)


@_ring_rows.register_fake
def _(positions, token_seq, seq_last, slot, *, ring_rows):
    return positions.new_empty(positions.shape, dtype=torch.int64)


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


def _index_vector(op: str, name: str, t, like: TensorType | None = None) -> TensorType:
    """``t`` as an integer vector operand of ``op`` (int64, or int32 / int64 where ``like`` is None)."""
    if not isinstance(t, TensorType) or t.rank != 1 or t.dtype not in (torch.int32, torch.int64):
        raise VerificationError(f"{op}: {name} must be an integer vector, got {t}")
    if like is not None and (t.shape != like.shape or t.dtype != torch.int64):
        raise VerificationError(f"{op}: {name} must be int64 like {like}, got {t}")
    return t


@register_op
class CompressWindow(OpDef):
    name = COMPRESS_WINDOW
    operands = (Operand("rows"), Operand("ring"), Operand("emit", "index"), Operand("positions", "index"),
                Operand("token_seq", "index"), Operand("seq_first", "index"), Operand("slot", "index"))

    def reference(self, rows, ring, emit, positions, token_seq, seq_first, slot, *, ratio: int, span: int,
                  ring_rows: int) -> tuple[torch.Tensor, ...]:
        return compress_window_reference(rows, ring, emit, positions, token_seq, seq_first, slot, ratio=ratio,
                                         span=span, ring_rows=ring_rows)

    def infer_types(self, operand_types, kwargs):
        rows = self.tensor_operand(operand_types, 0, min_rank=2)
        ring = self.tensor_operand(operand_types, 1, min_rank=2)
        if rows.rank != 2 or ring.rank != 2 or ring.dtype != rows.dtype or ring.shape[1] != rows.shape[1] \
                or not isinstance(rows.shape[1], int) or rows.shape[1] % 2:
            raise VerificationError(f"{COMPRESS_WINDOW}: rows [N, W] and ring [M, W] of one dtype (W even) expected, "
                                    f"got {rows} and {ring}")
        emit = _index_vector(COMPRESS_WINDOW, "emit", operand_types[2])
        positions = _index_vector(COMPRESS_WINDOW, "positions", operand_types[3])
        _index_vector(COMPRESS_WINDOW, "token_seq", operand_types[4], positions)
        _index_vector(COMPRESS_WINDOW, "seq_first", operand_types[5])
        _index_vector(COMPRESS_WINDOW, "slot", operand_types[6])
        ratio, span, ring_rows = (kwargs.get(k) for k in ("ratio", "span", "ring_rows"))
        if not all(isinstance(v, int) and v >= 1 for v in (ratio, span, ring_rows)) or ring_rows < span:
            raise VerificationError(f"{COMPRESS_WINDOW}: ratio, span and ring_rows must be positive integers with "
                                    f"ring_rows >= span, got {ratio}, {span}, {ring_rows}")
        e = emit.shape[0]
        return [TensorType(rows.dtype, (e, span, rows.shape[1])), TensorType(torch.int64, (e,)),
                TensorType(torch.int64, (e,)), TensorType(torch.bool, (e,))]


@register_op
class RingRows(OpDef):
    name = RING_ROWS
    operands = (Operand("positions", "index"), Operand("token_seq", "index"), Operand("seq_last", "index"),
                Operand("slot", "index"))

    def reference(self, positions, token_seq, seq_last, slot, *, ring_rows: int) -> torch.Tensor:
        return ring_rows_reference(positions, token_seq, seq_last, slot, ring_rows=ring_rows)

    def infer_types(self, operand_types, kwargs):
        positions = _index_vector(RING_ROWS, "positions", self.tensor_operand(operand_types, 0, min_rank=1))
        _index_vector(RING_ROWS, "token_seq", operand_types[1], positions)
        _index_vector(RING_ROWS, "seq_last", operand_types[2])
        _index_vector(RING_ROWS, "slot", operand_types[3])
        ring_rows = kwargs.get("ring_rows")
        if not isinstance(ring_rows, int) or ring_rows < 1:
            raise VerificationError(f"{RING_ROWS}: ring_rows must be a positive integer, got {ring_rows}")
        return [TensorType(torch.int64, positions.shape)]
