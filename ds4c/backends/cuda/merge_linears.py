"""Sibling linears as one GEMM, at load (kernel backends).

In a decode step every linear is a GEMV bound by its weight bytes, and a small one cannot reach the
bandwidth a large one does: V4-Flash's attention input feeds ``q_a`` (4096->1024), ``kv``
(4096->512), the compressor's and the indexer's projections, each a few MB, each a cuBLAS split-K
GEMV plus its reduction kernel. Linears that read the same activation are one GEMM over their
concatenated weights, sliced after::

    %q = aten.linear.default(%x, %wq)           %y = aten.linear.default(%x, %cat(wq,wkv))
    %kv = aten.linear.default(%x, %wkv)   ->    %q = aten.slice.Tensor(%y, -1, 0, 1024)
                                                %kv = aten.slice.Tensor(%y, -1, 1024, 1536)

The concatenated weights are built once here, from the weights the model was loaded with; the
sliced results keep their names (stream schedules and plans key ops by them). Only plain
bias-free linears over parameters of one dtype and width merge; packed weights (``linear.packed``)
and host-resident weights (``--hbm-budget``) are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ds4c.ir.graph import Graph, GraphInput, Op, Value
from ds4c.ir.types import TensorType


def merged_name(names: list[str]) -> str:
    """The weight name of the concatenation of ``names`` (rows in this order)."""
    return "cat(" + ",".join(names) + ")"


def merged_parts(name: str) -> list[str] | None:
    """The part names of a concatenation ``merged_name`` made, or None for any other weight name."""
    return name[4:-1].split(",") if name.startswith("cat(") and name.endswith(")") else None


def with_merged_views(weights: Mapping[str, torch.Tensor],
                      rows: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """``weights`` plus, for each concatenation this module made (``cat(a,b)``) whose parts are
    missing, the parts as row views of it (no copy); ``rows``: each part's row count. Lets a
    loaded model's ``weights`` feed another ``ds4c.load(..., weights=)``."""
    out = dict(weights)
    for key, t in weights.items():
        names = merged_parts(key)
        if names is None or all(n in out for n in names) or not all(n in rows for n in names):
            continue
        if sum(rows[n] for n in names) != t.shape[0]:
            continue
        for n, part in zip(names, torch.split(t, [rows[n] for n in names], 0), strict=True):
            out.setdefault(n, part)
    return out


def _plain_linear(op: Op, params: set[Value]) -> bool:
    return (op.name == "aten.linear.default" and not op.kwargs and len(op.args) in (2, 3)
            and (len(op.args) == 2 or op.args[2] is None) and isinstance(op.args[0], Value)
            and op.args[1] in params and isinstance(op.args[1].type, TensorType) and op.args[1].type.rank == 2
            and isinstance(op.results[0].type, TensorType))


def merge_sibling_linears(graphs: Mapping[str, Graph], weights: dict[str, torch.Tensor],
                          keep: set[str] = frozenset()) -> tuple[dict[str, Graph], dict[str, torch.Tensor], int]:
    """(graphs with sibling linears merged, weights with the concatenations added and the merged
    originals nothing reads any more dropped, number of linears merged away). ``keep``: weight
    names never to merge (host-resident ones)."""
    out: dict[str, Graph] = {}
    merged_weights: dict[str, torch.Tensor] = {}
    removed = 0
    for name, g in graphs.items():
        params = {v for v in g.inputs_of_kind("param") if v.name not in keep and v.name in weights}
        groups: dict[tuple, list[Op]] = {}
        for op in g.ops:
            if _plain_linear(op, params):
                w = op.args[1]
                key = (op.args[0], w.type.dtype, w.type.shape[1], weights[w.name].device)
                groups.setdefault(key, []).append(op)
        groups = {k: v for k, v in groups.items() if len(v) > 1}
        if not groups:
            out[name] = g
            continue
        first_of = {ops[0]: ops for ops in groups.values()}
        member = {op for ops in groups.values() for op in ops}
        taken = g.value_names()
        new_ops: list[Op] = []
        new_inputs: list[GraphInput] = []
        for op in g.ops:
            if op in first_of:
                ops = first_of[op]
                names = [o.args[1].name for o in ops]
                wname = merged_name(names)
                if wname not in merged_weights:
                    merged_weights[wname] = torch.cat([weights[n] for n in names], 0)
                sizes = [int(o.args[1].type.shape[0]) for o in ops]
                w_val = Value(wname, TensorType(ops[0].args[1].type.dtype, (sum(sizes), ops[0].args[1].type.shape[1])))
                new_inputs.append(GraphInput("param", w_val))
                x = op.args[0]
                rtype = op.results[0].type
                y_name = g.fresh_name(f"{op.results[0].name}_merged", taken)
                taken.add(y_name)
                y = Value(y_name, TensorType(rtype.dtype, (*rtype.shape[:-1], sum(sizes))))
                new_ops.append(Op("aten.linear.default", (x, w_val), {}, (y,), loc=op.loc))
                start = 0
                for o, n in zip(ops, sizes, strict=True):
                    new_ops.append(Op("aten.slice.Tensor", (y, -1, start, start + n), {}, o.results, loc=o.loc))
                    start += n
                removed += len(ops) - 1
            elif op not in member:
                new_ops.append(op)
        read = {v for o in new_ops for v in o.operands}
        inputs = [gi for gi in g.inputs if gi.kind != "param" or gi.value in read] + new_inputs
        out[name] = g.copy(ops=new_ops, inputs=inputs)
    if not merged_weights:
        return dict(graphs), weights, 0
    read_names = {gi.value.name for g in out.values() for gi in g.inputs if gi.kind == "param"}
    kept = {k: v for k, v in weights.items() if k in read_names}
    kept.update(merged_weights)
    return out, kept, removed
