"""Which part of a whole tensor a rank of a sharded program holds: a list of slices per tensor
(``{"dim", "start", "stop", "of"[, "chunks"]}``: along ``dim``, of ``of`` rows (per chunk, when the
dimension holds ``chunks`` parts one after the other, e.g. gate and up rows), rows ``start ..
stop - 1``), as ``shard_experts`` records them and loaders read them."""

from __future__ import annotations

import torch

from ds4c.errors import ArtifactError

__all__ = ["slice_tensor", "whole_shape"]


def slice_tensor(t: torch.Tensor, slices: list[dict], name: str = "tensor") -> torch.Tensor:
    """``t`` cut as ``slices`` says (a shard record's list: dim, start, stop, of, chunks)."""
    for sl in slices:
        dim, chunks = sl["dim"], sl.get("chunks", 1)
        if t.shape[dim] != sl["of"] * chunks:
            raise ArtifactError(f"{name} has {t.shape[dim]} rows along dim {dim}, the sharded program expects "
                                f"{sl['of'] * chunks}: the weights are not the ones it was compiled for")
        parts = t.chunk(chunks, dim) if chunks > 1 else (t,)
        cut = [p.narrow(dim, sl["start"], sl["stop"] - sl["start"]) for p in parts]
        t = cut[0] if chunks == 1 else torch.cat(cut, dim)
    return t


def whole_shape(shape: tuple[int, ...] | list[int], slices: list[dict]) -> tuple[int, ...]:
    """The shape of the whole tensor a rank holds ``shape`` of."""
    out = list(shape)
    for sl in slices:
        out[sl["dim"]] = sl["of"] * sl.get("chunks", 1)
    return tuple(out)
