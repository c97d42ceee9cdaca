"""The compiled artifact: manifest + IR text per entry point + constants + (optionally) weights.

Members of a ``.ds4`` file (see ds4c.artifact.container for the container itself):

- ``manifest.json``: format version, ds4c version, target, model config, pipeline, entry points,
  model state layout, weight source and transforms, sha256 of every member;
- ``ir/<entry>.ds4ir``: the final IR of each entry point, as text;
- ``consts/<entry>.safetensors``: the constants those graphs read (RoPE tables, folded values);
- ``weights.safetensors``: the weights, when embedded; otherwise the manifest references a
  checkpoint directory or a preset seed and lists the transforms to apply at load;
- ``kernels/...``: generated kernels (source and binaries), when a device backend made any.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ds4c.artifact.container import open_container, write_container
from ds4c.errors import ArtifactError
from ds4c.ir.graph import Program
from ds4c.ir.parser import parse_graph
from ds4c.ir.printer import print_graph

WEIGHTS_MEMBER = "weights.safetensors"


class Artifact:
    """An in-memory compiled model. ``save`` writes it atomically; ``ds4c.load`` runs it."""

    def __init__(self, manifest: dict[str, Any], program: Program, weights: dict[str, torch.Tensor] | None,
                 kernels: dict[str, bytes] | None = None, extras: dict[str, bytes] | None = None):
        self.manifest = manifest
        self.program = program
        self.weights = weights
        self.kernels = dict(kernels or {})
        self.extras = dict(extras or {})  # e.g. tokenizer/tokenizer.json

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    def ir_text(self, entry: str) -> str:
        return print_graph(self.program.graphs[entry])

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save, save_file

        path = Path(path)
        members: dict[str, Any] = {}
        for name, g in self.program.graphs.items():
            members[f"ir/{name}.ds4ir"] = print_graph(g).encode()
            members[f"consts/{name}.safetensors"] = save({k: v.contiguous() for k, v in g.constants.items()})
        for name, blob in self.kernels.items():
            members[f"kernels/{name}"] = blob
        members.update(self.extras)
        tmpdir = None
        try:
            if self.weights is not None:
                parent = path.resolve().parent
                tmpdir = tempfile.TemporaryDirectory(dir=parent if parent.exists() else None)
                wpath = Path(tmpdir.name) / WEIGHTS_MEMBER
                save_file({k: v.contiguous() for k, v in self.weights.items()}, str(wpath))
                members[WEIGHTS_MEMBER] = wpath
            write_container(path, self.manifest, members)
        finally:
            if tmpdir is not None:
                tmpdir.cleanup()
        return path

    def __repr__(self) -> str:
        ops = {n: len(g.ops) for n, g in self.program.graphs.items()}
        return f"Artifact(target={self.target}, weights={self.manifest['weights']['mode']}, ops={ops})"


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], Program, Any]:
    """Open and verify an artifact; return (manifest, program, container)."""
    from safetensors.torch import load

    container = open_container(path)
    manifest = container.manifest
    for key in ("entry_points", "weights", "state", "model", "target"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest has no '{key}' section; the artifact is incomplete — recompile it")
    graphs = {}
    for name, ep in manifest["entry_points"].items():
        text = container.read_bytes(ep["ir"]).decode()
        consts = load(container.read_bytes(ep["consts"]))
        graphs[name] = parse_graph(text, consts)
    attrs = {"pipeline": manifest.get("pipeline", [])}
    if manifest.get("max_context"):
        attrs["max_context"] = int(manifest["max_context"])
    return manifest, Program(graphs, attrs), container
