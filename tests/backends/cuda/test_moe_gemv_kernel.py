"""The decode MoE kernel (expert GEMVs over picked experts) equals the ``moe`` reference."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.cuda.kernels.moe_gemv import MAX_PAIRS, moe
from ds4c.ops.moe import moe_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(tokens: int, experts: int, d: int, inter: int, dtype, routing: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(DEVICE)  # noqa: E731
    x = r(1, tokens, d)
    ids = torch.randint(0, 50, (1, tokens), generator=g).to(DEVICE)
    router = r(experts, d, scale=d ** -0.5)
    if routing == "hash":
        selector = torch.randint(0, experts, (50, 2), generator=g).to(DEVICE)
    else:
        selector = (torch.randn(experts, generator=g) * 0.1).to(DEVICE)
    gate_up = r(experts, 2 * inter, d, scale=d ** -0.5)
    down = r(experts, d, inter, scale=inter ** -0.5)
    s_gate, s_up, s_down = r(inter, d, scale=d ** -0.5), r(inter, d, scale=d ** -0.5), r(d, inter, scale=inter ** -0.5)
    return (x, ids, router, selector, gate_up, down, s_gate, s_up, s_down)


@pytest.mark.parametrize("tokens,routing,score,limit", [(1, "bias", "sqrtsoftplus", 10.0), (3, "bias", "sigmoid", 0.5),
                                                        (2, "hash", "sqrtsoftplus", 10.0)])
def test_matches_reference_fp32(tokens, routing, score, limit):
    args = _inputs(tokens, 8, 96, 40, torch.float32, routing)
    kw = dict(top_k=2, route_scale=1.5, swiglu_limit=limit, routing=routing, score=score)
    got = moe(*args, **kw)
    want = moe_reference(*args, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_clamp_is_applied():
    args = list(_inputs(2, 8, 64, 32, torch.float32, "bias"))
    args[4] = args[4] * 50  # large pre-activations: the clamps decide the result
    kw = dict(top_k=2, route_scale=1.0, swiglu_limit=0.25, routing="bias", score="sigmoid")
    torch.testing.assert_close(moe(*args, **kw), moe_reference(*args, **kw), rtol=1e-5, atol=1e-5)


def test_bf16_close():
    args = _inputs(2, 16, 128, 64, torch.bfloat16, "bias", seed=3)
    kw = dict(top_k=4, route_scale=2.0, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")
    torch.testing.assert_close(moe(*args, **kw).float(), moe_reference(*args, **kw).float(), rtol=3e-2, atol=3e-2)


def test_declines_prefill_sized_fp32_inputs():
    args = list(_inputs(1, 8, 32, 16, torch.float32, "bias"))
    args[0] = torch.randn(1, MAX_PAIRS, 32, device=DEVICE)
    args[1] = torch.zeros(1, MAX_PAIRS, dtype=torch.long, device=DEVICE)
    assert moe(*args, top_k=2, route_scale=1.0, swiglu_limit=1.0, routing="bias", score="sigmoid") is NotImplemented


def test_prefill_grouped_path_bf16():
    args = list(_inputs(1, 16, 64, 32, torch.bfloat16, "bias", seed=5))
    g = torch.Generator().manual_seed(6)
    args[0] = torch.randn(1, MAX_PAIRS, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    args[1] = torch.zeros(1, MAX_PAIRS, dtype=torch.long, device=DEVICE)
    kw = dict(top_k=2, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")
    got = moe(*args, **kw)
    assert got is not NotImplemented
    torch.testing.assert_close(got.float(), moe_reference(*args, **kw).float(), rtol=3e-2, atol=3e-2)
