"""Fusion of DeepSeek-V4 attention (sink softmax over window + compressed entries) and the grouped output projection."""

from __future__ import annotations

from collections import deque

from ds4c.ir.graph import Graph, Value
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.pattern_lib import CASTS, COPIES, VIEWS
from ds4c.passes.patterns import Builder, Lit, Match, Maybe, Op, Rewrite, Wild, record_fusion, rewrite_graph

_ANY = Wild(literals=True)
_LAST = Lit(predicate=lambda v: v in (-1, 3))

KV_REPEAT = Op(VIEWS, Op("aten.expand.default", Op("aten.unsqueeze.default", Wild("keys"), 2), _ANY), _ANY,
               capture="kv")
LOGITS = Op("aten.add.Tensor",
            Op("aten.mul.Tensor", Op("aten.matmul.default", Wild("q"), Op("aten.transpose.int", KV_REPEAT, 2, 3)),
               Lit(predicate=lambda v: isinstance(v, float), capture="scale"), commutative=True),
            Wild("bias"), commutative=True)
SINKS = Op("aten.expand.default", Op(VIEWS, Wild("sinks"), _ANY), _ANY)
COMBINED = Op("aten.cat.default", [LOGITS, SINKS], _LAST, capture="combined")
SHIFTED = Op("aten.sub.Tensor", COMBINED, Op("aten.max.dim", COMBINED, _LAST, True, result_index=0))
PROBS = Op("aten.softmax.int", SHIFTED, _LAST, _ANY)
ATTENTION = Op("aten.matmul.default",
               Maybe(CASTS, Maybe(COPIES, Maybe(CASTS, Op("aten.slice.Tensor", PROBS, _LAST, 0, -1)))), KV_REPEAT)

GROUPED = Op(VIEWS, Op("aten.transpose.int", Op("aten.bmm.default",
                                                Op("aten.transpose.int", Op(VIEWS, Wild("x"), _ANY), 0, 1),
                                                Op("aten.transpose.int", Op(VIEWS, Wild("w"), Lit(capture="wshape")),
                                                   1, 2)), 0, 1), _ANY)

_SELECTION_OPS = {"aten.scatter.value", "aten.scatter.src", "aten.scatter_.value", "aten.topk.default",
                  "indexer.topk"}
_POOLS = ("window_kv_pool", "compressed_kv_pool")  # the serving pools attention reads keys from


def _kind(m: Match) -> str:
    """sliding: keys are this call's window only; csa: an indexer selection feeds the bias; hca otherwise.

    In a serving graph the keys are gathered from paged pools: the kind is that of the pool
    (``<layer>.compressed_kv_pool`` among the keys' sources: csa when a top-k picks the rows,
    else hca; no compressed pool: sliding)."""
    paged = _paged_kind(m)
    if paged is not None:
        return paged
    keys_op = m.producers.get(m["keys"])
    compressed = keys_op is not None and keys_op.name == "aten.cat.default"
    if not compressed:
        return "sliding"
    stack, seen = [m["bias"]], set()
    while stack:
        v = stack.pop()
        if v in seen or len(seen) > 64:
            continue
        seen.add(v)
        op = m.producers.get(v)
        if op is None:
            continue
        if op.name in _SELECTION_OPS:
            return "csa"
        stack.extend(op.operands)
    return "hca"


_PAGED_WALK = 512  # values visited back from the keys: the gathers' index arithmetic included


def _paged_kind(m: Match) -> str | None:
    """The kind of the pools the keys are gathered from, or None when no pool feeds them (a dense graph)."""
    queue, seen = deque([m["keys"]]), set()
    pools, selected = set(), False
    while queue and len(seen) < _PAGED_WALK:
        v = queue.popleft()
        if v in seen:
            continue
        seen.add(v)
        op = m.producers.get(v)
        if op is None:
            if v.name.endswith(_POOLS):
                pools.add(v.name.rsplit(".", 1)[-1])
            continue
        selected = selected or op.name in _SELECTION_OPS
        # a pool written in this step: follow the pool, not the rows written (they lead back through
        # the hidden state into earlier layers and their selections)
        queue.extend(op.operands[:1] if op.name == "aten.index_put.default" else op.operands)
    if not pools:
        return None
    if "compressed_kv_pool" not in pools:
        return "sliding"
    return "csa" if selected else "hca"


def _check_attention(m: Match) -> bool:
    q, keys = m["q"], m["keys"]
    return (isinstance(q.type, TensorType) and isinstance(keys.type, TensorType) and q.type.rank == 4
            and keys.type.rank == 4 and keys.type.shape[1] == 1 and str(m.root.type) == str(q.type))


def _build_attention(m: Match, b: Builder) -> Value:
    kind = _kind(m)
    (o,) = b.op(f"attention.{kind}", [m["q"], m["keys"], m["bias"], m["sinks"]], {"scale": float(m["scale"])},
                [m.root.type], base=f"attn_{kind}")
    return o


def _check_grouped(m: Match) -> bool:
    x, shape = m["x"], m["wshape"]
    if not (isinstance(x.type, TensorType) and isinstance(shape, list) and len(shape) == 3):
        return False
    groups = shape[0]
    return isinstance(groups, int) and x.type.rank >= 3 and x.type.shape[-2] == groups


def _build_grouped(m: Match, b: Builder) -> Value:
    (y,) = b.op("linear.grouped", [m["x"], m["w"]], {"groups": m["wshape"][0]}, [m.root.type], base="grouped")
    return y


RULES = [
    Rewrite("attention", ATTENTION, _build_attention, _check_attention),
    Rewrite("linear.grouped", GROUPED, _build_grouped, _check_grouped),
]


@register_pass("fuse_attention")
def fuse_attention(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse the sink-softmax attention core into ``attention.{sliding,csa,hca}`` and ``wo_a`` into ``linear.grouped``.

    Needs: fused ``rope`` (the inverse rotation of the output stays a separate op). Guarantees: no
    softmax over attention logits and no per-group bmm of the output projection is left.

        %kv = view(expand(unsqueeze(%keys, 2)))           // the shared K=V head, repeated per query head
        %l = add(mul(matmul(%q, transpose(%kv, 2, 3)), 0.177), %bias)
        %c = cat([%l, expand(view(%sinks))], -1)
        %p = softmax(sub(%c, max(%c, -1)), -1)             ->   %o = attention.sliding(%q, %keys, %bias, %sinks, scale=0.177)
        %o = matmul(slice(%p, -1, 0, -1), %kv)
    """
    fired: dict[str, int] = {}
    out = rewrite_graph(graph, RULES, budget=lambda rule, m: ctx.allow_rewrite(f"{rule} at %{m.root.name}"),
                        fired=fired)
    fired.pop("attention", None)  # counted by kind instead
    before = {id(op) for op in graph.ops}
    for op in out.ops:
        if op.name.startswith("attention.") and id(op) not in before:
            fired[op.name] = fired.get(op.name, 0) + 1
    record_fusion(ctx, graph.name, fired)
    return out
