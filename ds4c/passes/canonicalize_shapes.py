"""Shape canonicalisation: readable symbol names, simplified dimensions, no identity reshapes."""

from __future__ import annotations

import sympy

from ds4c.ir.graph import Graph, GraphInput, Op, Value, map_values, replace_uses
from ds4c.ir.shapes import dim_expr, format_dim
from ds4c.ir.types import IRType, ListType, TensorType
from ds4c.passes.manager import PassContext, register_pass

# Ops that return their input unchanged when the result type equals the operand type.
# (Not clone/contiguous: they change strides, and a later view may depend on that.)
_IDENTITY_IF_SAME_TYPE = {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.expand.default",
    "aten.alias.default", "aten.lift_fresh_copy.default", "aten.detach.default",
}


def _is_plain_cast(op: Op) -> bool:
    """A dtype conversion with no device/layout/memory-format change (``x.to(dtype)``, ``x.float()``)."""
    if not op.args or not isinstance(op.args[0], Value) or len(op.results) != 1:
        return False
    if op.name == "aten._to_copy.default":
        return set(op.kwargs) <= {"dtype"}
    if op.name == "aten.to.dtype":
        return len(op.args) <= 4 and not op.kwargs.get("memory_format") and not any(op.args[2:4])
    return False


def _retype(graph: Graph, fn) -> Graph:
    """Rebuild every value whose type ``fn`` changes."""
    mapping: dict[Value, Value] = {}

    def new_value(v: Value) -> Value:
        t = fn(v.type)
        if t == v.type:
            return v
        nv = Value(v.name, t)
        mapping[v] = nv
        return nv

    inputs = [GraphInput(i.kind, new_value(i.value)) for i in graph.inputs]
    ops = []
    for op in graph.ops:
        op = op.map_operands(lambda v: mapping.get(v, v))
        results = tuple(new_value(r) for r in op.results)
        ops.append(op.replace(results=results))
    outputs = [(n, mapping.get(v, v)) for n, v in graph.outputs]
    return graph.copy(ops=ops, inputs=inputs, outputs=outputs)


def _map_dims(ty: IRType, fn) -> IRType:
    if isinstance(ty, TensorType):
        return TensorType(ty.dtype, tuple(fn(d) for d in ty.shape))
    if isinstance(ty, ListType):
        return ListType(tuple(_map_dims(e, fn) for e in ty.elements))  # type: ignore[misc]
    return ty


def _symbol_names(graph: Graph, ctx: PassContext) -> dict[str, str]:
    """Names for the exporter's symbols (s0, s17...): from ``dim_names`` hints, else d0, d1, ..."""
    per_graph = ctx.program_attrs.get("graph_dim_names", {})
    hints: dict[str, list[str | None]] = per_graph.get(graph.name) or ctx.program_attrs.get("dim_names", {})
    rename: dict[str, str] = {}
    used: set[str] = set()
    for inp in graph.inputs:
        ty = inp.value.type
        if not isinstance(ty, TensorType):
            continue
        names = hints.get(inp.value.name, [])
        for axis, d in enumerate(ty.shape):
            if isinstance(d, str) and d.isidentifier() and d not in rename:
                want = names[axis] if axis < len(names) else None
                if want and want not in used:
                    rename[d] = want
                    used.add(want)
    counter = 0
    for inp in graph.inputs:
        ty = inp.value.type
        if isinstance(ty, TensorType):
            for d in ty.shape:
                if isinstance(d, str):
                    for s in sorted(dim_expr(d).free_symbols, key=lambda s: s.name):
                        if s.name not in rename and s.name not in used:
                            while f"d{counter}" in used:
                                counter += 1
                            rename[s.name] = f"d{counter}"
                            used.add(rename[s.name])
    return {k: v for k, v in rename.items() if k != v}


@register_pass("canonicalize_shapes")
def canonicalize_shapes(graph: Graph, ctx: PassContext) -> Graph:
    """Give symbolic dims readable names, print them canonically, and drop shape no-ops.

    Needs: nothing. Guarantees: symbols are the entry point's named dims (``B``, ``S``) where the
    frontend named them; every dim is in sympy-simplified canonical text; ``sym_size`` of a static
    dim is a literal; view/reshape/expand/clone to an identical type is gone.

        %v = aten.view.default(%x, [%s0, 8]) : f32[s24,8]    ->   (uses of %v read %x : f32[B,8])
    """
    rename = _symbol_names(graph, ctx)
    subs = {sympy.Symbol(k, integer=True, positive=True): sympy.Symbol(v, integer=True, positive=True)
            for k, v in rename.items()}

    def canon(d):
        if isinstance(d, int):
            return d
        e = dim_expr(d)
        if subs:
            e = e.xreplace(subs)
        return format_dim(e)

    graph = _retype(graph, lambda t: _map_dims(t, canon))

    # sym_size of a static dim -> literal; identity shape ops -> their input.
    literal: dict[Value, int] = {}
    mapping: dict[Value, Value] = {}
    ops: list[Op] = []
    returned = set(graph.output_values())
    for op in graph.ops:
        if literal:
            op = op.replace(args=map_values(op.args, lambda v: literal.get(v, v)),
                            kwargs=map_values(op.kwargs, lambda v: literal.get(v, v)))
        if op.name == "aten.sym_size.int" and isinstance(op.args[0], Value):
            ty = op.args[0].type
            if (isinstance(ty, TensorType) and isinstance(ty.shape[op.args[1]], int)
                    and op.results[0] not in returned):
                literal[op.results[0]] = ty.shape[op.args[1]]
                continue
        if op.name in _IDENTITY_IF_SAME_TYPE and isinstance(op.args[0], Value) and len(op.results) == 1:
            if str(op.args[0].type) == str(op.results[0].type) and ctx.allow_rewrite(f"drop identity {op.name}"):
                mapping[op.results[0]] = op.args[0]
                continue
        if _is_plain_cast(op) and str(op.args[0].type) == str(op.results[0].type):
            if ctx.allow_rewrite(f"drop identity {op.name}"):
                mapping[op.results[0]] = op.args[0]
                continue
        ops.append(op)
    return replace_uses(graph.copy(ops=ops), mapping)
