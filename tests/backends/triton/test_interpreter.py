"""Triton's interpreter swaps the language once per launch, not once per helper call
(ds4c.backends.triton.kernels.interpreter), and computes the same."""

from __future__ import annotations

import os

import pytest
import torch

from ds4c.backends.triton.kernels import get_kernel, interpreter
from ds4c.ops.mhc import mhc_pre_reference
from tests.backends.triton.conftest import CTX

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only (CPU)")


def test_one_language_swap_per_launch(monkeypatch):
    from triton.runtime import interpreter as it

    mhc_pre = get_kernel("mhc.pre")  # loading the kernels installs the patch
    assert interpreter.install()
    swaps = []
    patch = it._patch_lang
    monkeypatch.setattr(it, "_patch_lang", lambda fn: swaps.append(fn.__name__) or patch(fn))
    g = torch.Generator().manual_seed(0)
    n, d, tokens = 4, 64, 8
    h = torch.randn(1, tokens, n, d, generator=g)
    fn = 0.1 * torch.randn(n * (n + 2), n * d, generator=g)
    base, scale = torch.randn(n * (n + 2), generator=g), torch.rand(3, generator=g)
    kw = dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    got = mhc_pre(CTX, h, fn, base, scale, **kw)
    # two launches (mix, finish); Triton's own helpers (tl.sum, tl.sigmoid) swap tl.core once per
    # launch; unpatched, every helper call of every program swaps again (hundreds here)
    assert {"_mix_kernel", "_pre_finish_kernel"} <= set(swaps) and len(swaps) <= 6, swaps
    for a, b in zip(got, mhc_pre_reference(h, fn, base, scale, **kw), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
