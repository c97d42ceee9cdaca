"""One serving step's inputs, built on the host from the chunks the scheduler picked (#26).

A step packs one chunk per sequence: its next tokens, at consecutive positions from where the
sequence stands, with the pages it holds (``RequestPages``, already grown to cover the chunk).
``build_step`` lays them out as ``DeepseekV4Model.step`` reads them (packed rows, no padding):

- per token [N]: ``input_ids``, ``positions``, ``token_seq`` (its chunk's index);
- per chunk [R]: ``seq_first``, ``seq_last`` (its first and last row), ``window_table`` [R, Wp],
  ``comp_table`` [R, Pc] (int32), ``slot``;
- ``logit_rows`` [L]: the rows whose logits the step returns (each chunk's last, all of its
  rows, or none), and ``emit_csa`` / ``emit_hca`` [E]: the rows whose positions close a CSA / HCA
  window.

Everything here is O(N + R) host work with no model state; the device only sees the tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ds4c.models.deepseek_v4.paged import EMIT_KINDS, padded_sizes
from ds4c.runtime.pages import RequestPages

__all__ = ["Chunk", "StepBatch", "build_step", "pad_step", "padded_sizes"]



@dataclass(frozen=True)
class Chunk:
    """The next ``token_ids`` of one sequence, at positions ``start ..``; ``logits``: "last" (the
    chunk's last row), "all" (every row) or "none". ``emit_from``: positions before it close no
    compressed window in this step (their entries are in the pools already: a request resuming
    from the prefix cache recomputes a few positions for their window and compressor rows only)."""

    pages: RequestPages
    token_ids: Sequence[int]
    start: int
    logits: str = "last"
    emit_from: int = 0


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    token_seq: torch.Tensor
    seq_first: torch.Tensor
    seq_last: torch.Tensor
    logit_rows: torch.Tensor
    window_table: torch.Tensor
    comp_table: torch.Tensor
    slot: torch.Tensor
    emit_csa: torch.Tensor
    emit_hca: torch.Tensor
    # (chunk index, position) of each logits row, in logit_rows order
    logit_owners: tuple[tuple[int, int], ...]

    def args(self) -> tuple[torch.Tensor, ...]:
        """The metadata in ``DeepseekV4Model.step``'s argument order (the pools follow)."""
        return (self.input_ids, self.positions, self.token_seq, self.seq_first, self.seq_last, self.logit_rows,
                self.window_table, self.comp_table, self.slot, self.emit_csa, self.emit_hca)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_step(chunks: Sequence[Chunk], rates: dict[str, int], device: torch.device | str = "cpu") -> StepBatch:
    """Pack ``chunks`` into one step's inputs. ``rates``: compression rate per compressed layer type
    (``DeepseekV4Model.compression_rates()``). Each chunk's pages must already cover it."""
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    layout = chunks[0].pages.layout
    ids: list[int] = []
    positions: list[int] = []
    token_seq: list[int] = []
    first: list[int] = []
    last: list[int] = []
    logit_rows: list[int] = []
    owners: list[tuple[int, int]] = []
    emit_from: list[int] = []
    seen: set[int] = set()
    for r, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        if chunk.pages.layout is not layout and chunk.pages.layout != layout:
            raise ValueError(f"chunk {r}: its pages use another PageLayout than chunk 0's")
        if id(chunk.pages) in seen:
            raise ValueError(f"chunk {r}: its sequence already has a chunk in this step")
        seen.add(id(chunk.pages))
        if n == 0:
            raise ValueError(f"chunk {r} is empty")
        if n > layout.max_chunk:
            raise ValueError(f"chunk {r} has {n} tokens, more than max_chunk={layout.max_chunk}")
        if chunk.start < 0 or chunk.start + n > chunk.pages.end:
            raise ValueError(f"chunk {r} covers positions {chunk.start}..{chunk.start + n - 1} but its pages "
                             f"cover 0..{chunk.pages.end - 1}: grow them first")
        if chunk.logits not in ("last", "all", "none"):
            raise ValueError(f"chunk {r}: logits must be 'last', 'all' or 'none', not {chunk.logits!r}")
        row = len(ids)
        first.append(row)
        last.append(row + n - 1)
        ids.extend(int(t) for t in chunk.token_ids)
        positions.extend(range(chunk.start, chunk.start + n))
        token_seq.extend([r] * n)
        emit_from.extend([chunk.emit_from] * n)
        picked = range(n) if chunk.logits == "all" else [n - 1] if chunk.logits == "last" else []
        logit_rows.extend(row + i for i in picked)
        owners.extend((r, chunk.start + i) for i in picked)
    emits = {}
    for name, kind in EMIT_KINDS.items():
        m = rates.get(kind, 0)
        emits[name] = [t for t, p in enumerate(positions) if m and (p + 1) % m == 0 and p >= emit_from[t]]

    def ints(values) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64).reshape(-1)).to(device)

    def table(rows) -> torch.Tensor:  # the requests' page rows (int32 arrays), stacked as they are
        return torch.from_numpy(np.stack(rows).astype(np.int32, copy=False)).to(device)

    return StepBatch(
        input_ids=ints(ids), positions=ints(positions), token_seq=ints(token_seq), seq_first=ints(first),
        seq_last=ints(last), logit_rows=ints(logit_rows),
        window_table=table([c.pages.window_row for c in chunks]),
        comp_table=table([c.pages.comp_row for c in chunks]),
        slot=ints([c.pages.slot for c in chunks]), emit_csa=ints(emits["emit_csa"]), emit_hca=ints(emits["emit_hca"]),
        logit_owners=tuple(owners))


