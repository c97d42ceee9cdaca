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
The state outputs are untouched. The region and the rewrite are ``narrow_positions``'s, shared with
``hoist_row_gather`` (a serving step's logits rows).
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, Op, Program, Value
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.narrow_positions import narrow_region, positionwise_region

LAST_ENTRY = "prefill_last"
_END = 9223372036854775807


def last_position_logits(graph: Graph, output: str = "logits") -> Graph | None:
    """``graph`` with ``output`` computed for the last position only, or None where that cannot be
    done by slicing (see the module docstring)."""
    outs = dict(graph.outputs)
    if output not in outs:
        return None
    target = outs[output]
    head = positionwise_region(graph, target, other_outputs=[v for n, v in graph.outputs if n != output])
    if not any(target in op.results for op in head):
        return None
    t = graph.tensor_type(target)
    seq = t.shape[1] if t.rank >= 2 else None

    def last(v: Value, new: Value) -> Op:
        return Op("aten.slice.Tensor", (v, 1, -1, _END), {}, (new,), loc="last_position_logits")

    rewrite = narrow_region(graph, head, seq, 1, last, "last")
    if rewrite is None:
        return None
    new_ops, narrowed = rewrite
    moved = set(head)
    outputs = [(n, narrowed.get(v, v)) if n == output else (n, v) for n, v in graph.outputs]
    out = graph.copy(ops=[op for op in graph.ops if op not in moved] + new_ops, outputs=outputs)
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
