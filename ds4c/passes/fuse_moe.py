"""Fusion of the routed + shared experts of a DeepSeek-V4 MoE layer into one ``moe`` op."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.pattern_lib import CASTS, VIEWS
from ds4c.passes.patterns import Alt, Builder, Lit, Match, Maybe, Op, Rewrite, Wild, apply_rules

_ANY = Wild(literals=True)
_FLOAT = Lit(predicate=lambda v: isinstance(v, float))


def _flat(name: str) -> Op:
    return Op(VIEWS, Wild(name), _ANY)


SCORES = Alt(Op("aten.sqrt.default", Op("aten.softplus.default", Op("aten.linear.default", _flat("x"), Wild("router")))),
             capture="scores")
HASH_IDX = Maybe(CASTS, Op("aten.index.Tensor", Wild("selector"), [Op(VIEWS, Wild("ids"), _ANY)]))
BIAS_IDX = Op("aten.topk.default", Op("aten.add.Tensor", SCORES, Wild("selector"), commutative=True),
              Lit(capture="top_k"), -1, True, False, result_index=1)
IDX = Alt(HASH_IDX, BIAS_IDX, capture="idx")
_G = Op("aten.gather.default", SCORES, 1, IDX)
WEIGHTS = Op("aten.mul.Tensor", Op("aten.div.Tensor", _G, Op("aten.add.Tensor", Op("aten.sum.dim_IntList", _G, [-1], True),
                                                              1e-20, commutative=True)),
             Lit(capture="route_scale"), commutative=True)
SEL = Op(VIEWS, IDX, [-1], capture="sel")


def _bmm_expert(weight: str, vec) -> Op:
    return Op("aten.squeeze.dim", Op("aten.bmm.default", Op("aten.index.Tensor", Wild(weight), [SEL]),
                                     Op("aten.unsqueeze.default", vec, -1)), -1)


_PICKED = Op("aten.repeat_interleave.self_int", _flat("x"), Lit(capture="k2"), 0)
_GU = _bmm_expert("gate_up", _PICKED)
_GATE = Alt(Op("aten.chunk.default", _GU, 2, -1, result_index=0), Op("aten.split.Tensor", _GU, _ANY, -1, result_index=0))
_UP = Alt(Op("aten.chunk.default", _GU, 2, -1, result_index=1), Op("aten.split.Tensor", _GU, _ANY, -1, result_index=1))


def _swiglu(gate, up) -> Op:
    return Op("aten.mul.Tensor", Op("aten.silu.default", Op("aten.clamp.default", gate, None, Lit(capture="limit_g"))),
              Op("aten.clamp.default", up, Lit(capture="limit_lo"), Lit(capture="limit_hi")))


_H = _swiglu(_GATE, _UP)
_OUT = Op("aten.mul.Tensor", _bmm_expert("down", _H),
          Op("aten.unsqueeze.default", Op(VIEWS, WEIGHTS, [-1]), -1), commutative=True)
ROUTED = Op(VIEWS, Maybe(CASTS, Op("aten.sum.dim_IntList", Op(VIEWS, _OUT, _ANY), [1])), _ANY)
_S_GATE = Op("aten.clamp.default", Op("aten.linear.default", Wild("x"), Wild("s_gate")), None, Lit(capture="slimit_g"))
_S_UP = Op("aten.clamp.default", Op("aten.linear.default", Wild("x"), Wild("s_up")), Lit(capture="slimit_lo"),
           Lit(capture="slimit_hi"))
SHARED = Op("aten.linear.default", Op("aten.mul.Tensor", Op("aten.silu.default", _S_GATE), _S_UP), Wild("s_down"))
MOE = Op("aten.add.Tensor", ROUTED, SHARED, commutative=True)


def _make_check(limit: float | None):
    def check(m: Match) -> bool:
        lims = [m["limit_g"], m["limit_hi"], -m["limit_lo"], m["slimit_g"], m["slimit_hi"], -m["slimit_lo"]]
        if any(not isinstance(v, float) for v in lims) or len(set(lims)) != 1:
            return False  # gate clamp and up clamp must share one limit, symmetric for up
        if limit is not None and lims[0] != float(limit):
            return False
        x = m["x"]
        return isinstance(x.type, TensorType) and str(x.type) == str(m.root.type)
    return check


def _build(m: Match, b: Builder) -> Value:
    hashed = m.producers.get(m["idx"]).name != "aten.topk.default"
    sel_type = m["selector"].type
    top_k = sel_type.shape[-1] if hashed else int(m["top_k"])
    ids = m.get("ids")
    if ids is None:
        ids = m["x"]  # placeholder operand: bias routing never reads token ids
    (y,) = b.op("moe", [m["x"], ids, m["router"], m["selector"], m["gate_up"], m["down"], m["s_gate"], m["s_up"],
                        m["s_down"]],
                {"top_k": int(top_k), "route_scale": float(m["route_scale"]), "swiglu_limit": float(m["limit_g"]),
                 "routing": "hash" if hashed else "bias", "score": "sqrtsoftplus"}, [m.root.type], base="moe")
    return y


@register_pass("fuse_moe")
def fuse_moe(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse router (sqrt-softplus, bias or hash selection, normalise, scale), clamped-SwiGLU experts and the shared expert into ``moe``.

    Needs: canonical shapes. Guarantees: no router top-k and no per-expert bmm is left. The
    clamps must all equal the model's ``swiglu_limit`` (when known) and be symmetric for ``up``.

        %scores = sqrt(softplus(linear(%x, %router)))
        %idx = topk(add(%scores, %bias), 6, -1, true, false)[1]      ->   %y = moe(%x, %ids, %router, %bias, ...)
        ... bmm(index(%gate_up, [%sel]), ...) ... clamp ... silu ... bmm(index(%down, ...)) ... sum ...
        %y = add(view(%routed), linear(silu(clamp(...)) * clamp(...), %s_down))
    """
    limit = (ctx.program_attrs.get("model_config") or {}).get("swiglu_limit")
    return apply_rules(graph, ctx, [Rewrite("moe", MOE, _build, _make_check(limit))])
