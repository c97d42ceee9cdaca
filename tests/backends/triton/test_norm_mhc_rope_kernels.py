"""The ``rms_norm``, ``mhc.pre``/``.post``/``.head``, ``rope`` and ``rms_norm.rope`` launchers against their references."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.triton.kernels import _KERNELS
from ds4c.backends.triton.kernels.mhc import mhc_head, mhc_post, mhc_pre
from ds4c.backends.triton.kernels.norms import rms_norm
from ds4c.backends.triton.kernels.rope import rms_norm_rope, rope, rope_table
from ds4c.ops.mhc import mhc_head_reference, mhc_post_reference, mhc_pre_reference
from ds4c.ops.norms import rms_norm_reference
from ds4c.ops.rope import rms_norm_rope_reference, rope_reference, rope_table_reference
from tests.backends.triton.conftest import CTX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
             torch.float16: {"atol": 2e-3, "rtol": 2e-3}}
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def close(got, want):
    assert got is not NotImplemented
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[want.dtype])


# ---- rms_norm -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 96), (1, 1, 64), (2, 4, 3, 32), (2, 20000)])  # last: two passes
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(dtype, shape, weighted):
    x = randn(*shape, dtype=dtype, scale=3.0)
    w = randn(shape[-1], seed=1) if weighted else None
    close(rms_norm(CTX, x, w, eps=1e-6), rms_norm_reference(x, w, 1e-6))


def test_rms_norm_bf16_weight_on_fp32_input_and_strided_rows():
    x = randn(4, 6, 64, seed=2).transpose(0, 1)  # rows not evenly strided in memory
    w = randn(64, seed=3, dtype=torch.bfloat16)
    close(rms_norm(CTX, x, w, eps=1e-5), rms_norm_reference(x, w, 1e-5))


def test_rms_norm_normalises():
    x = randn(3, 128, seed=4, scale=7.0)
    y = rms_norm(CTX, x, None, eps=1e-6)
    torch.testing.assert_close(y.square().mean(-1), torch.ones(3, device=DEVICE), rtol=1e-4, atol=1e-4)


# ---- rope -----------------------------------------------------------------------------------------------------

def tables(s: int, rope_dim: int, seed: int = 7, lead=()):
    ang = randn(*lead, s, rope_dim // 2, seed=seed).repeat_interleave(2, dim=-1)
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("shape,rope_dim", [((2, 4, 5, 48), 16), ((1, 3, 1, 64), 64), ((2, 7, 40), 8)])
def test_rope(dtype, inverse, shape, rope_dim):
    x = randn(*shape, dtype=dtype)
    cos, sin = tables(shape[-2], rope_dim)
    out = rope(CTX, x, cos, sin, rope_dim=rope_dim, inverse=inverse)
    close(out, rope_reference(x, cos, sin, rope_dim, inverse))
    torch.testing.assert_close(out[..., :-rope_dim], x[..., :-rope_dim], rtol=0, atol=0)  # pass-through


def test_rope_inverse_undoes_rope_and_per_batch_tables():
    x = randn(2, 3, 4, 32, seed=1)
    cos, sin = tables(4, 16, lead=(2, 1))  # [B, 1, S, r]: a table per batch
    y = rope(CTX, x, cos, sin, rope_dim=16, inverse=False)
    close(y, rope_reference(x, cos, sin, 16, False))
    torch.testing.assert_close(rope(CTX, y, cos, sin, rope_dim=16, inverse=True), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, rope_reference(x, cos[:1].expand_as(cos), sin[:1].expand_as(sin), 16), atol=1e-3)


def test_rope_strided_input():
    x = randn(2, 5, 3, 32, seed=2).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    cos, sin = tables(5, 32)
    close(rope(CTX, x, cos, sin, rope_dim=32, inverse=False), rope_reference(x, cos, sin, 32, False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,scaling", [((1, 37), 1.0), ((2, 5), 0.75), ((3,), 1.0)])
def test_rope_table(dtype, shape, scaling):
    """The tables from positions up to YaRN-long contexts: within one rounding of the reference (cos
    and sin of fp32 angles may differ by an ulp between libraries), each pair's value repeated."""
    g = torch.Generator().manual_seed(5)
    positions = torch.randint(0, 70000, shape, generator=g).to(DEVICE)
    inv_freq = (10000.0 ** (-torch.arange(0, 32, 2).float() / 32)).to(DEVICE)
    name = dtype  # the attribute: a torch dtype, as aten.to.dtype takes
    cos, sin = rope_table(CTX, positions, inv_freq, scaling=scaling, dtype=name)
    want_cos, want_sin = rope_table_reference(positions, inv_freq, scaling=scaling, dtype=name)
    close(cos, want_cos)
    close(sin, want_sin)
    assert torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], sin[..., 1::2])
    assert rope_table(CTX, positions.float(), inv_freq, scaling=1.0, dtype=name) is NotImplemented
    row = (torch.arange(7) * 9973).to(DEVICE)
    for strided in (row.view(1, 7).expand(3, 7), row[::2], row.view(7, 1).expand(7, 2)):  # a batch's broadcast row
        close(rope_table(CTX, strided, inv_freq, scaling=scaling, dtype=name)[0],
              rope_table_reference(strided, inv_freq, scaling=scaling, dtype=name)[0])


