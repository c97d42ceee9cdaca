"""Sharded artifacts: every rank's program in one file, the weights once.

A program compiled for a mesh (``ds4c compile --mesh ep=2,tp=2`` / ``--gpus N``) is one program
per rank: the members ``ranks/<r>/ir/<entry>.ds4ir``, ``ranks/<r>/consts/...`` and
``ranks/<r>/plans/...``. The manifest has

- ``mesh``: the axes and the number of ranks (ds4c.distributed.mesh.Mesh);
- ``ranks``: per rank, the sections that differ between ranks: ``entry_points``, ``precision``,
  ``state``, ``serving``, ``memory_plan``, ``schedule``, ``kernels``, ``lowering``, ``rewrites``,
  ``pipeline`` and ``weights`` (what the rank's program reads, what the source gives it, its
  transforms, and ``shard``: the slices of the whole tensors it holds);
- at the top, the sections all ranks share, rank 0's of those above (so tools that read one
  program, e.g. ``ds4c inspect``'s header, read a real one), and ``weights`` describing the whole
  tensors: embedded once (``weights.safetensors``, in the source's form) or referenced.

``rank_manifest(manifest, r)`` is the manifest rank ``r`` runs: an ordinary one-program manifest,
so everything after loading is the same code as for one GPU. Kernel binaries of the same shapes
are the same members, stored once (their names carry the shapes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ds4c.errors import ArtifactError

__all__ = ["RANK_SECTIONS", "is_sharded", "rank_manifest", "sharded_manifest", "world_of"]

RANK_SECTIONS = ("entry_points", "precision", "state", "serving", "memory_plan", "schedule", "kernels", "lowering",
                 "rewrites", "pipeline", "weights")


def sharded_manifest(ranks: Sequence[Mapping[str, Any]], mesh: Any, whole: Mapping[str, tuple[tuple[int, ...], Any]],
                     *, mode: str, source: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The manifest sections of a program sharded over ``mesh`` from each rank's own sections
    (``ranks``) and the whole tensors they slice (``whole``)."""
    out = {k: v for k, v in ranks[0].items() if k != "weights"}
    out["mesh"] = mesh.to_dict()
    out["ranks"] = [{k: section[k] for k in RANK_SECTIONS if k in section} for section in ranks]
    out["weights"] = {
        "mode": mode,
        "source": dict(source),
        "dtype": str(dtype).removeprefix("torch."),
        "bytes": sum(_numel(s) * d.itemsize for s, d in whole.values()),
        "tensors": {k: {"shape": list(s), "dtype": str(d).removeprefix("torch.")} for k, (s, d) in whole.items()},
        "sharded": True,
        "rank_bytes": [int(section["weights"]["bytes"]) for section in ranks],
    }
    return out


def is_sharded(manifest: Mapping[str, Any]) -> bool:
    return "mesh" in manifest


def world_of(manifest: Mapping[str, Any]) -> int:
    return int(manifest["mesh"]["world"]) if is_sharded(manifest) else 1


def rank_manifest(manifest: Mapping[str, Any], rank: int, where: Any = "artifact") -> dict[str, Any]:
    """The one-program manifest rank ``rank`` runs (``manifest`` itself when it is not sharded)."""
    if not is_sharded(manifest):
        return dict(manifest)
    ranks = manifest.get("ranks")
    world = manifest["mesh"].get("world") if isinstance(manifest.get("mesh"), dict) else None
    if not isinstance(ranks, list) or len(ranks) != world or not all(isinstance(r, dict) for r in ranks):
        raise ArtifactError(f"{where}: manifest field 'ranks' should hold one section per rank of the mesh "
                            f"({world}); the artifact is damaged: recompile it")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ArtifactError(f"{where}: rank {rank} is outside the {world} ranks this artifact is compiled for")
    section = ranks[rank]
    out = {k: v for k, v in manifest.items() if k not in ("ranks", "weights")}
    for key in RANK_SECTIONS:
        if key != "weights":
            out.pop(key, None)
            if key in section:
                out[key] = section[key]
    top = manifest.get("weights")
    own = section.get("weights")
    if not isinstance(top, dict) or not isinstance(own, dict):
        raise ArtifactError(f"{where}: manifest field 'ranks[{rank}].weights' is missing; recompile the artifact")
    out["weights"] = {**{k: v for k, v in top.items() if k not in ("tensors", "rank_bytes", "sharded")}, **own,
                      "whole_tensors": top.get("tensors", {})}
    out["rank"] = rank
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
