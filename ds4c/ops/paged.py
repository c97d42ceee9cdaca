"""Paged addressing of the serving pools, as ops: ``paged.rows``, ``paged.gather``, and the
compressors' three: ``paged.window_index``, ``paged.window_gather`` and ``paged.ring_rows``.

    %rows = paged.rows(%window_table, %token_seq, %first, none, count=128, page=32) : i64[N,128]
    %keys = paged.gather(%pool_rows, %rows) : bf16[N,128,512]
    %picks = paged.rows_at(%comp_table, %token_seq, %entries, %visible, page=64) : i64[N,512]
    %src, %pos, %at = paged.window_index(%emit, %positions, %token_seq, %seq_first, %slot, %comp_table,
        ratio=4, span=8, ring_rows=11, page=64) : i64[E,8], i64[E], i64[E]
    %win = paged.window_gather(%kv_gate, %ring, %src, overlap=4) : bf16[E,8,1024]
    %at = paged.ring_rows(%positions, %token_seq, %seq_last, %slot, ring_rows=11) : i64[N]

A serving step finds each token's state through its sequence's page table
(``ds4c.models.deepseek_v4.paged``): position ``q`` of sequence ``s`` lives in row
``table[s, (q // page) % S] * page + q % page`` of a pool flattened to rows (``S`` the table's
width: a ring of window pages, or the compressed pages in order). ``paged.rows`` computes the rows
of ``count`` consecutive positions ``first[n] .. first[n] + count - 1`` per token ``n`` (``first``
none: from 0), -1 for positions below 0 or at or past ``limit[n]`` (none: no limit);
``paged.gather`` reads rows of a pool, zeros for -1. ``paged.rows_at`` gives the rows of given
positions ``entries[n, j]`` instead of consecutive ones (the indexer's picks: the rows of its top-k
entries without the rows of every entry, ``fuse_paged_reads``). Written with ATen ops, the same addressing is
some twenty small integer kernels per attention layer (index_select, gather, div, remainder, where,
...): in a decode step at batch 1 their launches cost more than the reads. As ops they are two
launches (``ds4c.backends.triton.kernels.paged``).

A compressor (``Compressor.step``) reads, for every window a step closes, the window's ``span``
kv ++ gate rows from this step's packed tokens where its sequence's chunk holds them and from the
sequence's ring slot (rows written by earlier steps) before that, writes the window's entry into
the compressed pages, and writes each token's row into its ring slot. ``paged.window_index`` is
the addressing (candidate rows -> each window row's source, the entry's position for its RoPE
and its row in the compressed pool), ``paged.window_gather`` the read (with the empty rows'
fill: kv 0, gate -inf, and an overlapping compressor's choice of halves) and ``paged.ring_rows``
the rows written: in ATen ops some fifty launches per compressor, as ops four. A CSA layer's
compressor and its indexer's close the same windows through the same pages: their
``paged.window_index`` is one op after ``cse``.

The model calls them as custom torch ops (``torch.ops.ds4c.paged_rows``, ``window_index``, ...,
with these references, so eager runs and tracing agree); the importer names them by ``TORCH_OPS``.
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType

__all__ = ["PAGED_GATHER", "PAGED_ROWS", "PAGED_ROWS_AT", "RING_ROWS", "TORCH_OPS", "WINDOW_GATHER", "WINDOW_INDEX", "gather_reference",
           "ring_rows_reference", "rows_at_reference", "rows_reference", "window_gather_reference", "window_index_reference"]

PAGED_ROWS, PAGED_GATHER, PAGED_ROWS_AT = "paged.rows", "paged.gather", "paged.rows_at"
WINDOW_INDEX, WINDOW_GATHER, RING_ROWS = "paged.window_index", "paged.window_gather", "paged.ring_rows"
# the custom torch ops the model calls -> the IR ops they import as
TORCH_OPS = {"ds4c::paged_rows": PAGED_ROWS, "ds4c::paged_gather": PAGED_GATHER,
             "ds4c::window_index": WINDOW_INDEX, "ds4c::window_gather": WINDOW_GATHER, "ds4c::ring_rows": RING_ROWS}


def rows_reference(table: torch.Tensor, seq: torch.Tensor, first: torch.Tensor | None, limit: torch.Tensor | None,
                   *, count: int, page: int) -> torch.Tensor:
    """[N, count] pool rows of positions first[n] + i of sequence seq[n]; -1 outside [0, limit[n])."""
    q = torch.arange(count, device=seq.device).unsqueeze(0).expand(seq.shape[0], count)
    if first is not None:
        q = q + first.to(device=seq.device, dtype=torch.int64).unsqueeze(1)
    return rows_at_reference(table, seq, q, limit, page=page)


def rows_at_reference(table: torch.Tensor, seq: torch.Tensor, entries: torch.Tensor, limit: torch.Tensor | None,
                      *, page: int) -> torch.Tensor:
    """[N, K] pool rows of positions ``entries[n, j]`` of sequence ``seq[n]``; -1 outside [0, limit[n])
    (``rows_reference``'s rows at those positions)."""
    q = entries.to(device=seq.device, dtype=torch.int64)
    slots = table.shape[1]
    qc = q.clamp(min=0)
    pages = table.to(device=seq.device, dtype=torch.int64)[seq.long().unsqueeze(1), torch.div(qc, page, rounding_mode="floor") % slots]
    valid = q >= 0
    if limit is not None:
        valid = valid & (q < limit.to(device=seq.device, dtype=torch.int64).unsqueeze(1))
    return torch.where(valid, pages * page + qc % page, torch.full_like(q, -1))


def gather_reference(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pool`` [M, D] at ``rows`` (any shape); -1 gives a zero row."""
    rows = rows.to(pool.device)
    picked = pool.index_select(0, rows.clamp(min=0).reshape(-1).long()).view(*rows.shape, pool.shape[-1])
    return torch.where((rows >= 0).unsqueeze(-1), picked, torch.zeros_like(picked))


def window_index_reference(emit: torch.Tensor, positions: torch.Tensor, token_seq: torch.Tensor,
                           seq_first: torch.Tensor, slot: torch.Tensor, comp_table: torch.Tensor, *, ratio: int,
                           span: int, ring_rows: int, page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the ``span`` rows of the window each candidate row ``emit`` [E] closes come from.

    A candidate is valid when it is a token (>= 0) whose position ``p`` closes a window
    (``(p + 1) % ratio == 0``); its window ``w = p // ratio`` spans positions ``q = w * ratio +
    ratio - span ..``: this step's packed row ``first + q - start`` at or after its chunk's start,
    its ring slot's row ``slot * ring_rows + q % ring_rows`` before. Returns (sources [E, span]:
    the packed row (>= 0), ``-2 - ring row`` (<= -2), or -1 for no row (q < 0, invalid
    candidates); the window's entry position ``w * ratio`` [E] (its RoPE position); the entry's
    row in the compressed pool [E], through ``comp_table`` pages of ``page`` entries, 0 (the
    trash page) for invalid candidates)."""
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
    sources = torch.where(ok & (q >= start), first + q - start,
                          torch.where(ok, -2 - (sl * ring_rows + q % ring_rows), torch.full_like(q, -1)))
    at = rows_reference(comp_table, seq, w, None, count=1, page=page)[:, 0]
    return sources, w * ratio, torch.where(valid, at, torch.zeros_like(at))


def window_gather_reference(rows: torch.Tensor, ring: torch.Tensor, sources: torch.Tensor, *,
                            overlap: int = 0) -> torch.Tensor:
    """The window rows [E, span, W]: ``rows`` [N, W] at sources >= 0, ``ring`` [M, W] at ``-2 -
    source`` for sources <= -2; rows of no source (-1) are a compressor's empty state: kv (first
    half of W) 0, gate (second half) -inf.

    ``overlap = m`` (an overlapping compressor, span 2m, rows kv_a ++ kv_b ++ gate_a ++ gate_b):
    [E, span, W/2], the first m rows' a halves then the last m rows' b halves of kv and of gate
    (the previous window's first halves, this window's second halves)."""
    got = torch.where((sources >= 0).unsqueeze(-1), gather_reference(rows, sources),
                      gather_reference(ring, torch.where(sources <= -2, -2 - sources, torch.full_like(sources, -1))))
    half = rows.shape[-1] // 2
    kv, gate = got[..., :half], got[..., half:].masked_fill((sources == -1).unsqueeze(-1), float("-inf"))
    if overlap:
        d = half // 2
        kv = torch.cat([kv[:, :overlap, :d], kv[:, overlap:, d:]], dim=1)
        gate = torch.cat([gate[:, :overlap, :d], gate[:, overlap:, d:]], dim=1)
    return torch.cat([kv, gate], dim=-1)


def ring_rows_reference(positions: torch.Tensor, token_seq: torch.Tensor, seq_last: torch.Tensor, slot: torch.Tensor,
                        *, ring_rows: int) -> torch.Tensor:
    """[N] ring row each packed token writes: its slot's row ``p % ring_rows`` when a later step may
    read it (one of its sequence's last ``ring_rows`` positions in this step), else the trash
    slot's (slot 0)."""
    end = positions.index_select(0, seq_last).index_select(0, token_seq) + 1
    sl = slot.long().index_select(0, token_seq)
    keep = positions >= end - ring_rows
    return torch.where(keep, sl, torch.zeros_like(sl)) * ring_rows + positions % ring_rows


@torch.library.custom_op("ds4c::window_index", mutates_args=())
def _window_index(emit: torch.Tensor, positions: torch.Tensor, token_seq: torch.Tensor, seq_first: torch.Tensor,
                  slot: torch.Tensor, comp_table: torch.Tensor, *, ratio: int, span: int, ring_rows: int,
                  page: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return window_index_reference(emit, positions, token_seq, seq_first, slot, comp_table, ratio=ratio, span=span,
                                  ring_rows=ring_rows, page=page)


@_window_index.register_fake
def _(emit, positions, token_seq, seq_first, slot, comp_table, *, ratio, span, ring_rows, page):
    e = emit.shape[0]
    return (emit.new_empty((e, span), dtype=torch.int64), emit.new_empty((e,), dtype=torch.int64),
            emit.new_empty((e,), dtype=torch.int64))


@torch.library.custom_op("ds4c::window_gather", mutates_args=())
def _window_gather(rows: torch.Tensor, ring: torch.Tensor, sources: torch.Tensor, *, overlap: int) -> torch.Tensor:
    return window_gather_reference(rows, ring, sources, overlap=overlap)


@_window_gather.register_fake
def _(rows, ring, sources, *, overlap):
    return rows.new_empty((*sources.shape, rows.shape[-1] // (2 if overlap else 1)))


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
class PagedRowsAt(OpDef):
    name = PAGED_ROWS_AT
    operands = (Operand("table", "index"), Operand("seq", "index"), Operand("entries", "index"),
                Operand("limit", "index"))

    def reference(self, table, seq, entries, limit=None, *, page: int) -> torch.Tensor:
        return rows_at_reference(table, seq, entries, limit, page=page)

    def infer_types(self, operand_types, kwargs):
        table = self.tensor_operand(operand_types, 0, min_rank=2)
        seq = self.tensor_operand(operand_types, 1, min_rank=1)
        entries = self.tensor_operand(operand_types, 2, min_rank=2)
        limit = operand_types[3] if len(operand_types) > 3 else None
        if table.rank != 2 or seq.rank != 1 or entries.rank != 2 or entries.shape[0] != seq.shape[0] \
                or entries.dtype != torch.int64 or (limit is not None and (not isinstance(limit, TensorType)
                                                                           or limit.shape != seq.shape)):
            raise VerificationError(f"{PAGED_ROWS_AT}: takes table [R, S], seq [N], entries int64 [N, K] and none or "
                                    f"limit [N]; got {table}, {seq}, {entries}, {limit}")
        page = kwargs.get("page")
        if not isinstance(page, int) or page < 1:
            raise VerificationError(f"{PAGED_ROWS_AT}: page must be a positive integer, got {page}")
        return [TensorType(torch.int64, tuple(entries.shape))]


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
class WindowIndex(OpDef):
    name = WINDOW_INDEX
    num_results = 3
    operands = (Operand("emit", "index"), Operand("positions", "index"), Operand("token_seq", "index"),
                Operand("seq_first", "index"), Operand("slot", "index"), Operand("comp_table", "index"))

    def reference(self, emit, positions, token_seq, seq_first, slot, comp_table, *, ratio: int, span: int,
                  ring_rows: int, page: int) -> tuple[torch.Tensor, ...]:
        return window_index_reference(emit, positions, token_seq, seq_first, slot, comp_table, ratio=ratio,
                                      span=span, ring_rows=ring_rows, page=page)

    def infer_types(self, operand_types, kwargs):
        emit = _index_vector(WINDOW_INDEX, "emit", self.tensor_operand(operand_types, 0, min_rank=1))
        positions = _index_vector(WINDOW_INDEX, "positions", operand_types[1])
        _index_vector(WINDOW_INDEX, "token_seq", operand_types[2], positions)
        _index_vector(WINDOW_INDEX, "seq_first", operand_types[3])
        _index_vector(WINDOW_INDEX, "slot", operand_types[4])
        table = self.tensor_operand(operand_types, 5, min_rank=2)
        if table.rank != 2 or table.dtype not in (torch.int32, torch.int64):
            raise VerificationError(f"{WINDOW_INDEX}: comp_table must be int32/int64 [R, S], got {table}")
        ratio, span, ring_rows, page = (kwargs.get(k) for k in ("ratio", "span", "ring_rows", "page"))
        if not all(isinstance(v, int) and v >= 1 for v in (ratio, span, ring_rows, page)) or ring_rows < span:
            raise VerificationError(f"{WINDOW_INDEX}: ratio, span, ring_rows and page must be positive integers "
                                    f"with ring_rows >= span, got {ratio}, {span}, {ring_rows}, {page}")
        e = emit.shape[0]
        return [TensorType(torch.int64, (e, span)), TensorType(torch.int64, (e,)), TensorType(torch.int64, (e,))]


@register_op
class WindowGather(OpDef):
    name = WINDOW_GATHER
    operands = (Operand("rows"), Operand("ring"), Operand("sources", "index"))

    def reference(self, rows, ring, sources, *, overlap: int = 0) -> torch.Tensor:
        return window_gather_reference(rows, ring, sources, overlap=overlap)

    def infer_types(self, operand_types, kwargs):
        rows = self.tensor_operand(operand_types, 0, min_rank=2)
        ring = self.tensor_operand(operand_types, 1, min_rank=2)
        sources = self.tensor_operand(operand_types, 2, min_rank=2)
        if rows.rank != 2 or ring.rank != 2 or ring.dtype != rows.dtype or ring.shape[1] != rows.shape[1] \
                or not isinstance(rows.shape[1], int) or rows.shape[1] % 2:
            raise VerificationError(f"{WINDOW_GATHER}: rows [N, W] and ring [M, W] of one dtype (W even) expected, "
                                    f"got {rows} and {ring}")
        if sources.rank != 2 or sources.dtype != torch.int64:
            raise VerificationError(f"{WINDOW_GATHER}: sources must be int64 [E, span], got {sources}")
        overlap = kwargs.get("overlap", 0)
        if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0 or (overlap and (
                rows.shape[1] % 4 or sources.shape[1] != 2 * overlap)):
            raise VerificationError(f"{WINDOW_GATHER}: overlap must be 0 or m with span 2m and W a multiple of 4, "
                                    f"got overlap={overlap!r}, sources {sources}, rows {rows}")
        return [TensorType(rows.dtype, (*sources.shape, rows.shape[1] // (2 if overlap else 1)))]


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
