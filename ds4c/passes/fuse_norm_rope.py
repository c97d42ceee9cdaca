"""fuse_norm_rope: a query's or key's RMS norm and its rotary embedding as one op (Triton targets).

DeepSeek-V4 normalises each attention query head (``rms_norm`` without weight) and the key/value
row (``kv_norm``), then rotates their last ``rope_dim`` channels: two launches and a round trip of
the row through memory, for a few KB per token. In a decode step (one token) both kernels are
bound by launch latency, not by bytes. Where a ``rope`` reads, through layout ops that keep the
last dim whole, the only use of an ``rms_norm``, the pair becomes one ``rms_norm.rope`` (the rope
kernel with a norm prologue, ``kernels/rope.py``); the layout ops move before it (a row-wise norm
commutes with them)::

    %n = rms_norm(%k, %w, eps=1e-06)              %v = aten.view.default(%k, [B, 1, 1, 512])
    %v = aten.view.default(%n, [B, 1, 1, 512])  ->  %t = aten.transpose.int(%v, 1, 2)
    %t = aten.transpose.int(%v, 1, 2)              %y = rms_norm.rope(%t, %w, %cos, %sin, ...)
    %y = rope(%t, %cos, %sin, rope_dim=64, inverse=false)

The fused op keeps the rope's result; the layout ops keep theirs. The compile option
``fuse_norm_rope=False`` (``ds4c compile --no-fuse-norm-rope``) keeps them apart, for A/B runs.
"""

from __future__ import annotations

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.types import TensorType
from ds4c.passes.lower_packed_weights import lowers_for
from ds4c.passes.manager import PassContext, register_pass
from ds4c.passes.pattern_lib import VIEWS


def _keeps_rows(op: Op) -> bool:
    """Whether layout op ``op`` maps the rows (last dim) of its input onto rows of its result whole,
    so that a row-wise norm before it equals the same norm after it."""
    x, y = op.args[0] if op.args else None, op.results[0]
    if not isinstance(x, Value) or not isinstance(x.type, TensorType) or not isinstance(y.type, TensorType):
        return False
    d_in, d_out = x.type.shape[-1:], y.type.shape[-1:]
    if not d_in or d_in != d_out or not isinstance(d_in[0], int) or x.type.dtype != y.type.dtype:
        return False
    if op.name in VIEWS:
        return True  # same trailing size, row-major order kept: row k stays row k
    rank_in, rank_out = x.type.rank, y.type.rank
    if op.name == "aten.transpose.int" and len(op.args) == 3:
        return all(isinstance(d, int) and d % rank_in != rank_in - 1 for d in op.args[1:])
    if op.name == "aten.unsqueeze.default" and len(op.args) == 2 and isinstance(op.args[1], int):
        return op.args[1] % rank_out != rank_out - 1
    return False


@register_pass("fuse_norm_rope")
def fuse_norm_rope(graph: Graph, ctx: PassContext) -> Graph:
    """Every ``rope(layout*(rms_norm(x)))`` as ``rms_norm.rope`` (Triton targets, unless the compile
    option ``fuse_norm_rope`` is off). Only a forward rope (``inverse=false``) over a norm whose
    result, and each layout result on the way, has that single use and is no graph output."""
    if not lowers_for(ctx.target) or not ctx.options.get("fuse_norm_rope", True):
        return graph
    producer, users, outputs = graph.producers(), graph.users(), set(graph.output_values())
    single = {v for v, us in users.items() if len(us) == 1 and v not in outputs}
    dropped: set[Op] = set()
    rewritten: dict[Op, Op] = {}
    for op in graph.ops:
        if op.name != "rope" or op.kwargs.get("inverse") or not isinstance(op.args[0], Value):
            continue
        chain: list[Op] = []
        v = op.args[0]
        while v in producer and producer[v].name != "rms_norm" and v in single and _keeps_rows(producer[v]):
            chain.append(producer[v])
            v = producer[v].args[0]
        norm = producer.get(v)
        if norm is None or norm.name != "rms_norm" or v not in single or norm in dropped:
            continue
        if not ctx.allow_rewrite(f"fuse %{norm.result.name} into rope %{op.result.name}"):
            continue
        x, w = norm.args
        if chain:  # the layout ops now read the norm's input
            first = chain[-1]
            rewritten[first] = first.replace(args=(x, *first.args[1:]))
            x = op.args[0]
        _, cos, sin = op.args
        rewritten[op] = op.replace(name="rms_norm.rope", args=(x, w, cos, sin),
                                   kwargs={"eps": norm.kwargs["eps"], "rope_dim": op.kwargs["rope_dim"]})
        dropped.add(norm)
    return graph.copy(ops=[rewritten.get(o, o) for o in graph.ops if o not in dropped]) if dropped else graph