def test_rope_declines():
    x = randn(2, 3, 16)
    cos, sin = tables(3, 8)
    assert rope(CTX, x, cos, sin, rope_dim=6, inverse=False) is NotImplemented  # tables of another width
    assert rope(CTX, randn(1, 1, 1, 1, 2, 16), cos, sin, rope_dim=8, inverse=False) is NotImplemented  # 5 leading dims


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("shape,rope_dim", [((2, 4, 3, 48), 16), ((1, 5, 1, 1100), 64), ((2, 7, 40), 40)])
def test_rms_norm_rope(dtype, weighted, shape, rope_dim):
    """Norm and rotation in one launch: rope(rms_norm(x)) with both ops' roundings; rows of more
    than one BLOCK_NOPE chunk (1100 - 64 channels), and rows that are all rotary channels."""
    x = randn(*shape, dtype=dtype, scale=3.0)
    w = randn(shape[-1], seed=2) if weighted else None
    cos, sin = tables(shape[-2], rope_dim)
    out = rms_norm_rope(CTX, x, w, cos, sin, eps=1e-6, rope_dim=rope_dim)
    close(out, rms_norm_rope_reference(x, w, cos, sin, 1e-6, rope_dim))
    # the same values as the two kernels one after the other (last-bit differences of the scale aside)
    two = rope(CTX, rms_norm(CTX, x, w, eps=1e-6), cos, sin, rope_dim=rope_dim, inverse=False)
    close(out, two)
    if dtype == torch.float32:
        torch.testing.assert_close(out, two, rtol=2e-6, atol=2e-6)


def test_rms_norm_rope_strided_input_and_declines():
    """A transposed query ([B, S, H, D] read as [B, H, S, D]) is read through its strides."""
    x = randn(2, 6, 4, 80, scale=2.0).transpose(1, 2)
    cos, sin = tables(6, 16, lead=(2, 1))
    w = randn(80, seed=3)
    close(rms_norm_rope(CTX, x, w, cos, sin, eps=1e-6, rope_dim=16), rms_norm_rope_reference(x, w, cos, sin, 1e-6, 16))
    assert rms_norm_rope(CTX, x, randn(79), cos, sin, eps=1e-6, rope_dim=16) is NotImplemented  # weight of another width
    assert rms_norm_rope(CTX, x, w, cos, sin, eps=1e-6, rope_dim=6) is NotImplemented


# ---- mHC ------------------------------------------------------------------------------------------------------

