"""The Triton ``paged.rows`` and ``paged.gather`` launchers against their references (interpreter on
CPU, GPU if present): window keys (positions before 0), compressed keys (a limit per token), one
row per token (the writes), int32 and strided tables; gathers with -1 rows, bf16 and fp32, a pool
with padded rows."""

from __future__ import annotations

import pytest
import torch

from ds4c.backends.triton.kernels import get_kernel
from ds4c.ops.paged import gather_reference, rows_reference
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
