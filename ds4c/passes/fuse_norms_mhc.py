"""Fusion of normalisations (and, as they land, mHC pre/post/head) into single ops."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.pattern_lib import CASTS, VIEWS
from ds4c.passes.patterns import (
    Alt,
    Builder,
    Lit,
    Match,
    Maybe,
    Op,
    Pat,
    Rewrite,
    Wild,
    record_fusion,
    rewrite_graph,
)


def _last_dim(dims) -> bool:
    return isinstance(dims, list) and len(dims) == 1 and dims[0] == -1


def _square(h) -> Alt:
    return Alt(Op("aten.pow.Tensor_Scalar", h, 2), Op("aten.square.default", h), Op("aten.mul.Tensor", h, h))


def _inv_rms(h) -> Op:
    """rsqrt(mean(h², -1, keepdim) + eps) with eps captured."""
    mean = Op("aten.mean.dim", _square(h), Lit(predicate=_last_dim), True)
    return Op("aten.rsqrt.default", Op("aten.add.Tensor", mean, Lit(predicate=lambda v: isinstance(v, float), capture="eps")))


_H = Maybe(CASTS, Wild("x"), capture="h")
WEIGHTED_RMS = Maybe(CASTS, Op("aten.mul.Tensor", Wild("w"), Op("aten.mul.Tensor", _H, _inv_rms(_H), commutative=True),
                               commutative=True))
UNWEIGHTED_RMS = Op("aten.mul.Tensor", Wild("x"), Maybe(CASTS, _inv_rms(Maybe(CASTS, Wild("x")))), commutative=True)


def _check_rms(m: Match) -> bool:
    x, root = m["x"], m.root
    if not isinstance(x.type, TensorType) or not isinstance(root.type, TensorType):
        return False
    if str(x.type) != str(root.type):
        return False  # rms_norm keeps the input's shape and dtype
    w = m.get("w")
    if w is not None and (not isinstance(w.type, TensorType) or w.type.shape != x.type.shape[-1:]):
        return False
    return True


def _build_rms(m: Match, b: Builder) -> Value:
    (y,) = b.op("rms_norm", [m["x"], m.get("w")], {"eps": float(m["eps"])}, [m.root.type], base="rms_norm")
    return y


RULES = [
    Rewrite("rms_norm.weighted", WEIGHTED_RMS, _build_rms, _check_rms),
    Rewrite("rms_norm.unweighted", UNWEIGHTED_RMS, _build_rms, _check_rms),
]


@register_pass("fuse_norms_mhc")
def fuse_norms_mhc(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse RMS normalisations into ``rms_norm``, then mHC into ``mhc.pre`` / ``mhc.post`` / ``mhc.head``.

    Needs: canonical shapes. Guarantees: no mean-of-squares/rsqrt chain of an RMS norm is left;
    every hyper-connection (mix logits, sigmoid gates, softmax + Sinkhorn, collapse, expand) is one
    op. A Sinkhorn chain of another length than the model's ``hc_sinkhorn_iters`` is left alone.

        %p = aten.pow.Tensor_Scalar(%x, 2)
        %m = aten.mean.dim(%p, [-1], true)
        %a = aten.add.Tensor(%m, 1e-06)
        %r = aten.rsqrt.default(%a)                 ->   %y = rms_norm(%x, %w, eps=1e-06)
        %n = aten.mul.Tensor(%x, %r)
        %y = aten.mul.Tensor(%w, %n)
    """
    from ds4c.passes.patterns import apply_regions

    fired: dict[str, int] = {}
    budget = lambda rule, m: ctx.allow_rewrite(f"{rule} at %{m.root.name}")  # noqa: E731
    out = rewrite_graph(graph, RULES, budget=budget, fired=fired)
    regions = _mhc_regions(out, ctx)
    if regions:
        fired["mhc.pre"] = len(regions)
        out = apply_regions(out, regions)
    out = rewrite_graph(out, MHC_RULES, budget=budget, fired=fired)
    record_fusion(ctx, graph.name, fired)
    return out


# -- mHC --------------------------------------------------------------------------------------------

_F = Lit(predicate=lambda v: isinstance(v, float), capture="hc_eps")


def _flat_rms_mix(fn_capture: str) -> Op:
    flat = Maybe(CASTS, Op(VIEWS, Wild("h"), Wild(literals=True)))
    flat_any = Alt(flat, Maybe(CASTS, Op("aten.flatten.using_ints", Wild("h"), Wild(literals=True),
                                         Wild(literals=True))),
                   Maybe(CASTS, Op("aten.flatten.using_ints", Wild("h"), Wild(literals=True))))
    normed = Op("rms_norm", flat_any, None, eps=Lit(capture="norm_eps"))
    return Op("aten.linear.default", normed, Maybe(CASTS, Wild(fn_capture)))


