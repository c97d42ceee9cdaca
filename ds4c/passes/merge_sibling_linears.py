"""merge_sibling_linears: sibling linears as one GEMM (Triton targets).

In a decode step every linear is a GEMV bound by its weight bytes, and a small one cannot reach the
bandwidth a large one does: V4-Flash's attention input feeds ``q_a`` (4096->1024), ``kv``
(4096->512), the compressor's and the indexer's projections, each a few MB, each a cuBLAS split-K
GEMV plus its reduction kernel. Linears that read the same activation are one GEMM over their
concatenated weights, sliced after::

    %q = aten.linear.default(%x, %wq)           %y = aten.linear.default(%x, %cat(wq,wkv))
    %kv = aten.linear.default(%x, %wkv)   ->    %q = aten.slice.Tensor(%y, -1, 0, 1024)
                                                %kv = aten.slice.Tensor(%y, -1, 1024, 1536)

Each concatenated weight (``cat(a,b)``) is a ``concat`` weight transform in the manifest: made at
load from its parts, or stored in their place when the weights are embedded; the sliced results
keep their names. Plain bias-free
linears over parameters of one dtype and width merge, and so do packed ones (``linear.packed``)
of one format, width and activation format: each packed tensor (FP8 values and their 128x128
block scales, INT8 values and row scales, MXFP4 bytes and scales) is concatenated along its rows,
which holds when every part but the last fills whole scale blocks (``_concatenable``), e.g. an FP8
CSA layer's q_a, kv, compressor and indexer projections: seven one-row GEMVs become one.
The compile options ``merge_linears=False`` / ``merge_packed=False`` keep all / packed siblings
apart, for A/B runs (docs/PERFORMANCE.md has the measurements).
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, GraphInput, Op, Value
from ds4c.ir.types import TensorType
from ds4c.passes.lower_packed_weights import lowers_for, record_transform
from ds4c.passes.manager import PassContext, register_pass


def merged_name(names: list[str]) -> str:
    """The weight name of the concatenation of ``names`` (rows in this order): their common dotted
    prefix, then ``cat:`` and each name's rest, ``:``-separated (an IR name), e.g.
    ``model.layers.0.self_attn.cat:q_a_proj.weight:kv_proj.weight``."""
    split = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
        common += 1
    prefix = ".".join(split[0][:common])
    return (f"{prefix}." if prefix else "") + "cat:" + ":".join(".".join(p[common:]) for p in split)


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


@register_pass("merge_sibling_linears")
def merge_sibling_linears(graph: Graph, ctx: PassContext) -> Graph:
    """Linears that read one activation as one GEMM over their concatenated weights (Triton
    targets, unless the compile option ``merge_linears`` is off; ``merge_packed=False`` keeps packed
    siblings apart). Each concatenation is a ``concat`` weight transform (made at load from its
    parts, stored instead of them when the weights are embedded and nothing else reads them)."""
    if not lowers_for(ctx.target) or not ctx.options.get("merge_linears", True):
        return graph
    packed = ctx.options.get("merge_packed", True)
    params = set(graph.inputs_of_kind("param"))
    groups: dict[tuple, list[Op]] = {}
    for op in graph.ops:
        if _plain_linear(op, params):
            w = op.args[1]
            groups.setdefault(("plain", op.args[0], w.type.dtype, w.type.shape[1]), []).append(op)
        elif packed and _packed_linear(op, params):
            kw = op.kwargs
            key = ("packed", op.args[0], kw.get("format"), kw.get("act"), int(kw["shape"][1]),
                   tuple(a.type.dtype for a in op.args[1:]))
            groups.setdefault(key, []).append(op)
    groups = {k: (_mergeable_packed(v) if k[0] == "packed" else v) for k, v in groups.items() if len(v) > 1}
    groups = {k: v for k, v in groups.items() if len(v) > 1 and ctx.allow_rewrite(
        "merge " + ", ".join(f"%{o.results[0].name}" for o in v) + " into one GEMM")}
    if not groups:
        return graph
    # the merged op goes where the first of its siblings was (all read the same input)
    position = {o: i for i, o in enumerate(graph.ops)}
    first_of = {min(ops, key=position.__getitem__): ops for ops in groups.values()}
    member = {op for ops in groups.values() for op in ops}
    taken = graph.value_names()
    new_ops: list[Op] = []
    new_inputs: list[GraphInput] = []
    for op in graph.ops:
        if op in first_of:
            ops = first_of[op]
            is_packed = ops[0].name == "linear.packed"
            sizes = [int(o.kwargs["shape"][0]) if is_packed else int(o.args[1].type.shape[0]) for o in ops]
            w_vals = []
            for j in range(1, len(ops[0].args) if is_packed else 2):  # each packed tensor, or the weight
                parts = [o.args[j] for o in ops]
                wname = merged_name([v.name for v in parts])
                record_transform(ctx, "concat", wname, [v.name for v in parts])
                t = parts[0].type
                w_val = Value(wname, TensorType(t.dtype, (sum(int(v.type.shape[0]) for v in parts), *t.shape[1:])))
                new_inputs.append(GraphInput("param", w_val))
                w_vals.append(w_val)
            x = op.args[0]
            rtype = op.results[0].type
            y_name = graph.fresh_name(f"{op.results[0].name}_merged", taken)
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
        elif op not in member:
            new_ops.append(op)
    read = {v for o in new_ops for v in o.operands}
    inputs = [gi for gi in graph.inputs if gi.kind != "param" or gi.value in read] + new_inputs
    return graph.copy(ops=new_ops, inputs=inputs)
