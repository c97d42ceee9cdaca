"""Prefill that computes the logits of the last position only (what generation needs).

A prefill entry point returns logits for every prompt position ([B, S, vocab]), which the
numerical checks compare; generation reads only the last row. For a 2048-token prompt of
V4-Flash the LM head over every position is 2.2 TFLOP (about 3 ms on an H100), the largest
single GEMM of the step. So every artifact that generates has its own entry point for it:
``add_last_position_entry`` gives the traced program a ``prefill_last`` graph (a copy of
``prefill``), and the pass ``last_position_logits`` rewrites that graph, and only that one, after
fusion (so the compiled artifact holds it, lowered, planned and scheduled like the others). The
ops
that feed only ``logits`` (the head: ``mhc.head``, the final norm, the LM head) run on the last
position, sliced where the head leaves the rest of the graph::

    %h = mhc.post(...)                         %h = mhc.post(...)
    %y = mhc.head(%h, ...)               ->    %l = aten.slice.Tensor(%h, 1, -1, 9223372036854775807)
    %z = rms_norm(%y, ...)                     %y = mhc.head(%l, ...)  ...
    return logits=%linear(%z, ...), ...        return logits=%linear(...) : [B, 1, vocab], ...

The head grows backwards from the logits over ops that work position by position
(the ``positionwise`` trait) and feed nothing but the head; in DeepSeek-V4 that is also the last layer's
FFN half (mHC pre/post, the MoE: a decode-sized MoE for one token). The sequence length must be
symbolic, and each value entering the head must carry it at dimension 1; otherwise the rewrite
returns None, the pass leaves ``prefill_last`` as it is and the runtime slices its full logits.
The state outputs are untouched.
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, Op, Program, Value
from ds4c.ir.registry import has_trait
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass

LAST_ENTRY = "prefill_last"
_END = 9223372036854775807


def _with_seq(t: TensorType, seq) -> TensorType:
    return TensorType(t.dtype, (t.shape[0], seq, *t.shape[2:]))


def last_position_logits(graph: Graph, output: str = "logits") -> Graph | None:
    """``graph`` with ``output`` computed for the last position only, or None where that cannot be
    done by slicing (see the module docstring)."""
    outs = dict(graph.outputs)
    if output not in outs:
        return None
    producers = graph.producers()
    # ops the other outputs need
    shared: set[Op] = set()
    stack = [v for n, v in graph.outputs if n != output]
    while stack:
        op = producers.get(stack.pop())
        if op is not None and op not in shared:
            shared.add(op)
            stack.extend(op.operands)
    # the head: position-wise ops whose results only the head (or ``output``) reads, found from
    # the output backwards; whatever they read from outside is sliced to the last position
    users = graph.users()
    head: list[Op] = []
    seen: set[Op] = set()
    for op in reversed(graph.ops):
        if op in shared or not has_trait(op.name, "positionwise") or not op.results:
            continue
        readers = [u for r in op.results for u in users.get(r, [])]
        feeds_output = outs[output] in op.results
        if (feeds_output or readers) and all(u in seen for u in readers) and \
                (feeds_output or any(u in seen for u in readers)):
            seen.add(op)
            head.append(op)
    if outs[output] not in {r for op in head for r in op.results}:
        return None
    head_results = {r for op in head for r in op.results}
    params = set(graph.inputs_of_kind("param")) | set(graph.inputs_of_kind("const"))
    seq = graph.tensor_type(outs[output]).shape[1] if graph.tensor_type(outs[output]).rank >= 2 else None
    if not isinstance(seq, str):
        return None  # a static sequence length: dim 1 of another value could equal it by chance
    taken = graph.value_names()
    sliced: dict[Value, Value] = {}
    new_ops: list[Op] = []
    for v in dict.fromkeys(v for op in head for v in op.operands if v not in head_results and v not in params):
        t = v.type
        if not isinstance(t, TensorType) or t.rank < 2 or t.shape[1] != seq:
            return None  # a value entering the head without the sequence at dim 1
        name = graph.fresh_name(f"{v.name}_last", taken)
        taken.add(name)
        sliced[v] = Value(name, _with_seq(t, 1))
        new_ops.append(Op("aten.slice.Tensor", (v, 1, -1, _END), {}, (sliced[v],), loc="last_position_logits"))
    retyped: dict[Value, Value] = dict(sliced)
    order = {op: i for i, op in enumerate(graph.ops)}
    ops = [op for op in graph.ops if op not in seen]
    for op in sorted(head, key=order.__getitem__):
        results = []
        for r in op.results:
            keep = isinstance(r.type, TensorType) and r.type.rank >= 2 and r.type.shape[1] == seq
            retyped[r] = Value(r.name, _with_seq(r.type, 1)) if keep else r
            results.append(retyped[r])
        new_ops.append(op.map_operands(lambda v: retyped.get(v, v)).replace(results=tuple(results)))
    outputs = [(n, retyped.get(v, v)) if n == output else (n, v) for n, v in graph.outputs]
    out = graph.copy(ops=ops + new_ops, outputs=outputs)
    out.name = LAST_ENTRY
    return out


def add_last_position_entry(program: Program) -> Program:
    """``program`` with a ``prefill_last`` entry point: a copy of ``prefill`` that the pass
    ``last_position_logits`` turns into the last-position variant (unchanged without ``prefill``)."""
    prefill = program.graphs.get("prefill")
    if prefill is None or LAST_ENTRY in program.graphs:
        return program
    entry = prefill.copy()
    entry.name = LAST_ENTRY
    return Program({**program.graphs, LAST_ENTRY: entry}, dict(program.attrs))


@register_pass("last_position_logits")
def last_position_logits_pass(graph: Graph, ctx: PassContext) -> Graph:
    """Compute the ``prefill_last`` entry point's logits for the last position only.

    Needs: ``prefill_last`` (``add_last_position_entry``), after fusion. Guarantees: other graphs
    are untouched; ``prefill_last``'s logits equal ``prefill``'s last row, its state outputs
    ``prefill``'s. See the module docstring for the rewrite and when it does not apply.
    """
    if graph.name != LAST_ENTRY:
        return graph
    return last_position_logits(graph) or graph