def _part(i: int) -> tuple[Op, Op, Op]:
    mix = Op("aten.split_with_sizes.default", _flat_rms_mix("fn"), Lit(capture="sizes"), Lit(predicate=lambda v: v == -1),
             result_index=i, capture=f"mix{i}")
    base = Op("aten.split_with_sizes.default", Wild("base"), Lit(capture="bsizes"), result_index=i)
    scale = Alt(Op("aten.unbind.int", Wild("scale"), result_index=i),
                Op("aten.unbind.int", Wild("scale"), 0, result_index=i))
    return mix, base, scale


def _gate(i: int) -> Op:
    mix, base, scale = _part(i)
    return Op("aten.add.Tensor", Op("aten.mul.Tensor", mix, scale, commutative=True), base, commutative=True)


_PRE = Op("aten.add.Tensor", Op("aten.sigmoid.default", _gate(0)), _F, commutative=True)
MHC_COLLAPSE = Maybe(CASTS, Op("aten.sum.dim_IntList",
                               Op("aten.mul.Tensor", Op("aten.unsqueeze.default", _PRE, -1), Wild("h"), commutative=True),
                               Lit(predicate=lambda v: v in ([2], [-2]))))
MHC_POST_WEIGHTS = Op("aten.mul.Tensor", Op("aten.sigmoid.default", _gate(1)), Lit(predicate=lambda v: v in (2, 2.0)),
                      commutative=True)


def _comb_start() -> Op:
    mix, base, scale = _part(2)
    logits = Op("aten.add.Tensor", Op("aten.mul.Tensor", Op(VIEWS, mix, Wild(literals=True)), scale, commutative=True),
                Op(VIEWS, base, Wild(literals=True)), commutative=True)
    return Op("aten.add.Tensor", Op("aten.softmax.int", logits, Lit(predicate=lambda v: v == -1)), _F, commutative=True)


def _normalise(x: Pat, dim: int) -> Op:
    return Op("aten.div.Tensor", x, Op("aten.add.Tensor", Op("aten.sum.dim_IntList", x, [dim], True), _F,
                                       commutative=True))


def sinkhorn_pattern(iters: int) -> Pat:
    c: Pat = _normalise(_comb_start(), -2)
    for _ in range(iters - 1):
        c = _normalise(_normalise(c, -1), -2)
    return c


MHC_POST = Op("aten.add.Tensor",
              Op("aten.mul.Tensor", Op("aten.unsqueeze.default", Maybe(CASTS, Wild("post")), -1),
                 Op("aten.unsqueeze.default", Wild("f"), -2), commutative=True),
              Op("aten.matmul.default", Op("aten.transpose.int", Maybe(CASTS, Wild("comb")),
                                           Lit(predicate=lambda v: v in (-1, -2)), Lit(predicate=lambda v: v in (-1, -2))),
                 Wild("h")),
              commutative=True)

MHC_HEAD = Maybe(CASTS, Op("aten.sum.dim_IntList",
                           Op("aten.mul.Tensor", Op("aten.unsqueeze.default",
                              Op("aten.add.Tensor", Op("aten.sigmoid.default",
                                 Op("aten.add.Tensor", Op("aten.mul.Tensor", _flat_rms_mix("fn"), Maybe(CASTS, Wild("scale")),
                                                          commutative=True), Maybe(CASTS, Wild("base")), commutative=True)),
                                 _F, commutative=True), -1), Wild("h"), commutative=True),
                           Lit(predicate=lambda v: v in ([2], [-2]))))


def _sinkhorn_iters_at(graph: Graph, softmax_users: dict, start: Value) -> tuple[int, Value] | None:
    """Follow the column/row normalisation chain from ``start``: (iterations, last value)."""
    divs, cur = 0, start
    while True:
        nxt = [u for u in softmax_users.get(cur, []) if u.name == "aten.div.Tensor" and u.args[0] is cur]
        if len(nxt) != 1:
            break
        cur = nxt[0].results[0]
        divs += 1
    if divs == 0 or divs % 2 == 0:
        return None
    return (divs + 1) // 2, cur


