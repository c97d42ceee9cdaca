"""The Triton ``compress`` and ``indexer.topk`` launchers against their references (interpreter on CPU, GPU if present)."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.triton.kernels import get_kernel
from ds4c.backends.triton.kernels.compress import (
    compress,
    compressor_rows,
    index_scores,
    indexer_topk,
    indexer_topk_rows,
    indexer_topk_table,
    top_indices,
)
from ds4c.backends.triton.kernels.configs import topk_config
from ds4c.ops.compress import (
    IndexerTopk,
    IndexerTopkRows,
    IndexerTopkTable,
    compress_reference,
    compressor_rows_reference,
    index_scores_reference,
)
from tests.backends.triton.conftest import CTX, kernel_context

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")


def on_device(*tensors):
    return [x.to(DEVICE) for x in tensors]


# -- compress ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype", [
    ((2, 3, 8, 64), torch.float32),    # CSA prefill: [B, windows, 2m slots, d]
    ((2, 3, 8, 64), torch.bfloat16),
    ((4, 128, 40), torch.float32),     # HCA-like: 128 slots in one tile, 32-channel blocks, d not a power of two
    ((1, 5, 4, 512), torch.bfloat16),  # DeepSeek-V4-Flash head dim
    ((1, 128, 512), torch.bfloat16),   # V4-Flash HCA decode: one row, 16 channel-block programs
    ((2, 300, 24), torch.float32),     # more slots than a tile holds: three passes per channel block
])
def test_compress_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(shape, generator=gen).to(dtype)
    score = (3 * torch.randn(shape, generator=gen)).to(dtype)
    score[..., 0, : shape[-1] // 2] = NEG_INF  # absent tokens' gates, as the compressor pads them
    norm_w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    out = compress(CTX, *on_device(kv, score, norm_w), eps=1e-6)
    ref = compress_reference(kv, score, norm_w, 1e-6)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    else:  # the kernel rounds where the reference rounds; a GPU's exp may move a weight by one ulp
        torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_compress_weights_slots_per_channel():
    # one slot dominates channel 0, the other channel 1: pooling per row instead of per channel fails
    kv = torch.tensor([[[1.0, -2.0], [3.0, 4.0]]])
    score = torch.tensor([[[50.0, -50.0], [-50.0, 50.0]]])
    out = compress(CTX, *on_device(kv, score, torch.ones(2)), eps=0.0).cpu()
    torch.testing.assert_close(out, torch.tensor([[1.0, 4.0]]) / torch.tensor(8.5).sqrt())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressor_rows_match_reference(dtype):
    """kv ++ gate + position bias, from column slices of one merged projection (row stride 3000),
    exactly as torch adds bf16; other dtypes of the bias are declined (the reference promotes)."""
    g = torch.Generator().manual_seed(0)
    merged = torch.randn(37, 3000, generator=g).to(dtype).to(DEVICE)
    kv, gate = merged[:, 100:1124], merged[:, 1500:2524]
    bias = torch.randn(4, 1024, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, 70000, (37,), generator=g).to(DEVICE)
    got = compressor_rows(CTX, kv, gate, bias, positions)
    assert torch.equal(got, compressor_rows_reference(kv, gate, bias, positions))
    assert compressor_rows(CTX, kv, gate, bias.double(), positions) is NotImplemented


def test_compress_declines():
    kv = torch.randn(2, 4, 16)
    assert compress(CTX, kv, torch.randn(2, 1, 16), torch.ones(16), eps=1e-6) is NotImplemented
    assert compress(CTX, kv, torch.randn(2, 4, 16), None, eps=1e-6) is NotImplemented


# -- indexer.topk ------------------------------------------------------------------------------------


def indexer_inputs(b, s, h, d, c, dtype, keys_batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=gen).to(dtype)
    keys = torch.randn(keys_batch or b, c, d, generator=gen).to(dtype)
    w = torch.randn(b, s, h, generator=gen).to(dtype)
    threshold = torch.arange(c - s, c).view(1, -1, 1) // 2  # causal, as (position + 1) // m
    future = torch.arange(c).view(1, 1, -1) >= threshold  # [1, S, C]
    return q, keys, w, future


CASES = [  # b, s, h, d, c, dtype, keys_batch
    (2, 3, 4, 32, 50, torch.float32, None),
    (1, 2, 64, 128, 300, torch.bfloat16, None),  # V4 indexer heads and head dim, C over two blocks
    (2, 1, 5, 24, 70, torch.float32, 1),         # decode; H, d not powers of two; keys shared by batch
    (1, 2, 80, 16, 40, torch.float32, None),     # H over one head block
]


@pytest.mark.parametrize("b,s,h,d,c,dtype,keys_batch", CASES)
def test_index_scores_match_reference(b, s, h, d, c, dtype, keys_batch):
    q, keys, w, future = indexer_inputs(b, s, h, d, c, dtype, keys_batch)
    scores = index_scores(CTX, *on_device(q, keys, w, future), 0.1, 0.2).cpu()
    ref = index_scores_reference(q, keys, w, 0.1, 0.2).masked_fill(future, NEG_INF)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert finite.any()
    # both sum exact (bf16) or fp32 products in fp32: only the summation order differs
    torch.testing.assert_close(scores[finite], ref[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("b,s,h,d,c,dtype,keys_batch", CASES)
def test_topk_selects_the_reference_set(b, s, h, d, c, dtype, keys_batch):
    q, keys, w, future = indexer_inputs(b, s, h, d, c, dtype, keys_batch, seed=1)
    k = 8
    attrs = {"k": k, "softmax_scale": 0.1, "weights_scale": 0.2}
    idx = indexer_topk(CTX, *on_device(q, keys, w, future), **attrs).cpu()
    ref_idx = IndexerTopk.reference(None, q, keys, w, future, **attrs)
    assert idx.shape == ref_idx.shape == (b, s, k) and idx.dtype == torch.int64
    scores = index_scores_reference(q, keys, w, 0.1, 0.2).masked_fill(future, NEG_INF)
    # ties (ReLU zeros, -inf) may pick different indices: compare the selected scores
    picked = scores.gather(-1, idx).sort(dim=-1).values
    expected = scores.gather(-1, ref_idx).sort(dim=-1).values
    assert torch.equal(picked, expected)
    assert all(len(set(row.tolist())) == k for row in idx.view(-1, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_reads_keys_from_the_pool_as_the_gathered_copy(dtype):
    """``indexer.topk.rows`` (a serving step's indexer, keys at pool rows, -1 for none) gives the
    scores and the selection of ``indexer.topk`` over the gathered keys: a block of entries past
    every token's rows (a short sequence in a long capacity) scores 0 before its future mask, as
    the zero keys of the copy do; rows may repeat (pages shared by a prefix)."""
    n, h, d, c, k = 5, 64, 128, 300, 16
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(97, d, generator=gen).to(dtype)
    visible = torch.tensor([0, 3, 40, 160, 300])  # tokens of sequences of different lengths
    rows = torch.randint(1, 97, (n, c), generator=gen)
    rows = torch.where(torch.arange(c).view(1, -1) < visible.view(-1, 1), rows, torch.full_like(rows, -1))
    q = torch.randn(n, 1, h, d, generator=gen).to(dtype)
    w = torch.randn(n, 1, h, generator=gen).to(dtype)
    future = torch.arange(c).view(1, 1, -1) >= visible.view(-1, 1, 1)
    future[1, 0, 250:] = False  # an entry without a row, not masked: its zero key scores 0
    attrs = {"k": k, "softmax_scale": 0.1, "weights_scale": 0.2}
    scores = index_scores(CTX, *on_device(q, pool, w, future.view(n, 1, c)), 0.1, 0.2, rows=rows.to(DEVICE)).cpu()
    keys = pool[rows.clamp(min=0)] * (rows >= 0).unsqueeze(-1)
    ref = index_scores_reference(q, keys, w, 0.1, 0.2).masked_fill(future, NEG_INF)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref)) and torch.isfinite(ref).sum() > 400
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    idx = indexer_topk_rows(CTX, *on_device(q, pool, rows, w, future), **attrs).cpu()
    ref_idx = IndexerTopkRows.reference(None, q, pool, rows, w, future, **attrs)
    assert idx.shape == ref_idx.shape == (n, 1, k)
    assert torch.equal(ref.gather(-1, idx).sort(-1).values, ref.gather(-1, ref_idx).sort(-1).values)
    assert get_kernel("indexer.topk.rows") is indexer_topk_rows
    assert indexer_topk_rows(CTX, q, pool, rows[:, None], w, future, **attrs) is NotImplemented  # rows not [B, C]


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_topk_table_finds_the_rows_through_the_page_table(table_dtype):
    """``indexer.topk.table``: the keys' rows come from the page table (``paged.rows(table, seq,
    none, limit)``, pages shuffled, two tokens of one sequence, a token past its sequence's last
    page's entries): the scores and the selection of the rows form over those rows."""
    from ds4c.ops.paged import rows_reference

    n, h, d, k, page, width = 4, 64, 128, 8, 16, 6
    c = page * width
    gen = torch.Generator().manual_seed(5)
    pool = torch.randn(8 * page, d, generator=gen).to(torch.bfloat16)
    table = torch.stack([torch.randperm(8, generator=gen)[:width] for _ in range(3)]).to(table_dtype)
    seq, limit = torch.tensor([0, 2, 2, 1]), torch.tensor([5, 40, 41, 96])
    q = torch.randn(n, 1, h, d, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, 1, h, generator=gen).to(torch.bfloat16)
    future = torch.arange(c).view(1, 1, -1) >= limit.view(-1, 1, 1)
    attrs = {"k": k, "softmax_scale": 0.1, "weights_scale": 0.2}
    rows = rows_reference(table, seq, None, limit, count=c, page=page)
    want = index_scores(CTX, *on_device(q, pool, w, future), 0.1, 0.2, rows=rows.to(DEVICE)).cpu()
    got = index_scores(CTX, *on_device(q, pool, w, future), 0.1, 0.2,
                       table=(table.to(DEVICE), seq.to(DEVICE), limit.to(DEVICE), c, page)).cpu()
    assert torch.equal(got, want)
    idx = indexer_topk_table(CTX, *on_device(q, pool, table, seq, limit, w, future), count=c, page=page, **attrs).cpu()
    ref = IndexerTopkTable.reference(None, q, pool, table, seq, limit, w, future, count=c, page=page, **attrs)
    assert torch.equal(want.gather(-1, idx).sort(-1).values, want.gather(-1, ref).sort(-1).values)
    assert get_kernel("indexer.topk.table") is indexer_topk_table