def pad_step(batch: StepBatch, tokens: int, seqs: int, rates: dict[str, int],
             logits: int | None = None) -> StepBatch | None:
    """``batch`` padded to ``tokens`` rows, ``seqs`` sequences and ``logits`` logits rows (default
    ``seqs``; ``padded_sizes``), or None when it does not fit (more rows than ``tokens - (seqs - R)``,
    more sequences than ``seqs``, more logits rows than ``logits``).

    The real rows and sequences come first, unchanged. Each padding sequence holds one row (the last
    the rest), all at position 0 over page 0 and slot 0: the pools' trash, so whatever they write
    lands where no real row reads. Every padding row is token 0 at position 0 and reads only that
    position, so all compute the same numbers and pick the same experts: a learned-routing MoE
    reads one padding row's experts, not six more per padding row (a speculative small bucket of
    one request pads 1 real row to 8). Extra logits rows repeat row 0; extra emit entries are -1
    (they write to trash). ``tokens == seqs`` with no real rows gives an all-padding step (a
    graph's warm-up and capture)."""
    n, r, n_logits = batch.tokens, int(batch.seq_first.shape[0]), int(batch.logit_rows.shape[0])
    pad_seqs = seqs - r
    pad_rows = tokens - n
    sizes = padded_sizes(tokens, seqs, rates, logits)
    if pad_seqs < 0 or n_logits > sizes["L"] or (pad_seqs == 0 and pad_rows) or pad_rows < pad_seqs:
        return None
    if batch.emit_csa.shape[0] > sizes["Ec"] or batch.emit_hca.shape[0] > sizes["Eh"]:
        return None
    lengths = [1] * pad_seqs
    if pad_seqs:
        lengths[-1] += pad_rows - pad_seqs
    firsts = torch.tensor([n + sum(lengths[:i]) for i in range(pad_seqs)], dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    seq_of_row = torch.repeat_interleave(torch.arange(r, seqs, dtype=torch.long), lens)

    def cat(t: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, tail.to(t.dtype)])

    def fill(t: torch.Tensor, size: int, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((size - t.shape[0],), value, dtype=t.dtype)])

    def table(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.zeros((pad_seqs, t.shape[1]), dtype=t.dtype)])

    return StepBatch(
        input_ids=cat(batch.input_ids, torch.zeros(pad_rows, dtype=torch.long)),
        positions=cat(batch.positions, torch.zeros(pad_rows, dtype=torch.long)),
        token_seq=cat(batch.token_seq, seq_of_row),
        seq_first=cat(batch.seq_first, firsts), seq_last=cat(batch.seq_last, firsts + lens - 1),
        logit_rows=fill(batch.logit_rows, sizes["L"], 0), window_table=table(batch.window_table),
        comp_table=table(batch.comp_table), slot=cat(batch.slot, torch.zeros(pad_seqs, dtype=torch.long)),
        emit_csa=fill(batch.emit_csa, sizes["Ec"], -1), emit_hca=fill(batch.emit_hca, sizes["Eh"], -1),
        logit_owners=batch.logit_owners)


def padding_step(tokens: int, seqs: int, rates: dict[str, int], window_slots: int, comp_entries: int,
                 logits: int | None = None) -> StepBatch:
    """A step of padding rows only, in the shapes ``pad_step`` gives (a graph's warm-up and capture)."""
    def empty(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    none = StepBatch(empty(0), empty(0), empty(0), empty(0), empty(0), empty(0),
                     empty(0, window_slots, dtype=torch.int32), empty(0, comp_entries, dtype=torch.int32), empty(0),
                     empty(0), empty(0), ())
    out = pad_step(none, tokens, seqs, rates, logits)
    assert out is not None
    return out