def _mhc_regions(graph: Graph, ctx: PassContext) -> list:
    from ds4c.passes.patterns import Matcher, Region, self_contained_union

    matcher = Matcher(graph)
    users = graph.users()
    outputs = set(graph.output_values())
    want_iters = (ctx.program_attrs.get("model_config") or {}).get("hc_sinkhorn_iters")
    taken = graph.value_names()
    regions = []
    fired = 0
    for op in graph.ops:
        if op.name not in ("aten.sum.dim_IntList", *CASTS):
            continue
        coll = matcher.match(MHC_COLLAPSE, op.results[0])
        if coll is None:
            continue
        # mhc.pre returns the collapsed streams in H's dtype: the region ends where the graph's value
        # has that dtype (a bf16 model sums in fp32 and casts after: the cast is the root)
        if not (isinstance(coll["h"].type, TensorType) and isinstance(op.results[0].type, TensorType)
                and op.results[0].type.dtype == coll["h"].type.dtype):
            continue
        n = coll["h"].type.shape[-2]
        if not isinstance(n, int) or coll["sizes"] != [n, n, n * n] or coll["bsizes"] != [n, n, n * n]:
            continue
        split = matcher.producers[coll["mix0"]]
        post_val = comb_val = None
        post_m = comb_m = None
        # post weights: 2*sigmoid(mix1*scale1 + base1), reached from the split's second result
        for cand in _forward(users, split.results[1], 4):
            m = matcher.match(MHC_POST_WEIGHTS, cand)
            if m is not None and m["mix1"] is split.results[1]:
                post_val, post_m = cand, m
                break
        # comb: the Sinkhorn chain after softmax(+eps), reached from the split's third result
        for cand in _forward(users, split.results[2], 6):
            prod = matcher.producers.get(cand)
            if prod is None or prod.name != "aten.add.Tensor":
                continue
            chain = _sinkhorn_iters_at(graph, users, cand)
            if chain is None:
                continue
            iters, last = chain
            if want_iters is not None and iters != want_iters:
                continue  # a different Sinkhorn count is a different computation
            m = matcher.match(sinkhorn_pattern(iters), last)
            if m is not None and m["mix2"] is split.results[2]:
                comb_val, comb_m, n_iters = last, m, iters
                break
        if post_m is None or comb_m is None:
            continue
        same = all(m["h"] is coll["h"] and m["fn"] is coll["fn"] and m["base"] is coll["base"]
                   and m["scale"] is coll["scale"] for m in (post_m, comb_m)) and comb_m["hc_eps"] == coll["hc_eps"]
        if not same:
            continue
        roots = {op.results[0], post_val, comb_val}
        if not self_contained_union([coll, post_m, comb_m], roots, users, outputs):
            continue
        if not ctx.allow_rewrite(f"mhc.pre at %{op.results[0].name}"):
            continue
        b = Builder(taken, op.loc)
        x, post, comb = b.op("mhc.pre", [coll["h"], coll["fn"], coll["base"], coll["scale"]],
                             {"norm_eps": float(coll["norm_eps"]), "hc_eps": float(coll["hc_eps"]),
                              "sinkhorn_iters": n_iters},
                             [op.results[0].type, post_val.type, comb_val.type], base="mhc_pre")
        regions.append(Region([coll, post_m, comb_m], b.ops, {op.results[0]: x, post_val: post, comb_val: comb}))
        fired += 1
    return regions


def _forward(users: dict, v: Value, depth: int) -> list[Value]:
    """Values reachable from ``v`` through at most ``depth`` ops, breadth first."""
    out, frontier = [], [v]
    for _ in range(depth):
        nxt = []
        for x in frontier:
            for u in users.get(x, []):
                nxt.extend(u.results)
        out.extend(nxt)
        frontier = nxt
    return out


def _check_head(m: Match) -> bool:
    h = m["h"]
    if not isinstance(h.type, TensorType):
        return False
    return isinstance(m["fn"].type, TensorType) and m["fn"].type.shape[0] == h.type.shape[-2]


def _build_head(m: Match, b: Builder) -> Value:
    (y,) = b.op("mhc.head", [m["h"], m["fn"], m["base"], m["scale"]],
                {"norm_eps": float(m["norm_eps"]), "hc_eps": float(m["hc_eps"])}, [m.root.type], base="mhc_head")
    return y


def _check_post(m: Match) -> bool:
    return all(isinstance(m[k].type, TensorType) for k in ("f", "h", "post", "comb")) and \
        str(m["h"].type) == str(m.root.type) and m["comb"].type.rank == m["h"].type.rank


def _build_post(m: Match, b: Builder) -> Value:
    (y,) = b.op("mhc.post", [m["f"], m["h"], m["post"], m["comb"]], {}, [m.root.type], base="mhc_post")
    return y


MHC_RULES = [
    Rewrite("mhc.post", MHC_POST, _build_post, _check_post),
    Rewrite("mhc.head", MHC_HEAD, _build_head, _check_head),
]
