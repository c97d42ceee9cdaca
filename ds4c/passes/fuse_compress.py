"""Fusion of the compressors' gated pooling (+ norm) into ``compress`` and the lightning indexer into ``indexer.topk``."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.pattern_lib import CASTS
from ds4c.passes.patterns import Alt, Builder, Lit, Match, Maybe, Op, Rewrite, Wild, apply_rules

_SLOT = Lit(predicate=lambda v: v in (-2, 2), capture="dim")
POOL = Op("aten.sum.dim_IntList",
          Op("aten.mul.Tensor", Wild("kv"), Maybe(CASTS, Op("aten.softmax.int", Wild("score"), _SLOT, Wild(literals=True))),
             commutative=True),
          Lit(predicate=lambda v: v in ([-2], [2])))
COMPRESS = Op("rms_norm", POOL, Wild("norm_w"), eps=Lit(capture="eps"))

_Q = Maybe(CASTS, Wild("q"))
_K = Maybe(CASTS, Op("aten.transpose.int", Wild("keys"), Lit(predicate=lambda v: v in (-1, -2, 1, 2)),
                     Lit(predicate=lambda v: v in (-1, -2, 1, 2))))
_SCORES = Op("aten.mul.Tensor", Op("aten.relu.default",
                                   Op("aten.matmul.default", _Q, Op("aten.unsqueeze.default", _K, 1))),
             Lit(capture="softmax_scale"), commutative=True)
_W = Op("aten.mul.Tensor", Maybe(CASTS, Wild("w")), Lit(capture="weights_scale"), commutative=True)
INDEX = Op("aten.sum.dim_IntList", Op("aten.mul.Tensor", _SCORES, Op("aten.unsqueeze.default", _W, -1), commutative=True),
           [2])
_MASKED = Op("aten.masked_fill.Scalar", INDEX, Wild("future"), float("-inf"))
TOPK = Alt(Op("aten.topk.default", _MASKED, Lit(capture="k"), result_index=1),
           Op("aten.topk.default", _MASKED, Lit(capture="k"), -1, result_index=1))


def _check_compress(m: Match) -> bool:
    kv = m["kv"]
    return isinstance(kv.type, TensorType) and (m["dim"] in (-2, kv.type.rank - 2))


def _build_compress(m: Match, b: Builder) -> Value:
    (y,) = b.op("compress", [m["kv"], m["score"], m["norm_w"]], {"eps": float(m["eps"])}, [m.root.type],
                base="compress")
    return y


def _build_topk(m: Match, b: Builder) -> Value:
    (y,) = b.op("indexer.topk", [m["q"], m["keys"], m["w"], m["future"]],
                {"k": int(m["k"]), "softmax_scale": float(m["softmax_scale"]),
                 "weights_scale": float(m["weights_scale"])}, [m.root.type], base="index_topk")
    return y


RULES = [Rewrite("compress", COMPRESS, _build_compress, _check_compress), Rewrite("indexer.topk", TOPK, _build_topk)]


@register_pass("fuse_compress")
def fuse_compress(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse ``rms_norm(sum(kv * softmax(score, slots), slots))`` into ``compress`` and the indexer's scoring + top-k into ``indexer.topk``.

    Needs: fused ``rms_norm``. Guarantees: no slot softmax of a compressor and no indexer top-k is left.

        %p = softmax(%score, -2, f32)
        %s = sum(mul(%kv, %p), [-2])                 ->   %e = compress(%kv, %score, %w, eps=1e-06)
        %e = rms_norm(%s, %w, eps=1e-06)
    """
    return apply_rules(graph, ctx, RULES)
