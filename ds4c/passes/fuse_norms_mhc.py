"""Fusion of normalisations (and, as they land, mHC pre/post/head) into single ops."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.patterns import Alt, Builder, Lit, Match, Maybe, Op, Rewrite, Wild, rewrite_graph

CASTS = ("aten._to_copy.default",)


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
    """Fuse RMS normalisations (weighted and unweighted) into ``rms_norm``.

    Needs: canonical shapes. Guarantees: no mean-of-squares/rsqrt chain of an RMS norm is left.

        %p = aten.pow.Tensor_Scalar(%x, 2)
        %m = aten.mean.dim(%p, [-1], true)
        %a = aten.add.Tensor(%m, 1e-06)
        %r = aten.rsqrt.default(%a)                 ->   %y = rms_norm(%x, %w, eps=1e-06)
        %n = aten.mul.Tensor(%x, %r)
        %y = aten.mul.Tensor(%w, %n)
    """
    fired: dict[str, int] = {}
    out = rewrite_graph(graph, RULES, budget=lambda rule, m: ctx.allow_rewrite(f"{rule} at %{m.root.name}"),
                        fired=fired)
    stats = ctx.program_attrs.setdefault("fusion", {}).setdefault(graph.name, {})
    for k, v in fired.items():
        stats[k] = stats.get(k, 0) + v
    return out
