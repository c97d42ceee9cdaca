"""Golden IR tests for each fusion pattern, each with near misses that must not match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.ir import Program, print_graph, verify_graph
from ds4c.ir.interpreter import run_graph
from ds4c.ops.attention import attention_reference
from ds4c.ops.mhc import mhc_pre_reference
from ds4c.ops.norms import rms_norm_reference
from ds4c.ops.rope import rope_reference
from ds4c.passes import PassContext, PassManager
from ds4c.passes.patterns import trace_function

PIPE = ["canonicalize_shapes", "fuse_norms_mhc", "fuse_rope", "fuse_attention", "fuse_moe", "dce"]


def fuse(fn, args, names, **attrs):
    g = trace_function(fn, args, names)
    ctx = PassContext(program_attrs=dict(attrs))
    out = PassManager(PIPE, ctx=ctx).run(Program({g.name: g}, ctx.program_attrs)).graphs[g.name]
    verify_graph(out)
    feeds = dict(zip(names, args, strict=True))
    want = run_graph(g, feeds, {})
    got = run_graph(out, feeds, {})
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    return out


def ops(g):
    return [op.name for op in g.ops]


def check_lines(text: str, *checks: str) -> None:
    """FileCheck-style: every check appears, in order."""
    pos = 0
    for c in checks:
        i = text.find(c, pos)
        assert i >= 0, f"CHECK '{c}' not found after position {pos} in:\n{text}"
        pos = i + len(c)


# -- rms_norm -------------------------------------------------------------------------------------------

def test_rms_norm_weighted_and_unweighted():
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    g = fuse(lambda x, w: rms_norm_reference(x, w, 1e-6), [x, w], ["x", "w"])
    check_lines(print_graph(g), "%rms_norm", "= rms_norm(%x, %w, eps=1e-06) : f32[2,5,16]", "return")
    g = fuse(lambda x: rms_norm_reference(x, None, 1e-5), [x], ["x"])
    assert ops(g) == ["rms_norm"] and g.ops[0].kwargs["eps"] == 1e-5


def test_rms_norm_near_miss_wrong_axis():
    def wrong(x, w):
        h = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)  # mean over the sequence, not channels
        return w * h

    g = fuse(wrong, [torch.randn(2, 5, 16), torch.randn(16)], ["x", "w"])
    assert "rms_norm" not in ops(g)


# -- rope -------------------------------------------------------------------------------------------------

def test_rope_partial_interleaved():
    x, cos, sin = torch.randn(1, 4, 6, 32), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    g = fuse(lambda x, c, s: rope_reference(x, c, s, 8), [x, cos, sin], ["x", "cos", "sin"])
    check_lines(print_graph(g), "= rope(%x, %cos, %sin, rope_dim=8, inverse=false)")
    g = fuse(lambda x, c, s: rope_reference(x, c, s, 8, inverse=True), [x, cos, sin], ["x", "cos", "sin"])
    check_lines(print_graph(g), "= rope(%x, %cos, %sin, rope_dim=8, inverse=true)")


def test_rope_near_miss_half_split_rotation():
    def neox(x, cos, sin):  # NeoX rotate_half is not V4's interleaved pairs
        nope, rot = x[..., :-8], x[..., -8:]
        half = torch.cat([-rot[..., 4:], rot[..., :4]], dim=-1)
        return torch.cat([nope, rot * cos + half * sin], dim=-1)

    g = fuse(neox, [torch.randn(1, 4, 6, 32), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)], ["x", "cos", "sin"])
    assert "rope" not in ops(g)


# -- mHC --------------------------------------------------------------------------------------------------

def _mhc_args(n=4, d=16):
    return [torch.randn(2, 3, n, d), 0.1 * torch.randn((2 + n) * n, n * d), torch.randn((2 + n) * n), torch.randn(3)]


def test_mhc_pre_fuses_with_the_models_sinkhorn_count():
    def pre(h, fn, base, scale):
        return mhc_pre_reference(h, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=7)

    g = fuse(pre, _mhc_args(), ["h", "fn", "base", "scale"], model_config={"hc_sinkhorn_iters": 7})
    assert ops(g) == ["mhc.pre"]
    check_lines(print_graph(g), "= mhc.pre(%h, %fn, %base, %scale, norm_eps=1e-06, hc_eps=1e-06, sinkhorn_iters=7)")


def test_mhc_pre_near_miss_different_sinkhorn_count():
    def pre(h, fn, base, scale):
        return mhc_pre_reference(h, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=5)

    g = fuse(pre, _mhc_args(), ["h", "fn", "base", "scale"], model_config={"hc_sinkhorn_iters": 7})
    assert "mhc.pre" not in ops(g)


# -- attention ----------------------------------------------------------------------------------------------

def _attn_args():
    return [torch.randn(1, 4, 6, 32), torch.randn(1, 1, 6, 32), torch.zeros(1, 1, 6, 6), torch.randn(4)]


def test_attention_core():
    g = fuse(lambda q, k, b, s: attention_reference(q, k, b, s, 0.125), _attn_args(), ["q", "keys", "bias", "sinks"])
    assert ops(g) == ["attention.sliding"]
    check_lines(print_graph(g), "= attention.sliding(%q, %keys, %bias, %sinks, scale=0.125)")


def test_attention_near_misses_missing_sink_and_wrong_axis():
    def no_sink(q, k, b, s):
        kv = k[:, :, None].expand(1, 1, 4, 6, 32).reshape(1, 4, 6, 32)
        p = F.softmax(torch.matmul(q, kv.transpose(2, 3)) * 0.125 + b, dim=-1)
        return torch.matmul(p, kv)

    def wrong_axis(q, k, b, s):
        kv = k[:, :, None].expand(1, 1, 4, 6, 32).reshape(1, 4, 6, 32)
        logits = torch.matmul(q, kv.transpose(2, 3)) * 0.125 + b
        c = torch.cat([logits, s.reshape(1, -1, 1, 1).expand(1, -1, 6, -1)], dim=-1)
        c = c - c.max(dim=-1, keepdim=True).values
        p = F.softmax(c, dim=-2, dtype=c.dtype)  # normalised over queries: not attention
        return torch.matmul(p[..., :-1], kv)

    for fn in (no_sink, wrong_axis):
        g = fuse(fn, _attn_args(), ["q", "keys", "bias", "sinks"])
        assert not any(o.startswith("attention.") for o in ops(g)), fn.__name__


# -- MoE ---------------------------------------------------------------------------------------------------

def _moe_args(hashed: bool):
    g = torch.Generator().manual_seed(0)
    e, d, i, k = 4, 16, 8, 2
    x = torch.randn(1, 5, d, generator=g)
    ids = torch.randint(0, 32, (1, 5), generator=g)
    sel = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(32)]) if hashed else torch.randn(e, generator=g)
    return [x, ids, torch.randn(e, d, generator=g), sel, torch.randn(e, 2 * i, d, generator=g),
            torch.randn(e, d, i, generator=g), torch.randn(i, d, generator=g), torch.randn(i, d, generator=g),
            torch.randn(d, i, generator=g)]


NAMES = ["x", "ids", "router", "selector", "gate_up", "down", "s_gate", "s_up", "s_down"]


def test_moe_bias_and_hash_routing():
    from ds4c.ops.moe import moe_gather_formulation as moe_reference

    for hashed in (False, True):
        def fn(*a, hashed=hashed):
            return moe_reference(*a, top_k=2, route_scale=1.5, swiglu_limit=10.0, routing="hash" if hashed else "bias",
                                 score="sqrtsoftplus")

        g = fuse(fn, _moe_args(hashed), NAMES, model_config={"swiglu_limit": 10.0})
        assert ops(g) == ["moe"], ops(g)
        assert g.ops[0].kwargs["routing"] == ("hash" if hashed else "bias")


def test_moe_near_miss_different_clamp():
    from ds4c.ops.moe import moe_gather_formulation as moe_reference

    def fn(*a):  # clamp 7 where the model says 10
        return moe_reference(*a, top_k=2, route_scale=1.5, swiglu_limit=7.0, routing="bias", score="sqrtsoftplus")

    g = fuse(fn, _moe_args(False), NAMES, model_config={"swiglu_limit": 10.0})
    assert "moe" not in ops(g)


def test_moe_reference_equals_the_traced_formulation():
    from ds4c.ops.moe import moe_gather_formulation, moe_reference

    for hashed in (False, True):
        args = _moe_args(hashed)
        kw = dict(top_k=2, route_scale=1.5, swiglu_limit=10.0, routing="hash" if hashed else "bias", score="sqrtsoftplus")
        torch.testing.assert_close(moe_reference(*args, **kw), moe_gather_formulation(*args, **kw), atol=1e-5, rtol=1e-5)
