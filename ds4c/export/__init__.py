"""Interchange: a compiled artifact's graph as ONNX or MLIR, for toolchains outside ds4c.

    ds4c export tiny-cpu.ds4 --format onnx -o tiny.onnx          (--entry prefill|decode, --batch, --seq)
    ds4c.export.export("tiny-cpu.ds4", "stablehlo", "tiny.mlir", entry="decode")

Every format starts from the *compiled* graph (after fusion, precision and memory passes), lowered
to an fx module (``ds4c.backends.fx.to_graph_module``) and captured by ``torch.export`` with static
shapes (``batch`` x ``seq`` tokens; decode takes one token). The signature is the IR's: inputs
``input_ids`` (+ ``position`` and the model state, named as in the manifest, for decode); outputs
``logits`` and the state. Weights are embedded.

- ``onnx`` (``ds4c.export.onnx``): opset 21 through ``torch.onnx.export(dynamo=True)``; each fused
  ds4c op is a node of domain ``ds4c`` calling a model-local function (onnxruntime inlines it), with
  the op's IR attributes on the node; quantised weights appear as ``DequantizeLinear`` (QDQ).
  ``ds4c compile model.onnx`` imports such a file back (``ds4c.frontend.onnx_import``).
- ``mlir-torch``, ``mlir-linalg``, ``stablehlo``, ``tosa`` (``ds4c.export.mlir``): MLIR text through
  ``torch_mlir.fx.export_and_import``; fused ops are traced in through their references (MoE in its
  gather formulation, which has no data-dependent shapes).

Outputs are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import ConfigError, InputError
from ds4c.ir.graph import Graph, Program

FORMATS = ("onnx", "mlir-torch", "mlir-linalg", "stablehlo", "tosa")
ENTRIES = ("prefill", "decode")
DEFAULT_SEQ = 16


@dataclass
class ExportSource:
    """What an export reads: the artifact's manifest, its compiled program and its weights (as stored)."""

    manifest: dict[str, Any]
    program: Program
    weights: dict[str, torch.Tensor]


def open_source(artifact_or_path: Any) -> ExportSource:
    """An ``Artifact`` (in memory), a ``CompiledModel`` or the path of a ``.ds4`` file."""
    from ds4c.artifact.artifact import Artifact
    from ds4c.runtime.model import CompiledModel, load

    if isinstance(artifact_or_path, Artifact):
        if artifact_or_path.weights is None:  # weights referenced: let the runtime materialise them
            with tempfile.TemporaryDirectory() as tmp:
                path = artifact_or_path.save(Path(tmp) / "model.ds4")
                return open_source(load(path, "cpu", backend="reference"))
        return ExportSource(artifact_or_path.manifest, artifact_or_path.program, dict(artifact_or_path.weights))
    if isinstance(artifact_or_path, CompiledModel):
        return ExportSource(artifact_or_path.manifest, artifact_or_path.program, artifact_or_path.weights)
    if isinstance(artifact_or_path, str | os.PathLike):
        return open_source(load(artifact_or_path, "cpu", backend="reference"))
    raise InputError(f"cannot export a {type(artifact_or_path).__name__}; pass a .ds4 path or an Artifact")


def entry_graph(src: ExportSource, entry: str) -> Graph:
    if entry not in src.program.graphs:
        raise InputError(f"the artifact has no entry point '{entry}'; it has {', '.join(src.program.graphs)}")
    return src.program.graphs[entry]


