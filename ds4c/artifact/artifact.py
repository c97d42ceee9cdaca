"""The compiled artifact: manifest + IR text per entry point + constants + (optionally) weights.

Members of a ``.ds4`` file (see ds4c.artifact.container for the container itself):

- ``manifest.json``: format version, ds4c version, target, model config, pipeline, entry points,
  model state layout, weight source and transforms, sha256 of every member;
- ``ir/<entry>.ds4ir``: the final IR of each entry point, as text;
- ``consts/<entry>.safetensors``: the constants those graphs read (RoPE tables, folded values);
- ``weights.safetensors``: the weights, when embedded; otherwise the manifest references a
  checkpoint directory (with the size and sha256 of every file loading it reads, checked at
  load: ds4c.frontend.file_record) or a preset seed and lists the transforms to apply at load;
- ``kernels/...``: generated kernels (source and binaries), when a device backend made any;
- ``signature.json``: the manifest's signature (``ds4c.artifact.signing``), unless saved unsigned.

``read_artifact`` refuses an artifact whose signature does not match its manifest, and checks the
manifest's sections against ``MANIFEST_SCHEMA`` (types and shapes of what the runtime reads), so
a damaged or hand-edited manifest is an ``ArtifactError`` naming the field, not a crash later.
The IR of each entry point is verified as the compiler verifies it after every pass
(``ds4c.ir.verifier.verify_graph``: SSA form, admitted ops, each result's inferred type, the
constants' data), so IR edited by hand is refused naming the op.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ds4c.artifact.container import open_container, temp_beside, write_container
from ds4c.errors import ArtifactError, Ds4cError, VerificationError
from ds4c.ir.graph import Program
from ds4c.ir.parser import parse_graph
from ds4c.ir.printer import print_graph
from ds4c.ir.verifier import verify_graph

WEIGHTS_MEMBER = "weights.safetensors"


class Artifact:
    """An in-memory compiled model. ``save`` writes it atomically; ``ds4c.load`` runs it."""

    def __init__(self, manifest: dict[str, Any], program: Program, weights: dict[str, torch.Tensor] | None,
                 kernels: dict[str, bytes] | None = None, extras: dict[str, bytes] | None = None,
                 ranks: list[Program] | None = None):
        self.manifest = manifest
        self.program = program  # rank 0's of a sharded artifact
        self.ranks = ranks  # every rank's program (ds4c.artifact.sharded), or None
        self.weights = weights
        self.kernels = dict(kernels or {})
        self.extras = dict(extras or {})  # e.g. tokenizer/tokenizer.json

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    def ir_text(self, entry: str) -> str:
        return print_graph(self.program.graphs[entry])

    def save(self, path: str | os.PathLike, *, sign_key: bool | str | os.PathLike = True) -> Path:
        """Write the artifact to ``path`` atomically, signed with this user's key (``sign_key=True``,
        made on first use), with the private key in the file ``sign_key``, or unsigned (False)."""
        from safetensors.torch import save, save_file

        from ds4c.artifact.signing import signer

        path = Path(path)
        sign = signer(sign_key)
        members: dict[str, Any] = {}
        for rank, program in enumerate(self.ranks or [self.program]):
            prefix = "" if self.ranks is None else f"ranks/{rank}/"
            for name, g in program.graphs.items():
                members[f"{prefix}ir/{name}.ds4ir"] = print_graph(g).encode()
                members[f"{prefix}consts/{name}.safetensors"] = save({k: v.contiguous() for k, v in g.constants.items()})
        for name, blob in self.kernels.items():
            members[f"kernels/{name}"] = blob
        members.update(self.extras)
        if self.weights is None:
            write_container(path, self.manifest, members, sign=sign)
            return path
        with temp_beside(path, "weights") as (_, wpath):  # streamed in, then removed (also if killed)
            save_file({k: v.contiguous() for k, v in self.weights.items()}, str(wpath))
            members[WEIGHTS_MEMBER] = wpath
            write_container(path, self.manifest, members, sign=sign)
        return path

    def __repr__(self) -> str:
        ops = {n: len(g.ops) for n, g in self.program.graphs.items()}
        return f"Artifact(target={self.target}, weights={self.manifest['weights']['mode']}, ops={ops})"


def read_artifact(path: str | os.PathLike, rank: int | None = None) -> tuple[dict[str, Any], Program, Any]:
    """Open and verify an artifact; return (manifest, program, container). For a sharded artifact
    (ds4c.artifact.sharded): ``rank``'s manifest and program (None: the whole manifest, rank 0's program)."""
    from ds4c.artifact import signing
    from ds4c.artifact.sharded import rank_manifest

    container = open_container(path)
    try:
        signing.check(container)  # a manifest changed after signing is refused here
        manifest = container.manifest
        check_manifest(manifest, path)
        if rank is not None or "mesh" in manifest:
            own = rank_manifest(manifest, 0 if rank is None else rank, path)
            check_manifest(own, path)
            if rank is not None:
                manifest = own
        else:
            own = manifest
        program = _read_program(container, own, path)
    except BaseException:
        container.close()
        raise
    return manifest, program, container


def _read_program(container: Any, manifest: dict[str, Any], path: str | os.PathLike) -> Program:
    from safetensors import SafetensorError
    from safetensors.torch import load

    graphs = {}
    for name, ep in manifest["entry_points"].items():
        try:
            text = container.read_bytes(ep["ir"]).decode()
        except UnicodeDecodeError:
            raise ArtifactError(f"{path}: member '{ep['ir']}' is not UTF-8 IR text; recompile the artifact") from None
        try:
            consts = load(container.read_bytes(ep["consts"]))
        except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise ArtifactError(f"{path}: member '{ep['consts']}' is not a readable safetensors file "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); recompile the "
                                "artifact") from None
        try:
            graphs[name] = parse_graph(text, consts)
        except Ds4cError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
            # the IR parser's own errors are IRError; anything else is a malformed member
            raise ArtifactError(f"{path}: member '{ep['ir']}' is malformed IR ({type(e).__name__}: {e}); "
                                "recompile the artifact") from None
        try:  # the text parsed; what it says must hold (SSA, operands, every result's inferred type)
            verify_graph(graphs[name], require_constants=True)
        except VerificationError as e:
            raise ArtifactError(f"{path}: member '{ep['ir']}' does not verify: {e}") from None
    attrs = {"pipeline": manifest.get("pipeline", [])}
    if manifest.get("max_context"):
        attrs["max_context"] = int(manifest["max_context"])
    return Program(graphs, attrs)


# -- manifest schema ---------------------------------------------------------------------------------
# What the runtime reads from a manifest, as (type, ...) descriptions checked before anything is
# used: a type; a dict {key: schema} of required keys (other keys are free); ("list", item) and
# ("map", value) for lists and str-keyed dicts of one schema; ("opt", schema) for a key that may be
# missing or null; ("int>=", n) for integers (bools are not); ("shape",) for a state or weight shape.
_INT = ("int>=", 0)
_TENSOR = {"shape": ("list", _INT), "dtype": str}
MANIFEST_SCHEMA: dict[str, Any] = {
    "target": {"name": str},
    "model": {"config": {"vocab_size": ("int>=", 1)}},
    "max_context": ("int>=", 1),
    "pipeline": ("opt", ("list", str)),
    "entry_points": ("map", {"ir": str, "consts": str, "outputs": ("opt", ("list", str))}),
    "state": ("list", {"name": str, "shape": ("list", ("shape",)), "dtype": str, "fill": (int, float)}),
    "weights": {"mode": ("one of", "embed", "reference"), "dtype": str, "tensors": ("map", _TENSOR),
                "source_tensors": ("opt", ("map", _TENSOR)), "transforms": ("opt", ("list", dict)),
                "source": ("opt", {"kind": str})},
    "kernels": ("opt", dict),
    "memory_plan": ("opt", ("map", dict)),
    "schedule": ("opt", ("map", {"member": str})),
    "tokenizer": ("opt", dict),
    "precision": ("opt", dict),
    "mesh": ("opt", {"axes": ("map", ("int>=", 1)), "world": ("int>=", 1)}),
    "ranks": ("opt", ("list", {"entry_points": dict, "weights": dict})),
}


def check_manifest(manifest: Any, where: str | os.PathLike = "artifact") -> None:
    """Check the manifest against ``MANIFEST_SCHEMA``; an ArtifactError names the first bad field."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{where}: the manifest is a {type(manifest).__name__}, not a JSON object; recompile it")
    for key, schema in MANIFEST_SCHEMA.items():
        _check(manifest.get(key), schema, key, where, present=key in manifest)


