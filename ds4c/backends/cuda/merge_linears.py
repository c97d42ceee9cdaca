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
sliced results keep their names (stream schedules and plans key ops by them). Plain bias-free
linears over parameters of one dtype and width merge, and so do packed ones (``linear.packed``)
of one format, width and activation format: each packed tensor (FP8 values and their 128x128
block scales, INT8 values and row scales, MXFP4 bytes and scales) is concatenated along its rows,
which holds when every part but the last fills whole scale blocks (``_concatenable``), e.g. an FP8
CSA layer's q_a, kv, compressor and indexer projections: seven one-row GEMVs become one.
Measured on an H200 (2026-12-03, flash-slice, graphed decode step, the same run and machine):
FP8 1.117 -> 1.092 ms, FP8 with an FP8 LM head 1.154 -> 1.033 ms. ``DS4C_MERGE_PACKED=0`` keeps
packed siblings apart (benchmarks/decode_variants.py's ``compiled-nomergepacked``).
Host-resident weights (``--hbm-budget``) are left as they are.
"""

from __future__ import annotations

import os
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


_PACKED_KWARGS = {"format", "shape", "act"}  # what a merged linear.packed carries over from its parts


def _packed_linear(op: Op, params: set[Value]) -> bool:
    return (op.name == "linear.packed" and isinstance(op.args[0], Value) and len(op.args) >= 2
            and set(op.kwargs) <= _PACKED_KWARGS and all(a in params for a in op.args[1:])
            and isinstance(op.results[0].type, TensorType))


def _rows(fmt: str, rows: int, k: int) -> list[tuple[int, ...]]:
    from ds4c.quant.formats import get_format

    return [tuple(shape) for shape, _ in get_format(fmt).packed_spec((rows, k)).values()]


def _whole(fmt: str, rows: int, k: int) -> bool:
    """Whether ``rows`` fill whole scale blocks of ``fmt``: twice the rows pack into twice the rows."""
    return [s[0] for s in _rows(fmt, 2 * rows, k)] == [2 * s[0] for s in _rows(fmt, rows, k)]


def _concatenable(fmt: str, rows: list[int], k: int) -> bool:
    """Whether weights of ``rows`` x ``k``, packed in ``fmt``, concatenated tensor by tensor along
    dim 0, are the packing of their row concatenation: every part but the last fills whole scale
    blocks, and the shapes add up."""
    if not all(_whole(fmt, r, k) for r in rows[:-1]):
        return False
    total, parts = _rows(fmt, sum(rows), k), [_rows(fmt, r, k) for r in rows]
    return all(t[0] == sum(p[j][0] for p in parts) and all(p[j][1:] == t[1:] for p in parts)
               for j, t in enumerate(total))


def _mergeable_packed(ops: list[Op]) -> list[Op]:
    """The packed siblings to merge, in row order: those whose rows fill whole scale blocks, and
    one that does not (last); fewer than two: none."""
    fmt, k = ops[0].kwargs["format"], int(ops[0].kwargs["shape"][1])
    rows = {op: int(op.kwargs["shape"][0]) for op in ops}
    whole = [op for op in ops if _whole(fmt, rows[op], k)]
    ragged = [op for op in ops if op not in whole]
    if ragged and _concatenable(fmt, [rows[op] for op in (*whole, ragged[0])], k):
        whole.append(ragged[0])
    return whole if len(whole) > 1 else []


def merge_packed_default() -> bool:
    """Whether packed siblings merge by default (yes, unless ``DS4C_MERGE_PACKED=0``)."""
    return os.environ.get("DS4C_MERGE_PACKED", "1") != "0"


def merge_sibling_linears(graphs: Mapping[str, Graph], weights: dict[str, torch.Tensor],
                          keep: set[str] = frozenset(), packed: bool | None = None,
                          ) -> tuple[dict[str, Graph], dict[str, torch.Tensor], int]:
    """(graphs with sibling linears merged, weights with the concatenations added and the merged
    originals nothing reads any more dropped, number of linears merged away). ``keep``: weight
    names never to merge (host-resident ones); ``packed``: merge ``linear.packed`` siblings too
    (default: ``merge_packed_default()``)."""
    packed = merge_packed_default() if packed is None else packed
    out: dict[str, Graph] = {}
    merged_weights: dict[str, torch.Tensor] = {}
    removed = 0
    for name, g in graphs.items():
        params = {v for v in g.inputs_of_kind("param") if v.name not in keep and v.name in weights}
        groups: dict[tuple, list[Op]] = {}
        for op in g.ops:
            if _plain_linear(op, params):
                w = op.args[1]
                key = ("plain", op.args[0], w.type.dtype, w.type.shape[1], weights[w.name].device)
                groups.setdefault(key, []).append(op)
            elif packed and _packed_linear(op, params):
                kw = op.kwargs
                key = ("packed", op.args[0], kw.get("format"), kw.get("act"), int(kw["shape"][1]),
                       tuple(weights[a.name].dtype for a in op.args[1:]), weights[op.args[1].name].device)
                groups.setdefault(key, []).append(op)
        groups = {k: (_mergeable_packed(v) if k[0] == "packed" else v) for k, v in groups.items() if len(v) > 1}
        groups = {k: v for k, v in groups.items() if len(v) > 1}
        if not groups:
            out[name] = g
            continue
        # the merged op goes where the first of its siblings was (all read the same input)
        position = {o: i for i, o in enumerate(g.ops)}
        first_of = {min(ops, key=position.__getitem__): ops for ops in groups.values()}
        member = {op for ops in groups.values() for op in ops}
        taken = g.value_names()
        new_ops: list[Op] = []
        new_inputs: list[GraphInput] = []
        for op in g.ops:
            if op in first_of:
                ops = first_of[op]
                is_packed = ops[0].name == "linear.packed"
                sizes = [int(o.kwargs["shape"][0]) if is_packed else int(o.args[1].type.shape[0]) for o in ops]
                w_vals = []
                for j in range(1, len(ops[0].args) if is_packed else 2):  # each packed tensor, or the weight
                    parts = [o.args[j] for o in ops]
                    wname = merged_name([v.name for v in parts])
                    if wname not in merged_weights:
                        merged_weights[wname] = torch.cat([weights[v.name] for v in parts], 0)
                    t = parts[0].type
                    w_val = Value(wname, TensorType(t.dtype, (sum(int(v.type.shape[0]) for v in parts), *t.shape[1:])))
                    new_inputs.append(GraphInput("param", w_val))
                    w_vals.append(w_val)
                x = op.args[0]
                rtype = op.results[0].type
                y_name = g.fresh_name(f"{op.results[0].name}_merged", taken)
                taken.add(y_name)
                y = Value(y_name, TensorType(rtype.dtype, (*rtype.shape[:-1], sum(sizes))))
                if is_packed:
                    kwargs = {**ops[0].kwargs, "shape": [sum(sizes), int(ops[0].kwargs["shape"][1])]}
                    new_ops.append(Op("linear.packed", (x, *w_vals), kwargs, (y,), loc=op.loc))
                else:
                    new_ops.append(Op("aten.linear.default", (x, *w_vals), {}, (y,), loc=op.loc))
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
