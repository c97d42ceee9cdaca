"""Dead-code elimination."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value
from ds4c.ir.registry import get_op
from ds4c.passes.manager import PassContext, register_pass


@register_pass("dce")
def dce(graph: Graph, ctx: PassContext) -> Graph:
    """Remove pure ops whose results are never used, then const and param inputs nobody reads.

    Needs: nothing. Guarantees: every remaining pure op feeds an output; user inputs and state
    inputs are kept (they are the entry point's signature) even when unused.

        %a = aten.mul.Tensor(%x, 2)        // unused
        %b = aten.add.Tensor(%x, 1)        ->   %b = aten.add.Tensor(%x, 1)
        return y=%b                              return y=%b
    """
    live: set[Value] = set(graph.output_values())
    kept = []
    for op in reversed(graph.ops):
        if not get_op(op.name).pure or any(r in live for r in op.results):
            kept.append(op)
            live.update(op.operands)
    kept.reverse()
    inputs = [i for i in graph.inputs if i.kind in ("input", "state") or i.value in live]
    names = {i.value.name for i in inputs}
    constants = {k: v for k, v in graph.constants.items() if k in names}
    return graph.copy(ops=kept, inputs=inputs, constants=constants)