def _check(value: Any, schema: Any, field: str, where: Any, present: bool = True) -> None:
    def bad(expected: str) -> ArtifactError:
        got = "missing" if not present else f"{type(value).__name__} {_short(value)}"
        return ArtifactError(f"{where}: manifest field '{field}' should be {expected}, got {got}; the artifact is "
                             "damaged or from another ds4c: recompile it")

    if isinstance(schema, tuple) and schema and schema[0] == "opt":
        if present and value is not None:
            _check(value, schema[1], field, where)
        return
    if not present:
        raise bad("present")
    if isinstance(schema, type) or (isinstance(schema, tuple) and all(isinstance(t, type) for t in schema)):
        types = schema if isinstance(schema, tuple) else (schema,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise bad(" or ".join(t.__name__ for t in types))
        if isinstance(value, float) and not value == value:  # NaN fill values and the like
            raise bad("a number")
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise bad("an object")
        for key, sub in schema.items():
            _check(value.get(key), sub, f"{field}.{key}", where, present=key in value)
        return
    kind = schema[0]
    if kind == "list":
        if not isinstance(value, list):
            raise bad("a list")
        for i, item in enumerate(value):
            _check(item, schema[1], f"{field}[{i}]", where)
    elif kind == "map":
        if not isinstance(value, dict):
            raise bad("an object")
        for key, item in value.items():
            _check(item, schema[1], f"{field}.{key}", where)
    elif kind == "int>=":
        if not isinstance(value, int) or isinstance(value, bool) or value < schema[1] or value > 2**62:
            raise bad(f"an integer >= {schema[1]}")
    elif kind == "one of":
        if value not in schema[1:] or not isinstance(value, str):
            raise bad(" or ".join(repr(v) for v in schema[1:]))
    elif kind == "shape":
        if value != "B" and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**40):
            raise bad("a size (an integer >= 0, or 'B')")
    else:  # pragma: no cover - a schema typo
        raise AssertionError(schema)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
