"""fuse_paged_reads: a serving step's indexer and attention read keys through the page tables (Triton targets).

A serving step (``ragged_step``, ``ragged_decode``, the MTP steps) finds each token's state
through its sequence's page table: ``paged.rows`` gives the pool rows of the entries a token
reads and ``paged.gather`` copies those rows out, one copy per token. For the lightning indexer
that copy is every entry of the context, per token: [N, C, d] with ``C = max_context / ratio``
(flash-slice at ``--max-context 65536``, a 2048-token step: 8.6 GB per CSA layer, written and
read again); attention concatenates its window's copy with its compressed entries' (HCA: every
entry, [N, W + C, D]; at ``--max-context 262144`` 4.3 GB gathered and 4.6 GB concatenated per HCA
layer, and the step's activations outgrew an H100). The kernels need each key once per token, in
their own tiles: they can read it from the pool at its row. Two rewrites, where every copy on
the way has no other reader (and is no graph output):

    %keys = paged.gather(%pool, %rows) : bf16[N,2048,128]
    %top = indexer.topk(%q, %keys, %w, %future, k=512, ..)
        -> %top = indexer.topk.rows(%q, %pool, %rows, %w, %future, k=512, ..)

    %a = paged.gather(%window_pool, %window_rows) : bf16[N,128,512]
    %b = paged.gather(%comp_pool, %picks) : bf16[N,512,512]
    %keys = aten.unsqueeze.default(aten.cat.default([%a, %b], 1), 1) : bf16[N,1,640,512]
    %o = attention.csa(%q, %keys, %bias, %sinks, scale=..)
        -> %o = attention.csa.rows(%q, %window_pool, %window_rows, %comp_pool, %picks, %bias, %sinks, scale=..)

(a sliding layer's keys are one gather: ``attention.sliding.rows(.., none, none, ..)``). Then the
indexer's rows list itself, [N, C] int64, goes where only the page table made it and only row
gathers of the picks read it besides the indexer::

    %rows = paged.rows(%comp_table, %token_seq, none, %visible, count=C, page=64) : i64[N,C]
    %top = indexer.topk.rows(%q, %pool, %rows, ..)   ->   %top = indexer.topk.table(%q, %pool, %comp_table,
                                                                     %token_seq, %visible, .., count=C, page=64)
    %picked = aten.gather.default(%rows, 1, %sel)   ->   %picked = paged.rows_at(%comp_table, %token_seq, %sel,
                                                                                 %visible, page=64)

The results are the same values (``ds4c.ops.compress``, ``ds4c.ops.attention``: the references
gather); what the step keeps is the rows [N, T] (8 bytes an entry instead of 2d). The compile
option ``fuse_paged_reads=False`` keeps the copies, for A/B runs.
"""

from __future__ import annotations

from typing import Any

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ops.compress import INDEXER_TOPK_ROWS, INDEXER_TOPK_TABLE
from ds4c.ops.paged import PAGED_GATHER, PAGED_ROWS, PAGED_ROWS_AT
from ds4c.passes.lower_packed_weights import lowers_for
from ds4c.passes.manager import PassContext, register_pass

ATTENTION = ("attention.sliding", "attention.csa", "attention.hca")


