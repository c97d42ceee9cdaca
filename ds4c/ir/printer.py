"""Deterministic textual form of the IR.

```
graph @decode(input %input_ids: i64[B,1], param %model.norm.weight: f32[64], state %layers.0.window_kv: f32[B,8,32]) {
  %embedding = aten.embedding.default(%model.embed_tokens.weight, %input_ids) : f32[B,1,64] loc("model.embed_tokens")
  %topk, %topk_1 = aten.topk.default(%scores, 2) : f32[B,1,2], i64[B,1,2]
  return logits=%linear_9, layers.0.window_kv=%index_put
}
```
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ds4c.errors import IRError
from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.types import dtype_name


def format_literal(obj: Any) -> str:
    if isinstance(obj, Value):
        return f"%{obj.name}"
    if obj is None:
        return "none"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return repr(obj)
    if isinstance(obj, str):
        return json.dumps(obj)
    if isinstance(obj, torch.dtype):
        return f"dtype({dtype_name(obj)})"
    if isinstance(obj, torch.device):
        return f"device({json.dumps(str(obj))})"
    if isinstance(obj, torch.layout):
        return f"layout({str(obj).removeprefix('torch.')})"
    if isinstance(obj, torch.memory_format):
        return f"memfmt({str(obj).removeprefix('torch.')})"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(format_literal(o) for o in obj) + "]"
    raise IRError(f"cannot print literal {obj!r} of type {type(obj).__name__} in IR text")


def format_op(op: Op) -> str:
    parts = [format_literal(a) for a in op.args]
    parts += [f"{k}={format_literal(v)}" for k, v in op.kwargs.items()]
    call = f"{op.name}({', '.join(parts)})"
    if op.results:
        lhs = ", ".join(f"%{r.name}" for r in op.results)
        types = ", ".join(str(r.type) for r in op.results)
        text = f"{lhs} = {call} : {types}"
    else:
        text = call
    if op.loc:
        text += f" loc({json.dumps(op.loc)})"
    return text


def format_signature(graph: Graph) -> str:
    ins = ", ".join(f"{i.kind} %{i.value.name}: {i.value.type}" for i in graph.inputs)
    return f"graph @{graph.name}({ins})"


def print_graph(graph: Graph) -> str:
    lines = [format_signature(graph) + " {"]
    lines += ["  " + format_op(op) for op in graph.ops]
    outs = ", ".join(f"{name}=%{v.name}" for name, v in graph.outputs)
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines) + "\n"