def test_topk_with_full_future_mask_per_batch():
    q, keys, w, _ = indexer_inputs(2, 2, 4, 16, 30, torch.float32)
    future = torch.zeros(2, 2, 30, dtype=torch.bool)
    future[1, :, 10:] = True  # batch 1 sees only its first 10 entries
    idx = indexer_topk(CTX, *on_device(q, keys, w, future), k=10, softmax_scale=0.25, weights_scale=1.0).cpu()
    assert set(idx[1, 0].tolist()) == set(range(10)) and set(idx[1, 1].tolist()) == set(range(10))
    scores = index_scores_reference(q, keys, w, 0.25, 1.0)
    assert torch.equal(scores[0].gather(-1, idx[0]).sort(-1).values, scores[0].topk(10).values.sort(-1).values)


def tie_heavy_scores(rows, c):
    # scores of both signs, -inf (future entries) and exact ties at zero (ReLU), as the indexer gives
    gen = torch.Generator().manual_seed(c)
    scores = torch.randn(rows, c, generator=gen) * 100
    scores[:, ::7] = 0.0
    scores[:, c // 2:] = torch.where(torch.rand(rows, c - c // 2, generator=gen) < 0.5, NEG_INF, scores[:, c // 2:])
    return scores


@pytest.mark.parametrize("rows,c,k,select", [
    *[(*case, select) for case in [(3, 528, 512), (2, 37, 6), (1, 5000, 512), (4, 16, 16)] for select in (0, 1, 2)],
    (2, 8208, 512, 1),  # ctx 32K at ratio 4 (the bitonic form takes a minute in the interpreter here)
    (2, 8208, 512, 2),
    (1, 16400, 512, 1),  # ctx 64K: too long for registers, chunked whatever the table says
    (2, 41000, 1024, 2),  # several chunks, a partial last one; Pro's k
    (1, 262160, 512, 2),  # ctx 1M at ratio 4: 64 chunks' candidates are chunked again before the last select
])
def test_top_indices_match_torch_topk(rows, c, k, select):
    scores = tie_heavy_scores(rows, c)
    idx = top_indices(kernel_context(topk={"select": select}), scores.to(DEVICE), k).cpu()
    ref = scores.topk(k, dim=-1)
    assert idx.shape == (rows, k) and idx.dtype == torch.int64
    assert all(len(set(r.tolist())) == k for r in idx)
    picked = scores.gather(-1, idx)
    # the same values as torch: the k largest, ties included
    assert torch.equal(picked.sort(-1, descending=True).values, ref.values)
    # among equal scores at the threshold the smaller indices are the ones taken
    kth = ref.values[:, -1:]
    below_taken = (scores == kth) & ~torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)
    for r in range(rows):
        tied_taken = idx[r][picked[r] == kth[r]]
        if below_taken[r].any() and len(tied_taken):
            assert tied_taken.max() < below_taken[r].nonzero().min()
    if select or c > 16384:  # a set, written in index order
        assert (idx[:, 1:] > idx[:, :-1]).all()
    else:  # largest first, among equal scores the smaller index first
        assert torch.equal(picked, ref.values)
        same = picked[:, 1:] == picked[:, :-1]
        assert (idx[:, 1:] > idx[:, :-1])[same].all()