@register_pass("fuse_paged_reads")
def fuse_paged_reads(graph: Graph, ctx: PassContext) -> Graph:
    """Every ``indexer.topk`` and ``attention.*`` whose keys are gathered pool rows (see above)
    as its ``.rows`` form reading the pool at the rows (Triton targets, unless the compile option
    ``fuse_paged_reads`` is off). Each rewrite keeps the consumer's result value."""
    if not lowers_for(ctx.target) or not ctx.options.get("fuse_paged_reads", True):
        return graph
    producer, users, outputs = graph.producers(), graph.users(), set(graph.output_values())

    def only_use(v: Any, name: str) -> Op | None:
        """The op making ``v`` if it is a ``name`` whose one reader is the op being rewritten."""
        op = producer.get(v) if isinstance(v, Value) else None
        if op is None or op.name != name or len(users.get(v, ())) != 1 or v in outputs:
            return None
        return op

    def gathered(v: Any) -> Op | None:
        op = only_use(v, PAGED_GATHER)
        return op if op is not None and getattr(op.args[1].type, "rank", None) == 2 else None

    dropped: set[Op] = set()
    rewritten: dict[Op, Op] = {}
    for op in graph.ops:
        if op.name == "indexer.topk" and len(op.args) == 4:
            q, keys, w, future = op.args
            gather = gathered(keys)
            if gather is None or not ctx.allow_rewrite(f"indexer %{op.result.name} reads its keys' rows"):
                continue
            rewritten[op] = op.replace(name=INDEXER_TOPK_ROWS, args=(q, *gather.args, w, future))
            dropped.add(gather)
        elif op.name in ATTENTION and len(op.args) == 4:
            q, keys, bias, sinks = op.args
            unsqueeze = only_use(keys, "aten.unsqueeze.default")
            if unsqueeze is None or unsqueeze.args[1] != 1:
                continue
            parts = [gathered(unsqueeze.args[0])]
            cat = None
            if parts[0] is None:
                cat = only_use(unsqueeze.args[0], "aten.cat.default")
                if cat is None or len(cat.args[0]) != 2 or (cat.args[1] if len(cat.args) > 1 else 0) not in (1, -2):
                    continue
                parts = [gathered(v) for v in cat.args[0]]
            if None in parts or not ctx.allow_rewrite(f"attention %{op.result.name} reads its keys' rows"):
                continue
            pool_b, rows_b = parts[1].args if len(parts) == 2 else (None, None)
            rewritten[op] = op.replace(name=op.name + ".rows", args=(q, *parts[0].args, pool_b, rows_b, bias, sinks))
            dropped.update([unsqueeze, *parts] + ([cat] if cat is not None else []))
    if dropped:
        graph = graph.copy(ops=[rewritten.get(o, o) for o in graph.ops if o not in dropped])
    return _rows_through_tables(graph, ctx)


def _rows_through_tables(graph: Graph, ctx: PassContext) -> Graph:
    """A ``paged.rows(table, seq, none, limit)`` read only by ``indexer.topk.rows`` (as their rows;
    CSA layers of equal page tables share one after ``cse``) and by row gathers of their picks
    (``aten.gather(rows, 1, top)``): each indexer finds its keys' rows through the table itself
    (``indexer.topk.table``) and the picks' rows come from it too (``paged.rows_at``), so the rows
    of every entry each token may see ([N, C] int64: 4.3 GB at a 2048-token step and a 1M-token
    context) are never made."""
    users, outputs = graph.users(), set(graph.output_values())
    dropped: set[Op] = set()
    rewritten: dict[Op, Op] = {}
    for made in graph.ops:
        if made.name != PAGED_ROWS or made.args[2] is not None or made.result in outputs:
            continue
        rows = made.result
        readers = list(dict.fromkeys(users.get(rows, ())))
        indexers = [u for u in readers if u.name == INDEXER_TOPK_ROWS and u.args[2] is rows
                    and all(a is not rows for i, a in enumerate(u.args) if i != 2)]
        picks = [u for u in readers if u.name == "aten.gather.default" and u.args[0] is rows and u.args[1] in (1, -1)]
        if not indexers or len(indexers) + len(picks) != len(readers):
            continue
        if not ctx.allow_rewrite(f"indexers of %{rows.name} find their keys' rows through the page table"):
            continue
        table, seq, _, limit = made.args
        count, page = made.kwargs["count"], made.kwargs["page"]
        for op in indexers:
            q, pool, _, w, future = op.args
            rewritten[op] = op.replace(name=INDEXER_TOPK_TABLE, args=(q, pool, table, seq, limit, w, future),
                                       kwargs={**op.kwargs, "count": count, "page": page})
        for u in picks:
            rewritten[u] = u.replace(name=PAGED_ROWS_AT, args=(table, seq, u.args[2], limit), kwargs={"page": page})
        dropped.add(made)
    return graph.copy(ops=[rewritten.get(o, o) for o in graph.ops if o not in dropped]) if dropped else graph
