"""The Triton ``paged.*`` launchers against their references (interpreter on CPU, GPU if present):
``paged.rows`` for window keys (positions before 0), compressed keys (a limit per token), one row
per token (the writes), int32 and strided tables; ``paged.rows_at`` at given positions; ``paged.gather`` with -1 rows, bf16 and fp32, a
pool with padded rows; ``paged.window_index`` / ``paged.window_gather`` for a CSA-like
(overlapping, ratio 4) and an HCA-like (ratio 16) compressor over a step of chunks that start
mid-window, padding candidates and candidates that close no window; ``paged.ring_rows`` for chunks near and far from their end."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.triton.kernels import get_kernel
from ds4c.ops.paged import (
    gather_reference,
    ring_rows_reference,
    rows_reference,
    window_gather_reference,
    window_index_reference,
)
from tests.backends.triton.conftest import CTX

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _table(rows: int, slots: int, dtype, gen, strided: bool = False) -> torch.Tensor:
    t = torch.randint(0, 1000, (rows, slots * (2 if strided else 1)), generator=gen).to(dtype)
    return t[:, ::2] if strided else t


@pytest.mark.parametrize("dtype,strided", [(torch.int32, False), (torch.int64, True)])
@pytest.mark.parametrize("form", ["window", "compressed", "write"])
def test_paged_rows_matches_reference(form, dtype, strided):
    gen = torch.Generator().manual_seed(1)
    n, seqs = 37, 5
    table = _table(seqs, 69, dtype, gen, strided)
    seq = torch.randint(0, seqs, (n,), generator=gen)
    positions = torch.randint(0, 3000, (n,), generator=gen)
    positions[:4] = torch.tensor([0, 1, 126, 127])  # window keys before position 0
    if form == "window":
        first, limit, count, page = positions - 127, None, 128, 32
    elif form == "compressed":
        first, limit, count, page = None, torch.div(positions + 1, 4, rounding_mode="floor"), 300, 64
    else:
        first, limit, count, page = positions, None, 1, 32
    want = rows_reference(table, seq, first, limit, count=count, page=page)
    dev = [None if t is None else t.to(DEVICE) for t in (table, seq, first, limit)]
    got = get_kernel("paged.rows")(CTX, *dev, count=count, page=page)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.cpu(), want)
    assert (want == -1).any() or form == "write"


@pytest.mark.parametrize("dtype,strided", [(torch.int32, False), (torch.int64, True)])
def test_paged_rows_at_gives_the_rows_of_the_given_positions(dtype, strided):
    """``paged.rows_at``: the rows ``paged.rows`` gives, at given positions (the indexer's picks,
    -1 and positions at or past the limit included), int32 and strided tables."""
    from ds4c.ops.paged import rows_at_reference

    gen = torch.Generator().manual_seed(4)
    n, seqs, count, page = 29, 4, 300, 64
    table = _table(seqs, 69, dtype, gen, strided)
    seq = torch.randint(0, seqs, (n,), generator=gen)
    limit = torch.randint(0, count, (n,), generator=gen)
    entries = torch.randint(-1, count, (n, 17), generator=gen)
    every = rows_reference(table, seq, None, limit, count=count, page=page)
    want = torch.where(entries >= 0, every.gather(1, entries.clamp(min=0)), -1)
    assert torch.equal(rows_at_reference(table, seq, entries, limit, page=page), want)
    dev = [t.to(DEVICE) for t in (table, seq, entries, limit)]
    got = get_kernel("paged.rows_at")(CTX, *dev, page=page)
    assert torch.equal(got.cpu(), want) and (want == -1).any() and (want >= 0).any()


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 512), (torch.float32, 40)])
def test_paged_gather_matches_reference(dtype, d):
    gen = torch.Generator().manual_seed(2)
    pool = torch.randn(300, d + 8, generator=gen).to(dtype)[:, :d]  # rows of a wider buffer
    rows = torch.randint(-1, 300, (3, 7, 11), generator=gen)
    rows[0, 0, :3] = -1
    want = gather_reference(pool, rows)
    got = get_kernel("paged.gather")(CTX, pool.to(DEVICE), rows.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    assert (got[0, 0, :3] == 0).all()


def _step(chunks: list[tuple[int, int]]):
    """positions, token_seq, seq_first, seq_last of a step whose sequence i is a chunk of
    ``chunks[i] = (start, length)``."""
    positions = torch.cat([torch.arange(a, a + n) for a, n in chunks])
    token_seq = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(chunks)])
    lengths = torch.tensor([n for _, n in chunks])
    seq_last = lengths.cumsum(0) - 1
    return positions, token_seq, seq_last - lengths + 1, seq_last


@pytest.mark.parametrize("dtype,ratio,span,width", [(torch.float32, 4, 8, 24), (torch.bfloat16, 16, 16, 40)])
def test_paged_window_index_and_gather_match_reference(dtype, ratio, span, width):
    gen = torch.Generator().manual_seed(3)
    # decodes at window ends and mid-window, a chunk starting mid-window, a prompt from 0
    chunks = [(3, 1), (ratio * 5 - 1, 1), (ratio * 2 + 1, 2 * ratio + 3), (0, ratio + 2), (ratio * 7, 1)]
    positions, token_seq, seq_first, _ = _step(chunks)
    n = positions.shape[0]
    ring_rows, page = span + 3, 2
    slot = torch.tensor([2, 5, 1, 4, 3], dtype=torch.int32)
    comp_table = torch.randint(1, 50, (5, 12), generator=gen, dtype=torch.int32)
    emit = torch.cat([torch.arange(n), torch.tensor([-1, -1])])
    args = (emit, positions, token_seq, seq_first, slot, comp_table)
    kw = {"ratio": ratio, "span": span, "ring_rows": ring_rows, "page": page}
    want = window_index_reference(*args, **kw)
    got = get_kernel("paged.window_index")(CTX, *(t.to(DEVICE) for t in args), **kw)
    for g, wnt in zip(got, want, strict=True):
        assert g.dtype == wnt.dtype and g.shape == wnt.shape
        assert torch.equal(g.cpu(), wnt)
    sources, _, at = want
    assert (sources >= 0).any() and (sources <= -2).any() and (sources == -1).any() and (at == 0).any()

    rows = torch.randn(n, width, generator=gen).to(dtype)
    ring = torch.randn(6 * ring_rows + 5, width + 4, generator=gen).to(dtype)[:, :width]  # strided rows
    for overlap in (0, span // 2) if width % 4 == 0 else (0,):  # kv_a ++ kv_b ++ gate_a ++ gate_b rows
        want = window_gather_reference(rows, ring, sources, overlap=overlap)
        got = get_kernel("paged.window_gather")(CTX, rows.to(DEVICE), ring.to(DEVICE), sources.to(DEVICE),
                                                overlap=overlap)
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want)
        half = want.shape[-1] // 2
        assert torch.isneginf(want[..., half:]).any() and (want[..., :half] != 0).any()


def test_paged_ring_rows_matches_reference():
    positions, token_seq, _, seq_last = _step([(0, 30), (7, 1), (100, 12), (5, 3)])
    slot = torch.tensor([3, 1, 4, 2])
    want = ring_rows_reference(positions, token_seq, seq_last, slot, ring_rows=9)
    got = get_kernel("paged.ring_rows")(CTX, *(t.to(DEVICE) for t in (positions, token_seq, seq_last, slot)),
                                         ring_rows=9)
    assert torch.equal(got.cpu(), want)
    assert (want < 9).any() and (want >= 9).any()  # trash rows and kept rows
