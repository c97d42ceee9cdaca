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

import torch

from ds4c.runtime.pages import RequestPages

__all__ = ["Chunk", "StepBatch", "build_step"]

_EMIT_KINDS = {"emit_csa": "compressed_sparse_attention", "emit_hca": "heavily_compressed_attention"}


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
        if chunk.pages.layout != layout:
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
    for name, kind in _EMIT_KINDS.items():
        m = rates.get(kind, 0)
        emits[name] = [t for t, p in enumerate(positions) if m and (p + 1) % m == 0 and p >= emit_from[t]]

    def ints(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    return StepBatch(
        input_ids=ints(ids), positions=ints(positions), token_seq=ints(token_seq), seq_first=ints(first),
        seq_last=ints(last), logit_rows=ints(logit_rows),
        window_table=ints([c.pages.window_row for c in chunks], torch.int32),
        comp_table=ints([c.pages.comp_row for c in chunks], torch.int32),
        slot=ints([c.pages.slot for c in chunks]), emit_csa=ints(emits["emit_csa"]), emit_hca=ints(emits["emit_hca"]),
        logit_owners=tuple(owners))
