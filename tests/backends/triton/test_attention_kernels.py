"""The Triton attention launcher against ``attention_reference`` (interpreter on CPU, real kernel on a GPU)."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.triton.kernels import get_kernel
from ds4c.backends.triton.kernels.attention import attention
from ds4c.ops.attention import attention_reference
from tests.backends.triton.conftest import CTX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def sliding_bias(s: int, t: int, window: int) -> torch.Tensor:
    """[1, 1, S, T]: query i (at position t - s + i) sees keys j with pos - window < j <= pos."""
    pos = torch.arange(t - s, t).view(-1, 1)
    j = torch.arange(t).view(1, -1)
    return torch.where((j <= pos) & (j > pos - window), 0.0, NEG_INF).view(1, 1, s, t)


def selection_bias(b: int, s: int, t: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    """[B, 1, S, T]: a random subset of entries visible to each query (as the indexer's top-k gives)."""
    return torch.where(torch.rand(b, 1, s, t, generator=gen) < keep, 0.0, NEG_INF)


def make_inputs(b, h, s, t, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=gen)
    keys = torch.randn(b, 1, t, d, generator=gen)
    sinks = torch.randn(h, generator=gen)
    return q.to(dtype), keys.to(dtype), sinks, gen


def check(q, keys, bias, sinks, scale):
    out = attention(CTX, q.to(DEVICE), keys.to(DEVICE), bias.to(DEVICE), sinks.to(DEVICE), scale=scale)
    assert out is not NotImplemented
    ref = attention_reference(q, keys, bias.to(q.dtype), sinks.to(q.dtype), scale)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOLERANCE[q.dtype])
    return out.cpu(), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,s,t,d", [
    (2, 8, 1, 40, 64),     # decode: window ++ compressed entries, heads on M
    (1, 16, 1, 90, 512),   # DeepSeek-V4-Flash head dim: D chunked, output split over programs
    (2, 4, 3, 70, 48),     # D not a power of two, T over one block
    (1, 4, 2, 33, 160),    # D chunked with a ragged last chunk
    (1, 8, 3, 70, 512),    # V4-Flash head dim with S > 1: block skipping, whole output per program
    (1, 2, 1, 4500, 16),   # decode over 71 key shares: the merge's share axis padded to 128
])
def test_selection_bias(b, h, s, t, d, dtype):
    q, keys, sinks, gen = make_inputs(b, h, s, t, d, dtype)
    bias = selection_bias(b, s, t, 0.5, gen)
    check(q, keys, bias, sinks, d ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_sliding_window_with_skipped_blocks(dtype):
    # S = T = 150 with a window of 20: most (query, key-block) tiles are fully masked and skipped.
    q, keys, sinks, _ = make_inputs(1, 2, 150, 150, 32, dtype)
    check(q, keys, sliding_bias(150, 150, 20), sinks, 0.3)


def test_bias_batch_one_broadcasts_and_batch_b_is_read_per_batch():
    q, keys, sinks, gen = make_inputs(3, 4, 5, 24, 32, torch.float32)
    check(q, keys, sliding_bias(5, 24, 8), sinks, 0.2)
    per_batch = selection_bias(3, 5, 24, 0.6, gen)
    out, _ = check(q, keys, per_batch, sinks, 0.2)
    # a kernel that read batch 0's bias for every batch would match this instead
    wrong = attention_reference(q, keys, per_batch[:1].expand(3, -1, -1, -1), sinks, 0.2)
    assert not torch.allclose(out, wrong, atol=1e-3)


def test_keys_batch_one_broadcast():
    q, keys, sinks, gen = make_inputs(2, 4, 2, 20, 32, torch.float32)
    check(q, keys[:1], selection_bias(2, 2, 20, 0.5, gen), sinks, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zero(dtype):
    q, keys, sinks, gen = make_inputs(2, 4, 3, 40, 64, dtype)
    bias = selection_bias(2, 3, 40, 0.5, gen)
    bias[0, :, 1] = NEG_INF  # batch 0, query 1 sees nothing: only the sink is left
    bias[1] = NEG_INF  # batch 1 sees nothing at all
    out, ref = check(q, keys, bias, sinks, 0.125)
    assert torch.all(ref[0, :, 1] == 0) and torch.all(out[0, :, 1] == 0)
    assert torch.all(out[1] == 0) and torch.isfinite(out).all()
    assert out[0, :, 0].abs().sum() > 0


def test_sinks_enter_the_denominator():
    q, keys, sinks, gen = make_inputs(1, 4, 1, 16, 32, torch.float32)
    bias = torch.zeros(1, 1, 1, 16)
    out, _ = check(q, keys, bias, sinks, 0.2)
    no_sink = attention(CTX, q.to(DEVICE), keys.to(DEVICE), bias.to(DEVICE), torch.full((4,), NEG_INF, device=DEVICE),
                        scale=0.2).cpu()
    assert (out.norm(dim=-1) < no_sink.norm(dim=-1)).all()  # the sink takes probability mass


def test_non_contiguous_q():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 32, generator=gen).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    keys = torch.randn(2, 1, 12, 32, generator=gen)
    check(q, keys, sliding_bias(3, 12, 6), torch.randn(4, generator=gen), 0.25)


def test_declines_grouped_keys_and_mixed_dtypes():
    q, keys, sinks, _ = make_inputs(1, 4, 1, 8, 16, torch.float32)
    bias = torch.zeros(1, 1, 1, 8)
    assert attention(CTX, q, keys.expand(1, 2, 8, 16), bias, sinks, scale=1.0) is NotImplemented
    assert attention(CTX, q, keys.to(torch.bfloat16), bias, sinks, scale=1.0) is NotImplemented


def test_registered_for_all_three_ops():
    for name in ("attention.sliding", "attention.csa", "attention.hca"):
        assert get_kernel(name) is attention


def test_decode_splits_keys_over_programs_on_a_flash_shape():
    from ds4c.backends.triton.kernels.attention import key_splits
    from ds4c.backends.triton.kernels.configs import attention_config
    from ds4c.targets import get_target

    h100 = get_target("h100")
    cfg = attention_config(512, torch.bfloat16, False, h100)
    n_split, t_split = key_splits(1, 64, 1, 640, 512, cfg, h100)  # CSA decode: window + top-512
    assert n_split > 8 and t_split % cfg.block_t == 0 and (n_split - 1) * t_split < 640 <= n_split * t_split
    assert key_splits(32, 64, 1, 640, 512, cfg, h100)[0] < n_split  # a batch fills the SMs itself
    assert key_splits(1, 64, 4, 640, 512, attention_config(512, torch.bfloat16, True, h100), h100) == (1, 640)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_with_a_fully_masked_share(dtype):
    # T=300 over block_t=64: 5 shares; keys 0..191 masked for batch 0 (its first shares see nothing),
    # all keys masked for batch 1 (only the sink is left: zeros), random subset elsewhere
    q, keys, sinks, gen = make_inputs(3, 8, 1, 300, 64, dtype)
    bias = selection_bias(3, 1, 300, 0.3, gen)
    bias[0, ..., :192] = NEG_INF
    bias[1] = NEG_INF
    out, ref = check(q, keys, bias, sinks, 0.125)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,ta,tb,d", [
    (5, 8, 6, 0, 64),       # sliding: the window's rows alone
    (3, 16, 8, 40, 512),    # csa / hca: window rows, then compressed rows of another pool; V4 head dim
    (40, 4, 8, 20, 48),     # many tokens: one program per token block (no key split)
    (2, 8, 64, 600, 64),    # a list to a long capacity: the -inf tail is not read (split over keys)
    (140, 4, 64, 600, 16),  # the same in one program per token (enough tokens for every SM: no key split)
])
def test_rows_form_reads_the_pools_as_the_gathered_keys(n, h, ta, tb, d, dtype):
    """``attention.*.rows`` (a serving step's keys at their page-table rows, -1 for none) equals
    the reference over the gathered copy, rows repeated and missing included (a token's missing
    rows are zero keys: under a -inf bias here, and one under bias 0 to pin the zeros); bit for bit
    the dense launcher where the first pool's rows fill whole key blocks (the window's 128 do)."""
    from ds4c.backends.triton.kernels.attention import attention_rows
    from ds4c.ops.attention import AttentionCsaRows

    gen = torch.Generator().manual_seed(7)
    pool_a, pool_b = torch.randn(23, d, generator=gen).to(dtype), torch.randn(61, d, generator=gen).to(dtype)
    rows_a = torch.randint(0, 23, (n, ta), generator=gen)
    rows_a[0, : ta // 2] = -1  # the first token's window starts at position 0
    rows_b = torch.randint(0, 61, (n, tb), generator=gen)
    rows_b[:, tb // 2:] = -1  # entries not visible yet
    rows = torch.cat([rows_a, rows_b], dim=1)
    bias = torch.where(rows >= 0, 0.0, NEG_INF).view(n, 1, 1, -1)
    bias[1, 0, 0, -1] = 0.0  # a missing row under bias 0: a zero key with logit 0
    q = torch.randn(n, h, 1, d, generator=gen).to(dtype)
    sinks = torch.randn(h, generator=gen)
    keys = torch.cat([pool_a[rows_a.clamp(min=0)] * (rows_a >= 0).unsqueeze(-1),
                      pool_b[rows_b.clamp(min=0)] * (rows_b >= 0).unsqueeze(-1)], dim=1).unsqueeze(1)
    two = tb > 0
    args = [q, pool_a, rows_a, pool_b if two else None, rows_b if two else None, bias.to(dtype), sinks.to(dtype)]
    out = attention_rows(CTX, *[a.to(DEVICE) if a is not None else None for a in args], scale=d ** -0.5)
    assert out is not NotImplemented
    dense = attention(CTX, q.to(DEVICE), keys.to(DEVICE), bias.to(dtype).to(DEVICE), sinks.to(dtype).to(DEVICE),
                      scale=d ** -0.5)
    if ta % 64 == 0:  # the same key blocks as the dense launcher: the same arithmetic, keys read in place
        assert torch.equal(out.cpu(), dense.cpu())
    ref = AttentionCsaRows.reference(None, *args, scale=d ** -0.5)
    torch.testing.assert_close(out.cpu().float(), ref.float(), **TOLERANCE[dtype])
    assert get_kernel("attention.hca.rows") is attention_rows
    assert attention_rows(CTX, q, pool_a, rows_a.int(), None, None, bias, sinks, scale=1.0) is NotImplemented
