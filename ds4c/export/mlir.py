"""MLIR export of a compiled entry point through torch-mlir, for IREE and MLIR-based NPU compilers.

    dialect        torch_mlir output_type    what it is
    mlir-torch     torch                      torch dialect (value semantics), backend contract
    mlir-linalg    linalg-on-tensors          linalg + tensor + arith (IREE's input)
    stablehlo      stablehlo                  StableHLO
    tosa           tosa                       TOSA

Shapes are static (``batch`` x ``seq``): stablehlo and tosa need them (topk's iota, ``aten.size``),
and the artifact's symbolic sizes would be bound anyway by the target toolchain. Fused ds4c ops are
traced in through their portable formulations (``OpDef.portable``: MoE in its gather
formulation, whose shapes do not depend on the routing, where the reference groups tokens by
expert with host-side counts that no static graph can hold; MXFP4 dequantisation without
float8_e8m0).

Formulations chosen so that every dialect lowers and the text uses upstream MLIR dialects only
(torch-mlir's own ``tm_tensor`` dialect cannot be parsed outside torch-mlir):
- negative ``dim`` literals are made non-negative (``ds4c.export.positive_dims``): torch-mlir's
  linalg lowering of ``aten.scatter`` with ``dim=-1`` aborts the process;
- ``topk(sorted=False)`` (MoE routing) is ``sorted=True`` on a non-negative dim (stablehlo and
  linalg reject the other forms), and for k <= ``UNROLL_TOPK_MAX`` k steps of argmax and mask
  (linalg would otherwise emit ``tm_tensor.sort``); larger k (the V4 indexer's 512) keeps
  ``aten.topk``, which linalg lowers to ``tm_tensor.sort`` (IREE reads it);
- ``aten.scatter.value`` (the indexer's selection mask) is ``masked_fill`` of a one-hot mask, not
  ``tm_tensor.scatter``.
``parse_mlir`` reads the text back with torch-mlir's own parser (torch, stablehlo and the upstream
dialects registered).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import ConfigError, IRError
from ds4c.export import ExportSource, capture, entry_graph, write_atomic
from ds4c.ir.graph import Op
from ds4c.ir.registry import get_op
from ds4c.quiet import TORCH_PYTREE_LEAFSPEC

OUTPUT_TYPES = {"mlir-torch": "torch", "mlir-linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa"}


def _as_list(x: Any) -> list[Any]:
    return [x]


def _lower_fused(g: torch.fx.Graph, op: Op, args: tuple, kwargs: dict) -> torch.fx.Node:
    node = g.call_function(get_op(op.name).portable(kwargs), args, kwargs)
    # to_graph_module indexes every lowered fused op's results
    return g.call_function(_as_list, (node,)) if len(op.results) == 1 else node


def _sorted_topk(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``topk(sorted=False)`` (MoE routing) as ``sorted=True`` over a non-negative dim: any order is
    allowed for unsorted results, and torch-mlir's linalg and stablehlo lowerings take only this form."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.topk.default:
            x, k, *rest = node.args
            dim = rest[0] if rest else node.kwargs.get("dim", -1)
            largest = rest[1] if len(rest) > 1 else node.kwargs.get("largest", True)
            rank = len(x.meta["val"].shape)
            node.args, node.kwargs = (x, k, dim % rank, largest, True), {}
    ep.graph_module.recompile()
    return ep


# topk with k up to this is unrolled into k max-and-mask steps (see _topk_by_steps)
UNROLL_TOPK_MAX = 16


def _topk_by_steps(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """topk as k steps of argmax, gather and mask: pure linalg reductions. torch-mlir lowers aten.topk
    to ``tm_tensor.sort``, a dialect of its own that MLIR tools outside torch-mlir cannot parse.
    Results are sorted; among equal values the lower index comes first, as in a stable sort (entries
    equal to -inf are never picked twice, since a picked entry is masked with its own index)."""
    if k > UNROLL_TOPK_MAX:
        return NotImplemented  # keep aten.topk (tm_tensor.sort)
    dim = dim % x.dim()
    score = x if largest else -x
    taken = torch.zeros_like(x, dtype=torch.bool)
    values, indices = [], []
    for _ in range(k):
        masked = torch.where(taken, torch.finfo(x.dtype).min if x.is_floating_point() else torch.iinfo(x.dtype).min,
                             score)
        i = masked.argmax(dim, keepdim=True)
        values.append(x.gather(dim, i))
        indices.append(i)
        taken = taken | (torch.arange(x.shape[dim], device=x.device).reshape(
            [-1 if d == dim else 1 for d in range(x.dim())]) == i)
    return torch.cat(values, dim), torch.cat(indices, dim)


def _scatter_value_by_mask(x: torch.Tensor, dim: int, index: torch.Tensor, value: Any):
    """scatter(x, dim, index, value) as masked_fill(x, hit, value): elementwise linalg instead of
    ``tm_tensor.scatter`` (duplicate indices write the same value, so the mask is exact)."""
    dim = dim % x.dim()
    if any(index.shape[d] != x.shape[d] for d in range(x.dim()) if d != dim):
        return NotImplemented
    positions = torch.arange(x.shape[dim], device=x.device)
    hit = (index.unsqueeze(-1) == positions).any(dim).movedim(-1, dim)
    return x.masked_fill(hit, value)


_PORTABLE_DECOMPOSITIONS = {torch.ops.aten.topk.default: _topk_by_steps,
                          torch.ops.aten.scatter.value: _scatter_value_by_mask}


def mlir_texts(src: ExportSource, dialects: Any, *, entry: str = "prefill", batch: int = 1, seq: int = 16,
               dtype: torch.dtype | None = None) -> dict[str, str]:
    """The entry point as MLIR text in each of ``dialects`` (see the table above).

    Captured, decomposed, imported and lowered to torch-mlir's backend contract once (what
    ``torch_mlir.fx.export_and_import`` does per call); each dialect then lowers a copy of that.
    """
    for d in dialects:
        if d not in OUTPUT_TYPES:
            raise ConfigError(f"unknown MLIR dialect '{d}'; choose one of {', '.join(OUTPUT_TYPES)}")
    from torch_mlir import ir
    from torch_mlir.compiler_utils import OutputType, lower_mlir_module, run_pipeline_with_repro_report
    from torch_mlir.dialects import torch as torch_dialect
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    from torch_mlir.extras.fx_importer import FxImporter

    graph = entry_graph(src, entry)
    captured, names, _ = capture(graph, src, batch, seq, _lower_fused, dtype)
    header = (f"// ds4c export: {src.manifest['target']['name']} artifact, entry @{entry}, batch {batch}"
              + (f", seq {seq}" if entry == "prefill" else "")
              + f"\n// arguments: {', '.join(names)}\n// results: {', '.join(n for n, _ in graph.outputs)}\n")
    ctx = ir.Context()
    torch_dialect.register_dialect(ctx)
    stage = "import"
    out = {}
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # torch's pytree deprecation, raised when torch-mlir copies a LeafSpec: theirs, not the user's
            warnings.filterwarnings("ignore", message=TORCH_PYTREE_LEAFSPEC, category=FutureWarning)
            prog = _sorted_topk(captured).run_decompositions({**get_decomposition_table(), **_PORTABLE_DECOMPOSITIONS})
            importer = FxImporter(context=ctx)
            importer.import_frozen_program(prog, func_name=entry)
            backend = importer.module
            stage = "torch backend contract"
            run_pipeline_with_repro_report(
                backend, "builtin.module(func.func(torch-match-quantized-custom-ops), "
                "torchdynamo-export-to-torch-backend-pipeline{ extra-library=})", "Lowering TorchFX IR -> Torch Backend IR")
            text = str(backend)
            for d in dialects:
                stage = d
                if d == "mlir-torch":
                    out[d] = header + text
                    continue
                with ctx:
                    module = ir.Module.parse(text)
                out[d] = header + str(lower_mlir_module(False, OutputType.get(OUTPUT_TYPES[d]), module))
    except Exception as e:  # torch-mlir reports lowering failures as plain exceptions
        raise IRError(f"torch-mlir could not lower @{entry} ({stage}): {str(e)[:4000]}") from e
    return out


def parse_mlir(text: str) -> Any:
    """Parse MLIR text with torch-mlir's bindings (torch, linalg, stablehlo, tosa, ... registered)."""
    from torch_mlir import ir
    from torch_mlir._mlir_libs import _stablehlo
    from torch_mlir.dialects import torch as torch_dialect

    ctx = ir.Context()
    torch_dialect.register_dialect(ctx)
    _stablehlo.register_dialect(ctx)
    ctx.allow_unregistered_dialects = False
    with ctx:
        return ir.Module.parse(text)


def export_mlir(src: ExportSource, out: str | os.PathLike, *, dialect: str, entry: str = "prefill",
                batch: int = 1, seq: int = 16, dtype: torch.dtype | None = None) -> Path:
    text = mlir_texts(src, [dialect], entry=entry, batch=batch, seq=seq, dtype=dtype)[dialect]
    return write_atomic(out, lambda tmp: tmp.write_text(text))
