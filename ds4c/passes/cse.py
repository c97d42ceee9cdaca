"""Common-subexpression elimination."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value, replace_uses
from ds4c.ir.printer import format_literal
from ds4c.ir.registry import get_op
from ds4c.passes.manager import PassContext, register_pass

_NONDETERMINISTIC = ("rand", "normal", "uniform", "bernoulli", "dropout", "multinomial", "exponential")


def is_deterministic(op_name: str) -> bool:
    return not any(w in op_name for w in _NONDETERMINISTIC)


@register_pass("cse")
def cse(graph: Graph, ctx: PassContext) -> Graph:
    """Merge pure, deterministic ops that compute the same thing from the same operands.

    Needs: nothing. Guarantees: no two pure ops have equal name, arguments and result types.

        %a = aten.sym_size.int(%x, 1) : int
        %b = aten.sym_size.int(%x, 1) : int     ->  uses of %b read %a
    """
    seen: dict[tuple, tuple[Value, ...]] = {}
    mapping: dict[Value, Value] = {}
    ops = []
    for op in graph.ops:
        if mapping:
            op = op.map_operands(lambda v: mapping.get(v, v))
        if get_op(op.name).pure and is_deterministic(op.name):
            key = (
                op.name,
                format_literal(list(op.args)),
                format_literal([[k, v] for k, v in sorted(op.kwargs.items())]),
                tuple(str(r.type) for r in op.results),
            )
            prev = seen.get(key)
            if prev is not None and ctx.allow_rewrite(f"merge %{op.results[0].name} into %{prev[0].name}"):
                mapping.update(zip(op.results, prev, strict=True))
                continue
            seen[key] = op.results
        ops.append(op)
    return replace_uses(graph.copy(ops=ops), mapping)
