"""Fusion of DeepSeek-V4's partial interleaved RoPE (and its inverse) into ``rope``."""

from __future__ import annotations

from ds4c.ir.graph import Graph, Value
from ds4c.ir.registry import ops_with
from ds4c.ir.types import TensorType
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.pattern_lib import CASTS, VIEWS
from ds4c.passes.patterns import Alt, Builder, Lit, Match, Maybe, Op, Rewrite, Wild, apply_rules

_INT = Lit(predicate=lambda v: isinstance(v, int) and not isinstance(v, bool))


def _slice(x, start, end, step=None, capture=None):
    args = [x, Lit(predicate=lambda v: isinstance(v, int), capture="dim"), start, end]
    if step is not None:
        args.append(step)
    return Op("aten.slice.Tensor", *args, capture=capture)


_ROT = _slice(Wild("x"), Lit(capture="rot_start"), Lit(capture="rot_end"), capture="rot")
_NOPE = _slice(Wild("x"), Lit(None, predicate=lambda v: v in (0, None)), Lit(capture="nope_end"))
_STACK = Op("aten.stack.default", [Op("aten.neg.default", _slice(_ROT, 1, _INT, 2)), _slice(_ROT, 0, _INT, 2)],
            Lit(predicate=lambda v: v == -1))
_HALF = Alt(Op(VIEWS, _STACK, Wild(literals=True)), Op("aten.flatten.using_ints", _STACK, -2), Op("aten.flatten.using_ints", _STACK, -2, -1))
_ROTATED = Maybe(CASTS, Op("aten.add.Tensor",
                           Op("aten.mul.Tensor", Maybe(CASTS, _ROT), Wild("cos"), commutative=True),
                           Op("aten.mul.Tensor", Maybe(CASTS, _HALF), Wild("sin"), commutative=True)))
ROPE = Op("aten.cat.default", [_NOPE, _ROTATED], Lit(capture="cat_dim"))


def _check(m: Match) -> bool:
    x = m["x"]
    if not isinstance(x.type, TensorType) or str(x.type) != str(m.root.type):
        return False
    rank, d = x.type.rank, x.type.shape[-1]
    if m["dim"] not in (-1, rank - 1) or m["cat_dim"] not in (-1, rank - 1):
        return False
    rot = m["rot"].type
    if not isinstance(rot, TensorType) or not isinstance(rot.shape[-1], int):
        return False
    r = rot.shape[-1]
    if r % 2 or m["nope_end"] not in (-r, (d - r) if isinstance(d, int) else None):
        return False
    return m["rot_start"] in (-r, (d - r) if isinstance(d, int) else None)


_LAYOUT = ops_with("reshape") | ops_with("broadcast")  # they commute with negation


def _un_negate(m: Match, b: Builder, v: Value) -> Value | None:
    """If ``v`` is layout ops over ``neg(t)``, rebuild the same layout ops over ``t``."""
    chain = []
    cur = v
    while True:
        op = m.producers.get(cur)
        if op is None:
            return None
        if op.name == "aten.neg.default":
            base = op.args[0]
            break
        if op.name not in _LAYOUT or not op.args or not isinstance(op.args[0], Value):
            return None
        chain.append(op)
        cur = op.args[0]
    for op in reversed(chain):
        (base,) = b.op(op.name, [base, *op.args[1:]], op.kwargs, [op.results[0].type], base=op.results[0].name)
    return base


def _build(m: Match, b: Builder) -> Value:
    sin, inverse = m["sin"], False
    positive = _un_negate(m, b, sin)
    if positive is not None:  # rope with a negated table is the inverse rotation
        sin, inverse = positive, True
    (y,) = b.op("rope", [m["x"], m["cos"], sin], {"rope_dim": m["rot"].type.shape[-1], "inverse": inverse},
                [m.root.type], base="rope")
    return y


@register_pass("fuse_rope")
def fuse_rope(graph: Graph, ctx: PassContext) -> Graph:
    """Fuse ``cat([x[..., :-r], x_rot*cos + rotate_pairs(x_rot)*sin])`` into ``rope`` (``inverse`` when sin is negated).

    Needs: nothing. Guarantees: every partial interleaved rotation is one ``rope`` op.

        %nope = aten.slice.Tensor(%x, 3, 0, -8)
        %rot = aten.slice.Tensor(%x, 3, -8, 9223372036854775807)
        ... stack([-odd, even]) ... mul cos, mul sin, add ...   ->  %y = rope(%x, %cos, %sin, rope_dim=8, inverse=false)
        %y = aten.cat.default([%nope, %add], -1)
    """
    return apply_rules(graph, ctx, [Rewrite("rope", ROPE, _build, _check)])
