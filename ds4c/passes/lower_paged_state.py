"""lower_paged_state: the serving pools are written in place.

Needs: nothing (runs before ``plan_memory``). Guarantees: every ``aten.index_put`` that writes rows
of a state input (through views) and whose result (through views) is returned as that same state
is a ``state.write`` (``ds4c.ops.state``), whose result is its operand written in place: a step
writes the rows it computes instead of copying the whole pool (traced, the update is functional:
at flash's pool sizes, gigabytes copied per layer per step). The reference result is unchanged.

A write is lowered only where it is safe: every other op that reads the old pool (or a view of
it) comes before the write and becomes one of its operands, so every schedule keeps it first.
An ``index_put`` with a reader after it, or accumulating, or one that is not returned as its own
state, stays functional.

    before: %flat = aten.reshape.default(%layers.1.compressor_ring, [-1, 128]) : f32[SLOTS*8,128]
            %old = aten.index_select.default(%flat, 0, %src) : f32[E*8,128]
            %new = aten.index_put.default(%flat, [%rows], %vals) : f32[SLOTS*8,128]
            %out = aten.view.default(%new, [SLOTS, 8, 128])        -> output layers.1.compressor_ring
    after:  %new = state.write(%flat, %rows, %vals, [%old]) : f32[SLOTS*8,128]
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import has_trait
from ds4c.ir.types import TensorType
from ds4c.ops.state import STATE_WRITE
from ds4c.passes.manager import PassContext, register_pass

INDEX_PUT = "aten.index_put.default"


def _view_root(v: Value, producer: dict[Value, Op]) -> Value:
    while v in producer and has_trait(producer[v].name, "view") and producer[v].args:
        v = producer[v].args[0]
    return v


@register_pass("lower_paged_state")
def lower_paged_state(graph: Graph, ctx: PassContext) -> Graph:
    """Write serving pools in place (``state.write``) where no later op reads the old pool.

    Needs: nothing. Guarantees: the reference result is unchanged; each lowered write lists every
    earlier reader of its pool among its operands (the verifier checks it)."""
    states = {gi.value for gi in graph.inputs if gi.kind == "state"}
    if not states:
        return graph
    producer = {r: op for op in graph.ops for r in op.results}
    returned = {_view_root(v, producer): name for name, v in graph.outputs}
    position = {id(op): i for i, op in enumerate(graph.ops)}
    # per state input: the values that alias it (the input and every view of it)
    aliases: dict[Value, set[Value]] = {s: {s} for s in states}
    for op in graph.ops:
        if has_trait(op.name, "view") and op.args and isinstance(op.args[0], Value):
            root = _view_root(op.args[0], producer)
            if root in aliases:
                aliases[root].update(op.results)
    replaced: dict[int, Op] = {}
    for i, op in enumerate(graph.ops):
        if op.name != INDEX_PUT or len(op.args) < 3 or op.kwargs.get("accumulate") or (
                len(op.args) > 3 and op.args[3]):
            continue
        target, indices, values = op.args[0], op.args[1], op.args[2]
        pool = _view_root(target, producer)
        if pool not in states or returned.get(op.result) != pool.name:
            continue
        if not (isinstance(indices, list) and len(indices) == 1 and isinstance(indices[0], Value)):
            continue
        readers, safe = [], True
        for other in graph.ops:
            if other is op or has_trait(other.name, "view") or not any(v in aliases[pool] for v in other.operands):
                continue
            reads = [r for r in other.results if isinstance(r.type, TensorType)]
            if position[id(other)] > i:
                safe = False
                break
            readers += reads
        if not safe or not ctx.allow_rewrite(f"@{graph.name} %{op.result.name}: {pool.name} written in place"):
            continue
        replaced[i] = Op(STATE_WRITE, (target, indices[0], values, readers), {}, op.results, loc=op.loc)
    if not replaced:
        return graph
    return graph.copy(ops=[replaced.get(i, op) for i, op in enumerate(graph.ops)])