def example_inputs(src: ExportSource, graph: Graph, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """One tensor per ``input``/``state`` of ``graph``, with the static sizes the export fixes."""
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    max_context = int(src.manifest["max_context"])
    if graph.name == "decode":
        seq = 1
    elif not 1 <= seq <= max_context:
        raise InputError(f"--seq {seq} is outside 1..{max_context} (the artifact's maximum context)")
    state = {s["name"]: s for s in src.manifest["state"]}
    out: dict[str, torch.Tensor] = {}
    for gi in graph.inputs:
        name = gi.value.name
        if gi.kind == "state":
            s = state[name]
            shape = [batch if d == "B" else int(d) for d in s["shape"]]
            out[name] = torch.full(shape, float(s["fill"]), dtype=gi.value.type.dtype)
        elif gi.kind == "input":
            if name == "input_ids":
                out[name] = torch.zeros(batch, seq, dtype=torch.int64)
            elif name == "position":
                out[name] = torch.tensor(seq, dtype=torch.int64)
            else:
                raise InputError(f"graph @{graph.name} has an input '{name}' that export does not know how to size")
    return out


def widen(graph: Graph, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[Graph, dict]:
    """The graph computing in ``dtype`` where it computed in a narrower float (bf16, fp16).

    Packed weights keep their bytes (``quant.dequant`` then yields ``dtype``); only the compute
    type changes, for runtimes without bf16 kernels (onnxruntime's CPU provider).
    """
    from ds4c.ir.graph import GraphInput, Op, Value, map_values
    from ds4c.ir.types import TensorType

    narrow = {torch.bfloat16, torch.float16} - {dtype}

    def literal(x: Any) -> Any:
        if isinstance(x, torch.dtype):
            return dtype if x in narrow else x
        if isinstance(x, list | tuple):
            return type(x)(literal(v) for v in x)
        if isinstance(x, dict):
            return {k: literal(v) for k, v in x.items()}
        return x

    env: dict[Value, Value] = {}

    def value(v: Value) -> Value:
        if v not in env:
            t = v.type
            env[v] = Value(v.name, TensorType(dtype, t.shape)) if isinstance(t, TensorType) and t.dtype in narrow else v
        return env[v]

    inputs = [GraphInput(i.kind, value(i.value)) for i in graph.inputs]
    ops = [Op(op.name, map_values(literal(op.args), value), map_values(literal(op.kwargs), value),
              tuple(value(r) for r in op.results), op.loc) for op in graph.ops]
    outputs = [(n, value(v)) for n, v in graph.outputs]
    constants = {k: v.to(dtype) if v.dtype in narrow else v for k, v in graph.constants.items()}
    params = {i.value.name for i in graph.inputs if i.kind == "param"}
    new_weights = {k: (v.to(dtype) if v.dtype in narrow else v) for k, v in weights.items() if k in params}
    return Graph(graph.name, inputs, ops, outputs, constants), new_weights


def positive_dims(graph: Graph) -> Graph:
    """ATen ops with a negative ``dim`` literal rewritten to count from the front (same values).

    torch-mlir's linalg lowering of ``aten.scatter`` with ``dim=-1`` aborts the process (LLVM out of
    memory) where ``dim=rank-1`` lowers; other consumers are indifferent, so every export uses this.
    """
    from ds4c.ir.registry import TorchOpDef, get_op
    from ds4c.ir.types import TensorType

    ops = []
    for op in graph.ops:
        opdef = get_op(op.name) if op.name.startswith("aten.") else None
        if isinstance(opdef, TorchOpDef) and op.args and isinstance(getattr(op.args[0], "type", None), TensorType):
            names = [a.name for a in opdef.schema.arguments]
            if "dim" in names and str(opdef.schema.arguments[names.index("dim")].type) == "int":
                i = names.index("dim")
                rank = op.args[0].type.rank
                if i < len(op.args) and isinstance(op.args[i], int) and op.args[i] < 0 and rank:
                    op = op.replace(args=(*op.args[:i], op.args[i] % rank, *op.args[i + 1:]))
                elif isinstance(op.kwargs.get("dim"), int) and op.kwargs["dim"] < 0 and rank:
                    op = op.replace(kwargs={**op.kwargs, "dim": op.kwargs["dim"] % rank})
        ops.append(op)
    return graph.copy(ops=ops)


def static_module(graph: Graph, weights: dict[str, torch.Tensor],
                  lower_fused: Callable[..., Any] | None) -> tuple[torch.fx.GraphModule, list[str]]:
    """The graph as an fx module (weights as buffers); arguments in graph order (inputs, then state)."""
    from ds4c.backends.fx import to_graph_module

    params = {v.name: weights[v.name] for v in graph.inputs_of_kind("param")}
    return to_graph_module(graph, params, lower_fused=lower_fused)


def capture(graph: Graph, src: ExportSource, batch: int, seq: int, lower_fused: Callable[..., Any] | None,
            dtype: torch.dtype | None = None) -> tuple[torch.export.ExportedProgram, list[str], dict]:
    """torch.export of the entry with static shapes (computing in ``dtype`` if given, see ``widen``);
    returns (program, argument names, example inputs)."""
    weights = src.weights
    if dtype is not None:
        graph, weights = widen(graph, weights, dtype)
    gm, names = static_module(positive_dims(graph), weights, lower_fused)
    feeds = example_inputs(src, graph, batch, seq)
    with torch.no_grad():
        ep = torch.export.export(gm, tuple(feeds[n] for n in names), strict=False)
    return ep, names, feeds


def write_atomic(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary file next to ``out``, then rename it over ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def compute_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in ("float32", "fp32"):
        raise ConfigError(f"--dtype {name}: only float32 can be asked for (it widens bf16 compute; packed weights "
                          "stay packed); leave it out to keep the artifact's compute dtype")
    return torch.float32


def export(artifact_or_path: Any, format: str, out: str | os.PathLike, *, entry: str = "prefill",
           batch: int = 1, seq: int = DEFAULT_SEQ, dtype: str | None = None) -> Path:
    """Export one entry point of a compiled artifact to ``format`` at ``out``; returns the path.

    ``dtype="float32"`` computes in fp32 where the artifact computes in bf16 (see ``widen``):
    onnxruntime's CPU provider lacks bf16 kernels for most ops.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    if entry not in ENTRIES:
        raise ConfigError(f"unknown entry point '{entry}'; choose prefill or decode")
    src = open_source(artifact_or_path)
    if format == "onnx":
        from ds4c.export.onnx import export_onnx

        return export_onnx(src, out, entry=entry, batch=batch, seq=seq, dtype=compute_dtype(dtype))
    from ds4c.export.mlir import export_mlir

    return export_mlir(src, out, dialect=format, entry=entry, batch=batch, seq=seq, dtype=compute_dtype(dtype))


__all__ = ["FORMATS", "export", "ExportSource", "open_source"]