def test_top_indices_select_and_bitonic_pick_one_set():
    # the select form is the default; the bitonic form (a tunable) picks the same set
    c = 2048
    scores = tie_heavy_scores(1, c)
    assert topk_config(8208, CTX).select == 1 and topk_config(528, CTX).select == 1
    bitonic = top_indices(kernel_context(topk={"select": 0}), scores.to(DEVICE), 512).cpu()
    chosen = top_indices(CTX, scores.to(DEVICE), 512).cpu()
    assert torch.equal(bitonic.sort(-1).values, chosen)


def test_long_rows_take_the_chunked_select_and_agree_with_the_select():
    # rows past what registers hold are picked in chunks, then among the chunks' picks (torch.topk
    # before); on rows both forms take they write the same indices in the same order, whatever the chunk
    assert topk_config(16400, CTX).select == 2 and topk_config(16384, CTX).select == 1
    scores = tie_heavy_scores(3, 3000)
    chosen = top_indices(CTX, scores.to(DEVICE), 700).cpu()
    for chunk in (256, 1024, 4096):  # 256 < k: taken as k's power of two (a full chunk fills its k picks)
        chunked = top_indices(kernel_context(topk={"select": 2, "chunk": chunk}), scores.to(DEVICE), 700).cpu()
        assert torch.equal(chunked, chosen), chunk
    # every score equal: the k smallest indices; NaN-free -inf rows: the first k
    flat = torch.full((2, 20000), 0.5)
    flat[1] = NEG_INF
    idx = top_indices(CTX, flat.to(DEVICE), 300).cpu()
    assert torch.equal(idx, torch.arange(300).expand(2, 300))


def test_indexer_declines():
    q, keys, w, future = indexer_inputs(1, 2, 4, 16, 30, torch.float32)
    attrs = {"k": 4, "softmax_scale": 1.0, "weights_scale": 1.0}
    assert indexer_topk(CTX, q, keys[0], w, future, **attrs) is NotImplemented  # keys without batch
    assert indexer_topk(CTX, q, keys, w, future.float(), **attrs) is NotImplemented
    assert indexer_topk(CTX, q, keys, w, torch.zeros(1, 3, 30, dtype=torch.bool), **attrs) is NotImplemented


def test_registered():
    assert get_kernel("compress") is compress and get_kernel("indexer.topk") is indexer_topk
