"""Which part of a whole tensor a rank of a sharded program holds: a list of slices per tensor
(``{"dim", "start", "stop", "of"[, "chunks"]}``: along ``dim``, of ``of`` rows (per chunk, when the
dimension holds ``chunks`` parts one after the other, e.g. gate and up rows), rows ``start ..
stop - 1``), as ``shard_experts`` records them and loaders read them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ds4c.errors import ArtifactError

__all__ = ["leading_rows", "slice_shape", "slice_tensor", "whole_shape", "whole_spec"]


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


def slice_shape(shape: tuple[int, ...] | list[int], slices: list[dict]) -> tuple[int, ...]:
    """The shape of a rank's slice of a whole tensor of ``shape`` (``whole_shape`` undoes it)."""
    out = list(shape)
    for sl in slices:
        out[sl["dim"]] = (sl["stop"] - sl["start"]) * sl.get("chunks", 1)
    return tuple(out)


def whole_spec(spec: Mapping[str, tuple[Any, torch.dtype]], shard: Mapping[str, list[dict]]
               ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``spec`` (name -> (shape, dtype)) with the whole shapes of the tensors ``shard`` slices."""
    return {k: (whole_shape(s, shard[k]) if k in shard else tuple(s), d) for k, (s, d) in spec.items()}


def leading_rows(slices: list[dict]) -> tuple[tuple[int, int] | None, list[dict]]:
    """((start, stop) of a leading slice along dimension 0, or None; the slices after it): a loader
    that can read rows alone (experts stored or drawn one at a time) reads those, then cuts the rest."""
    if slices and slices[0]["dim"] == 0 and slices[0].get("chunks", 1) == 1:
        return (slices[0]["start"], slices[0]["stop"]), list(slices[1:])
    return None, list(slices)
