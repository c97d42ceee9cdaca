"""hoist_row_gather: a serving step runs its last layer's FFN and its head on the rows it returns.

A ragged serving step (``ragged_step``) packs the chunks of several requests into N rows and returns
logits for L of them (``logit_rows``: each chunk's last row). The model picks those rows where its
head begins (``index_select(h, 1, logit_rows)`` in ``mhc.head``), so the last layer's FFN half (mHC
pre, norm, MoE, mHC post) runs on every row although only L are read: on flash-slice (3 layers,
H100, 2026-12-07) about 4.4 ms of a 576-row step's 20.3 ms, where ``prefill_last`` runs that half on
one position. This pass moves the gather above the position-wise ops that only it reads
(``narrow_positions``), gathering the values that enter them instead::

    %h = mhc.post(%moe, %res, %a, %b) : [1, N, n, D]     %r = index_select(%res, 1, %logit_rows) : [1, L, n, D]
    %x = index_select(%h, 1, %logit_rows) : [1, L, ..] -> ...                   (each value entering the FFN half)
    %y = mhc.head(%x, ...)                                %h = mhc.post(%moe', %r, %a', %b') : [1, L, n, D]
                                                          %y = mhc.head(%h, ...)

Values are exact: each moved op maps a row to the same row. Left alone: a gather whose rows come
from a factory op (``ragged_decode`` gathers ``arange(R)``, every row: moving it would only copy),
and a gathered value that another output also reads (with MTP the step returns every row's final
streams, which the MTP block continues: nothing moves, the FFN runs on all rows as it must).
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import has_trait
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.narrow_positions import narrow_region, positionwise_region

_GATHER = "aten.index_select.default"


def _row_gathers(graph: Graph) -> list[Op]:
    """The ops that pick rows of dimension 1 by an index that is not a factory's (arange)."""
    producers = graph.producers()
    out = []
    for op in graph.ops:
        if op.name != _GATHER or len(op.args) != 3 or op.args[1] != 1:
            continue
        x, rows = op.args[0], op.args[2]
        if not isinstance(x, Value) or not isinstance(x.type, TensorType) or x.type.rank < 2:
            continue
        maker = producers.get(rows)
        if maker is not None and has_trait(maker.name, "factory"):
            continue
        out.append(op)
    return out


def hoist_row_gather(graph: Graph, gather: Op) -> Graph | None:
    """``graph`` with ``gather`` (an ``index_select`` of dimension 1) moved above the position-wise ops
    that only it reads, or None where nothing moves (see the module docstring)."""
    x, _, rows = gather.args
    region = positionwise_region(graph, x, other_outputs=[v for _, v in graph.outputs], narrowing=gather)
    if not any(x in op.results for op in region):
        return None

    def pick(v: Value, new: Value) -> Op:
        return Op(_GATHER, (v, 1, rows), {}, (new,), loc="hoist_row_gather")

    rewrite = narrow_region(graph, region, x.type.shape[1], gather.result.type.shape[1], pick, "rows")
    if rewrite is None:
        return None
    new_ops, narrowed = rewrite
    moved = set(region)
    gathered = {gather.result: narrowed[x]}
    ops: list[Op] = []
    for op in graph.ops:
        if op is gather:
            ops += new_ops
        elif op not in moved:
            ops.append(op.map_operands(lambda v: gathered.get(v, v)))
    return graph.copy(ops=ops, outputs=[(n, gathered.get(v, v)) for n, v in graph.outputs])


@register_pass("hoist_row_gather")
def hoist_row_gather_pass(graph: Graph, ctx: PassContext) -> Graph:
    """Run the position-wise ops that feed only a row gather on the gathered rows.

    Needs: fusion (the FFN half is ``mhc.pre``/``rms_norm``/``moe``/``mhc.post``, position-wise ops).
    Guarantees: every output is unchanged in value; a graph without such a gather is returned as is.
    """
    out = graph
    tried: set[Value] = set()  # by result: a rewrite rebuilds the ops that follow, not their results
    while (gather := next((op for op in _row_gathers(out) if op.result not in tried), None)) is not None:
        tried.add(gather.result)
        moved = hoist_row_gather(out, gather)
        if moved is not None and ctx.allow_rewrite(f"%{gather.result.name}'s rows gathered before the "
                                                   "position-wise ops that feed it"):
            out = moved
    return out
