"""Activation quantisation references (ds4c.quant.activations): FP4 (MXFP4) activations."""

from __future__ import annotations

import torch

from ds4c.quant.activations import (
    ACTIVATION_BLOCKS,
    mxfp4_roundtrip,
    mxfp4_scale_exponents,
    roundtrip,
)
from ds4c.quant.formats import E2M1_VALUES, dequant_mxfp4, quant_mxfp4, round_to_e2m1


def test_e2m1_rounding_is_nearest_on_the_grid_ties_to_the_even_code():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e9])
    v = torch.cat([torch.linspace(-8, 8, 64001), ties, -ties, torch.tensor([0.0, -0.0, 1e-30])])
    grid = E2M1_VALUES[:8]
    mag = v.abs().clamp(max=6.0)
    dist = (mag[:, None] - grid).abs()
    nearest = dist == dist.min(-1, keepdim=True).values
    code = torch.where(nearest.sum(-1) > 1, (nearest & (torch.arange(8) % 2 == 0)).int().argmax(-1),
                       nearest.int().argmax(-1))  # a tie: the even code
    want = torch.where(v < 0, -grid[code], grid[code])
    assert torch.equal(round_to_e2m1(v), want)
    # ties go to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert round_to_e2m1(ties[:7]).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_mxfp4_activations_are_the_weight_format_per_token_block():
    """Per token and 32 channels, the same scale and values as MXFP4 weight packing (OCP MX), in
    the input's dtype; representable inputs come back unchanged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, generator=g) * torch.logspace(-3, 3, 256)
    q, s = quant_mxfp4(x.reshape(-1, 256))
    want = dequant_mxfp4(q, s, 32, out_dtype=torch.float32).view(2, 3, 256)
    assert torch.equal(mxfp4_roundtrip(x), want)
    assert torch.equal(mxfp4_roundtrip(want), want)  # idempotent: e2m1 x 2^k values stay
    assert torch.equal(roundtrip(x.bfloat16(), "mxfp4"), mxfp4_roundtrip(x.bfloat16()))
    assert mxfp4_roundtrip(x.bfloat16()).dtype == torch.bfloat16 and ACTIVATION_BLOCKS["mxfp4"] == 32


def test_mxfp4_activation_error_is_within_half_a_quantum_and_scales_are_minimal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-2, 2, 96)
    x[0, :32] = 0  # an all-zero block
    blocks = x.view(64, 3, 32)
    amax = blocks.abs().amax(-1)
    k = mxfp4_scale_exponents(amax).float()
    # the smallest power of two that brings the block under 6 (amax floored at 1e-4)
    assert bool((amax.clamp_min(1e-4) <= 6 * torch.exp2(k)).all())
    assert bool((amax.clamp_min(1e-4) > 6 * torch.exp2(k - 1)).all())
    err = (mxfp4_roundtrip(x).view(64, 3, 32) - blocks).abs()
    # quantum of e2m1 is at most 2 (between 4 and 6): half of it times the scale bounds the error
    assert bool((err <= torch.exp2(k)[..., None] + 1e-12).all())
    assert torch.equal(mxfp4_roundtrip(x)[0, :32], torch.zeros(32))
    # ragged channels (not a multiple of 32) pad the last block with zeros
    y = torch.randn(5, 40, generator=g)
    assert torch.equal(mxfp4_roundtrip(y)[:, :32], mxfp4_roundtrip(y[:, :32]))


def test_moe_quantises_the_expert_gemm_inputs_like_deepseeks_fp8_experts():
    """``moe`` with ``act="fp8"``: each picked expert multiplies the token's row quantised per 128
    channels (the router reads it unquantised) and its SwiGLU output quantised the same way;
    ``shared_act`` does the same for the shared expert; the gather formulation (export) agrees."""
    import torch.nn.functional as F

    from ds4c.ops.moe import _route, moe_gather_formulation, moe_reference
    from tests.backends.triton.test_moe_kernels import make_inputs

    args = [a.cpu() for a in make_inputs(3, 4, 256, 256, torch.float32, "bias", 2, seed=5)]
    x, ids, router, selector, gate_up, down, s_gate, s_up, s_down = args
    kw = dict(top_k=2, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")

    def swiglu(gu):
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g.clamp(max=10.0)) * u.clamp(-10.0, 10.0)

    flat, idx, w = _route(x, ids, router, selector, 2, 1.5, "bias", "sqrtsoftplus")
    q = lambda t: roundtrip(t, "fp8")  # noqa: E731
    want = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for j in range(2):
            e = int(idx[t, j])
            want[t] += w[t, j] * (q(swiglu(q(flat[t]) @ gate_up[e].t())) @ down[e].t())
        xs = q(flat[t])
        want[t] += q(swiglu(torch.cat([xs @ s_gate.t(), xs @ s_up.t()]))) @ s_down.t()
    got = moe_reference(*args, **kw, act="fp8", shared_act="fp8")
    torch.testing.assert_close(got.view(-1, 256), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe_gather_formulation(*args, **kw, act="fp8", shared_act="fp8"), got,
                               atol=1e-5, rtol=1e-5)
    plain = moe_reference(*args, **kw)
    routed_only = moe_reference(*args, **kw, act="fp8")
    assert (plain - got).abs().max() > 1e-3 and (routed_only - got).abs().max() > 1e-4