def mhc_inputs(lead, n, d, dtype, seed=0, n_mix=None):
    n_mix = n * (n + 2) if n_mix is None else n_mix
    h = randn(*lead, n, d, seed=seed, dtype=dtype)
    fn = randn(n_mix, n * d, seed=seed + 1, scale=(n * d) ** -0.5 * 4)
    base = randn(n_mix, seed=seed + 2, scale=0.5)
    scale = randn(3 if n_mix > n else 1, seed=seed + 3).abs() + 0.5
    return h, fn, base, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,d,iters", [
    ((1, 1), 4, 64, 20),     # decode: one token, K split over many programs
    ((2, 20), 4, 32, 20),    # 40 tokens: three token blocks
    ((3,), 3, 48, 1),        # N=3 padded to 4; one Sinkhorn step
    ((1, 2), 4, 1024, 5),    # K = 4096 over several K steps per split; D over two collapse chunks
])
def test_mhc_pre(dtype, lead, n, d, iters):
    h, fn, base, scale = mhc_inputs(lead, n, d, dtype)
    kw = dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=iters)
    got = mhc_pre(CTX, h, fn, base, scale, **kw)
    want = mhc_pre_reference(h, fn, base, scale, **kw)
    assert got is not NotImplemented and len(got) == 3
    for a, b in zip(got, want, strict=True):
        close(a, b)
    columns = got[2].sum(-2)  # Sinkhorn ends on a column step
    torch.testing.assert_close(columns, torch.ones_like(columns), rtol=1e-4, atol=1e-4)


def test_mhc_pre_bf16_fn():
    h, fn, base, scale = mhc_inputs((2,), 4, 64, torch.bfloat16, seed=3)
    kw = dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)
    for a, b in zip(mhc_pre(CTX, h, fn.to(torch.bfloat16), base, scale, **kw),
                    mhc_pre_reference(h, fn.to(torch.bfloat16), base, scale, **kw), strict=True):
        close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,d", [((1, 1), 4, 64), ((2, 3), 4, 1500), ((5,), 3, 40)])
def test_mhc_post(dtype, lead, n, d):
    f = randn(*lead, d, seed=1, dtype=dtype)
    h = randn(*lead, n, d, seed=2, dtype=dtype)
    post = 2 * torch.sigmoid(randn(*lead, n, seed=3))
    comb = torch.softmax(randn(*lead, n, n, seed=4), dim=-1)
    close(mhc_post(CTX, f, h, post, comb), mhc_post_reference(f, h, post, comb))


def test_mhc_post_reads_comb_transposed():
    f, h = randn(2, 32, seed=1), randn(2, 4, 32, seed=2)
    post, comb = torch.rand(2, 4, device=DEVICE), torch.rand(2, 4, 4, device=DEVICE)
    got = mhc_post(CTX, f, h, post, comb)
    close(got, mhc_post_reference(f, h, post, comb))
    assert not torch.allclose(got, mhc_post_reference(f, h, post, comb.transpose(-1, -2)), atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,d,scale_n", [((1, 1), 4, 64, 1), ((2, 20), 4, 32, 4), ((3,), 2, 40, 1),
                                                  ((1, 2), 4, 1100, 4)])  # D over 3 collapse programs, ragged
def test_mhc_head(dtype, lead, n, d, scale_n):
    h, fn, base, _ = mhc_inputs(lead, n, d, dtype, n_mix=n)
    scale = randn(scale_n, seed=9).abs() + 0.5
    kw = dict(norm_eps=1e-6, hc_eps=1e-6)
    close(mhc_head(CTX, h, fn, base, scale, **kw), mhc_head_reference(h, fn, base, scale, **kw))


def test_mhc_declines_wrong_fn_shape():
    h, fn, base, scale = mhc_inputs((2,), 4, 32, torch.float32)
    assert mhc_pre(CTX, h, fn[:, :64], base, scale, norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=3) is NotImplemented
    assert mhc_head(CTX, h, fn, base, scale, norm_eps=1e-6, hc_eps=1e-6) is NotImplemented  # 24 mix rows, not N


def test_registered():
    assert _KERNELS["rms_norm"] is rms_norm and _KERNELS["rope"] is rope and _KERNELS["rms_norm.rope"] is rms_norm_rope
    assert _KERNELS["mhc.pre"] is mhc_pre and _KERNELS["mhc.post"] is mhc_post and _KERNELS["mhc.head"] is mhc_head
