"""The grouped-GEMM ``moe`` launcher against ``moe_reference`` (interpreter on CPU, real kernels on a GPU)."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.triton.kernels.moe import moe, moe_config
from ds4c.ops.moe import _route, moe_reference
from tests.backends.triton.conftest import CTX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def make_inputs(tokens: int, experts: int, d: int, inter: int, dtype, routing: str, top_k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x = r(1, tokens, d)
    ids = torch.randint(0, 50, (1, tokens), generator=g).to(DEVICE)
    router = r(experts, d, scale=d ** -0.5)
    if routing == "hash":
        selector = torch.randint(0, experts, (50, top_k), generator=g).to(DEVICE)
    else:
        selector = (torch.randn(experts, generator=g) * 0.1).to(dtype).to(DEVICE)
    gate_up = r(experts, 2 * inter, d, scale=d ** -0.5)
    down = r(experts, d, inter, scale=inter ** -0.5)
    s_gate, s_up, s_down = r(inter, d, scale=d ** -0.5), r(inter, d, scale=d ** -0.5), r(d, inter, scale=inter ** -0.5)
    return [x, ids, router, selector, gate_up, down, s_gate, s_up, s_down]


def check(args, **kw):
    got = moe(CTX, *args, **kw)
    assert got is not NotImplemented
    want = moe_reference(*args, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), **TOLERANCE[want.dtype])
    return got, want


@pytest.mark.parametrize("tokens,experts,d,inter,top_k,routing,score", [
    (1, 16, 64, 32, 4, "bias", "sqrtsoftplus"),    # decode: one token, most experts empty
    (3, 16, 96, 40, 2, "bias", "sigmoid"),         # K and N not multiples of the tiles
    (4, 8, 64, 48, 3, "bias", "softmax"),
    (2, 16, 64, 32, 2, "hash", "sqrtsoftplus"),    # hash routing: tid2eid[ids]
    (40, 8, 80, 48, 2, "bias", "sqrtsoftplus"),    # prefill tiles (10 rows per expert), ragged K
    (48, 8, 64, 64, 2, "hash", "sigmoid"),         # prefill tiles, hash routing, even K
])
def test_matches_reference_fp32(tokens, experts, d, inter, top_k, routing, score):
    args = make_inputs(tokens, experts, d, inter, torch.float32, routing, top_k)
    check(args, top_k=top_k, route_scale=1.5, swiglu_limit=10.0, routing=routing, score=score)


@pytest.mark.parametrize("tokens,experts", [(2, 16), (36, 4)])
def test_matches_reference_bf16(tokens, experts):
    args = make_inputs(tokens, experts, 128, 64, torch.bfloat16, "bias", 2, seed=3)
    check(args, top_k=2, route_scale=2.0, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # silu of a very negative gate: exact 0
def test_clamps_decide_the_result():
    args = make_inputs(3, 8, 64, 32, torch.float32, "bias", 2)
    args[4] = args[4] * 50  # large pre-activations: gate and up clamps both bind
    kw = dict(top_k=2, route_scale=1.0, swiglu_limit=0.25, routing="bias", score="sigmoid")
    got, _ = check(args, **kw)
    unclamped = moe_reference(*args, **{**kw, "swiglu_limit": 1e9})
    assert not torch.allclose(got, unclamped, atol=1e-3)


def test_gate_is_the_first_half_of_gate_up():
    args = make_inputs(2, 8, 64, 32, torch.float32, "bias", 2, seed=4)
    kw = dict(top_k=2, route_scale=1.0, swiglu_limit=10.0, routing="bias", score="sigmoid")
    got, _ = check(args, **kw)
    swapped = list(args)
    swapped[4] = torch.cat(args[4].chunk(2, dim=1)[::-1], dim=1)
    assert not torch.allclose(got, moe_reference(*swapped, **kw), atol=1e-3)


def test_one_expert_over_several_row_blocks_and_empty_experts():
    # a huge bias sends every token's first pick to expert 5: 20 rows > block_m=16, and some experts get nothing
    args = make_inputs(20, 16, 64, 32, torch.float32, "bias", 2, seed=5)
    args[3] = torch.zeros(16, device=DEVICE)
    args[3][5] = 100.0
    kw = dict(top_k=2, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")
    _, idx, _ = _route(*args[:4], 2, 1.5, "bias", "sqrtsoftplus")
    counts = torch.bincount(idx.reshape(-1).cpu(), minlength=16)
    assert counts[5] == 20 and (counts == 0).sum() >= 4
    assert moe_config(40, 16, torch.float32, CTX.target).block_m < counts[5]
    check(args, **kw)


def test_no_host_synchronisation(monkeypatch):
    """The launcher may not read device values back (CUDA-graph capture of a decode step)."""
    args = make_inputs(2, 16, 64, 32, torch.float32, "bias", 2)
    kw = dict(top_k=2, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")
    want = moe_reference(*args, **kw)

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation")

    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "bincount", forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    got = moe(CTX, *args, **kw)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_declines_mixed_dtypes_and_bad_shapes():
    args = make_inputs(2, 8, 64, 32, torch.float32, "bias", 2)
    kw = dict(top_k=2, route_scale=1.0, swiglu_limit=10.0, routing="bias", score="sigmoid")
    mixed = list(args)
    mixed[4] = args[4].to(torch.bfloat16)
    assert moe(CTX, *mixed, **kw) is NotImplemented
    wrong_down = list(args)
    wrong_down[5] = args[5][:, :, :16]
    assert moe(CTX, *wrong_down, **kw) is NotImplemented


def test_tile_choice_by_rows_per_expert():
    assert moe_config(6, 256, torch.bfloat16, CTX.target).block_m == 16  # V4-Flash decode, 1 token
    assert moe_config(192, 256, torch.bfloat16, CTX.target).block_m == 16  # 32 tokens
    assert moe_config(2048 * 6, 256, torch.bfloat16, CTX.target).block_m == 64  # prefill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("routing,score", [("bias", "sqrtsoftplus"), ("bias", "sigmoid"), ("bias", "softmax"),
                                           ("hash", "sqrtsoftplus")])
def test_routing_kernel_equals_route(dtype, routing, score):
    """The routing kernel picks the reference's experts and rounds the weights where torch does:
    bf16 weights bit-equal over many tokens, including large negative logits (softplus ~ exp);
    fp32 within a few ulps (other exp/log implementations)."""
    from ds4c.backends.triton.kernels.moe import _route_on_device

    args = make_inputs(48, 64, 64, 32, dtype, routing, 6, seed=11)
    args[2] = args[2] * 6.0  # logits from about -20 to 20
    if routing == "bias":  # an fp32 correction bias (as checkpoints ship it): bf16 keys would tie,
        args[3] = args[3].float()  # and ties break differently in every top-k implementation
    kw = (6, 1.5, routing, score)
    flat, idx, w = _route_on_device(CTX, *args[:4], *kw)
    _, want_idx, want_w = _route(*args[:4], *kw)
    got_i, order = idx.sort(dim=-1)
    want_i, want_order = want_idx.sort(dim=-1)
    assert torch.equal(got_i, want_i)
    got_w, want_w = w.gather(1, order), want_w.float().gather(1, want_order)
    if dtype == torch.bfloat16:
        assert torch.equal(got_w, want_w)
    else:
        torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-6)


def test_decode_path_has_no_sort_and_fuses_the_shared_expert(monkeypatch):
    import ds4c.backends.triton.kernels.moe as moe_mod

    args = make_inputs(2, 16, 64, 32, torch.float32, "bias", 3, seed=6)
    kw = dict(top_k=3, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")
    want = moe_reference(*args, **kw)

    def forbidden(*a, **k):
        raise AssertionError("the decode path groups nothing and leaves no shared expert to torch")

    monkeypatch.setattr(torch, "sort", forbidden)
    monkeypatch.setattr(moe_mod, "_shared", forbidden)
    got = moe(CTX, *args, **kw)
    monkeypatch.undo()
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_decode_path_with_a_shared_expert_of_another_width():
    args = make_inputs(1, 16, 64, 32, torch.float32, "bias", 2, seed=7)
    g = torch.Generator().manual_seed(8)
    args[6], args[7] = (torch.randn(48, 64, generator=g) * 0.1 for _ in range(2))
    args[8] = torch.randn(64, 48, generator=g) * 0.1
    args[6:] = [a.to(DEVICE) for a in args[6:]]
    check(args, top_k=2, route_scale=1.0, swiglu_limit=10.0, routing="bias", score="sigmoid")


@pytest.mark.parametrize("tokens,routing", [(1, "bias"), (3, "hash"), (40, "bias"), (48, "hash")])
def test_one_ranks_experts_run_on_the_kernels_and_the_ranks_sum_to_the_whole(tokens, routing):
    """``shard_experts``' ``moe`` (``expert_offset``, ``shared=False`` off rank 0): the launcher runs
    each rank's picks on its slice of the experts (decode pairs and grouped GEMMs) and the parts add
    up to the whole layer, as its reference's do."""
    experts, world, top_k = 8, 4, 2
    args = make_inputs(tokens, experts, 64, 32, torch.float32, routing, top_k, seed=5)
    kw = dict(top_k=top_k, route_scale=1.5, swiglu_limit=10.0, routing=routing, score="sqrtsoftplus")
    whole = moe_reference(*args, **kw)
    per = experts // world
    parts = []
    for r in range(world):
        sliced = list(args)
        sliced[4], sliced[5] = args[4][r * per:(r + 1) * per], args[5][r * per:(r + 1) * per]
        got = moe(CTX, *sliced, expert_offset=r * per, shared=r == 0, **kw)
        assert got is not NotImplemented
        want = moe_reference(*sliced, expert_offset=r * per, shared=r == 0, **kw)
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
        parts.append(got)
    torch.testing.assert_close(sum(parts), whole, **TOLERANCE[torch.float32])
