"""Constant folding: evaluate at compile time what depends only on constants.

Folding runs op references at compile time, on IR that may come from a crafted ONNX file, so it
runs only what ``get_op`` admits (ds4c's ops, ``sym.*`` and ``ds4c.ir.allowed_aten``: no op that
reads a file, writes in place or draws random numbers); anything else is an ``IRError`` before
any op runs.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4c.errors import IRError
from ds4c.ir.graph import Graph, GraphInput, Op, Value, map_values
from ds4c.ir.registry import get_op, split_results
from ds4c.ir.types import ScalarType, TensorType
from ds4c.passes.cse import is_deterministic
from ds4c.passes.manager import PassContext, register_pass

# A folded tensor is stored with the program: bound its size. Ops with no constant tensor operand
# (arange, full, zeros of static shape) are cheap to recompute, so only small ones are folded.
MAX_FOLDED_BYTES = 16 << 20
MAX_SOURCELESS_BYTES = 64 << 10


def _as_device_free(obj: Any) -> Any:
    if isinstance(obj, torch.device):
        return torch.device("cpu")
    if isinstance(obj, list):
        return [_as_device_free(o) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_as_device_free(o) for o in obj)
    return obj


@register_pass("fold_constants")
def fold_constants(graph: Graph, ctx: PassContext) -> Graph:
    """Evaluate pure ops whose operands are all constants; store results as ``const`` inputs.

    Needs: const inputs with data attached. Guarantees: no pure deterministic op has only
    constant operands (within the size limits); scalar results become literals. Weights
    (``param``) are never folded: they may be referenced, not embedded.

        const %inv_freq: f32[4]
        %arange = aten.arange.start(0, 16, dtype=dtype(i64), device=device("cpu")) : i64[16]
        %outer = aten.mul.Tensor(%unsqueeze, %inv_freq) : f32[16,4]      ->  const %outer: f32[16,4]
        %cos = aten.cos.default(%outer) : f32[16,4]                      ->  const %cos: f32[16,4]
    """
    max_bytes = int(ctx.options.get("max_folded_bytes", MAX_FOLDED_BYTES))
    known: dict[Value, Any] = {v: graph.constants[v.name] for v in graph.inputs_of_kind("const")
                               if v.name in graph.constants}
    literal: dict[Value, Any] = {}
    new_inputs: list[GraphInput] = []
    constants = dict(graph.constants)
    ops: list[Op] = []
    returned = set(graph.output_values())
    for op in graph.ops:
        if literal:
            op = op.replace(args=map_values(op.args, lambda v: literal.get(v, v)),
                            kwargs=map_values(op.kwargs, lambda v: literal.get(v, v)))
        operands = op.operands
        opdef = get_op(op.name)
        foldable = (opdef.pure and bool(op.results) and is_deterministic(op.name) and all(v in known for v in operands)
                    and not any(isinstance(r.type, TensorType) and not r.type.is_static for r in op.results)
                    and not any(isinstance(r.type, ScalarType) and r in returned for r in op.results))
        if foldable:
            has_tensor_source = any(isinstance(known[v], torch.Tensor) for v in operands)
            limit = max_bytes if has_tensor_source else MAX_SOURCELESS_BYTES
            sizes = [r.type.nbytes() or 0 for r in op.results if isinstance(r.type, TensorType)]
            if sum(sizes) > limit:
                foldable = False
        if not foldable or not ctx.allow_rewrite(f"fold {op.name} -> %{op.results[0].name}"):
            ops.append(op)
            continue
        args = _as_device_free(map_values(op.args, known.__getitem__))
        kwargs = {k: _as_device_free(v) for k, v in map_values(op.kwargs, known.__getitem__).items()}
        try:
            outs = split_results(opdef.reference(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - malformed IR (ONNX import, hand-written text), reported by op
            raise IRError(f"fold_constants: op {op.name} -> %{op.results[0].name} fails on its constant operands "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check its arguments "
                          "against the op's signature") from None
        if len(outs) != len(op.results):
            raise IRError(f"fold_constants: op {op.name} -> %{op.results[0].name} computes {len(outs)} results, "
                          f"declares {len(op.results)}; fix the op's result list")
        for r, o in zip(op.results, outs, strict=True):
            if isinstance(r.type, ScalarType):
                literal[r] = o if not isinstance(o, torch.Tensor) else o.item()
                known[r] = literal[r]
            else:
                t = o.detach().contiguous().clone()
                constants[r.name] = t
                new_inputs.append(GraphInput("const", r))
                known[r] = t
    return graph.copy(ops=ops, inputs=list(graph.inputs) + new_inputs, constants=constants)
