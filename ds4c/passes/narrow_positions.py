"""Position-wise work moved after a narrowing: run it on the positions that are kept, not on all.

A value computed position by position and then narrowed to a few positions (the last one; the rows
a serving step returns logits for) can be computed on those positions only: narrow the values that
enter the position-wise ops instead, and run the ops on the narrow tensors. Two passes use this:
``last_position_logits`` (``prefill_last``'s head on the last position) and ``hoist_row_gather``
(a ragged step's last layer FFN and head on its logits rows).

``positionwise_region`` finds the ops to move: walking back from ``target`` (the value that is
narrowed), the ops with the ``positionwise`` trait (dimension 1 of every input maps to dimension 1
of the result) whose results are read by nothing but each other and the narrowing. An op that any
other output needs stays where it is, and with it everything above it. ``narrow_region`` rewrites
the region: every value entering it from outside (parameters aside) is narrowed once, the region's
ops run on the narrowed values, and their results' dimension 1 becomes the narrow length. It
declines (None) when a value enters without the sequence at dimension 1, or when the sequence
length is static (another dimension could equal it by chance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import has_trait
from ds4c.ir.types import TensorType


def positionwise_region(graph: Graph, target: Value, *, other_outputs: Iterable[Value], narrowing: Op | None = None
                        ) -> list[Op]:
    """The position-wise ops, in graph order, whose results feed only ``target`` (and each other),
    ``target``'s producer included when it qualifies; ``narrowing`` is the op that narrows
    ``target`` (a reader that may stay), None when ``target`` is a graph output. Ops that
    ``other_outputs`` need (not through ``narrowing``) are never in it."""
    producers = graph.producers()
    shared: set[Op] = set()
    stack = list(other_outputs)
    while stack:
        op = producers.get(stack.pop())
        if op is not None and op is not narrowing and op not in shared:
            shared.add(op)
            stack.extend(op.operands)
    users = graph.users()
    seen: set[Op] = {narrowing} if narrowing is not None else set()
    region: list[Op] = []
    for op in reversed(graph.ops):
        if op in shared or op is narrowing or not has_trait(op.name, "positionwise") or not op.results:
            continue
        readers = [u for r in op.results for u in users.get(r, [])]
        makes_target = target in op.results
        if (makes_target or readers) and all(u in seen for u in readers) and \
                (makes_target or any(u in seen for u in readers)):
            seen.add(op)
            region.append(op)
    return region[::-1]


def _with_seq(t: TensorType, seq) -> TensorType:
    return TensorType(t.dtype, (t.shape[0], seq, *t.shape[2:]))


def narrow_region(graph: Graph, region: list[Op], seq, narrow_seq,
                  narrow: Callable[[Value, Value], Op], suffix: str) -> tuple[list[Op], dict[Value, Value]] | None:
    """The ops that compute ``region`` on the narrow positions (the narrowing ops first), and the map
    from each of the region's values (and each narrowed input) to its narrow counterpart; None where
    the rewrite does not apply (see the module docstring). ``seq``: the symbolic length of
    dimension 1 in the region; ``narrow_seq``: the length after narrowing; ``narrow(v, new)``: the
    op that narrows ``v`` into the fresh value ``new``; ``suffix`` names the narrowed values."""
    if not isinstance(seq, str):
        return None  # a static sequence length: dimension 1 of another value could equal it by chance
    produced = {r for op in region for r in op.results}
    params = set(graph.inputs_of_kind("param")) | set(graph.inputs_of_kind("const"))
    taken = graph.value_names()
    narrowed: dict[Value, Value] = {}
    ops: list[Op] = []
    for v in dict.fromkeys(v for op in region for v in op.operands if v not in produced and v not in params):
        t = v.type
        if not isinstance(t, TensorType) or t.rank < 2 or t.shape[1] != seq:
            return None  # a value entering the region without the sequence at dimension 1
        name = graph.fresh_name(f"{v.name}_{suffix}", taken)
        taken.add(name)
        narrowed[v] = Value(name, _with_seq(t, narrow_seq))
        ops.append(narrow(v, narrowed[v]))
    for op in region:
        results = []
        for r in op.results:
            keep = isinstance(r.type, TensorType) and r.type.rank >= 2 and r.type.shape[1] == seq
            narrowed[r] = Value(r.name, _with_seq(r.type, narrow_seq)) if keep else r
            results.append(narrowed[r])
        ops.append(op.map_operands(lambda v: narrowed.get(v, v)).replace(results=tuple(results)))
    return ops, narrowed
