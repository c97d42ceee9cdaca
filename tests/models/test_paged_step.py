"""The paged serving step (DeepseekV4Model.step over paged.py's pools) equals the dense model.

The dense ``prefill``/``decode`` are the oracle here (test_deepseek_v4_model.py holds them to
transformers). Every pool starts filled with NaN, so a read of a row that was never written (or
of a trash row) that is not masked poisons the logits; page ids are handed out in a shuffled
order, so a sequence's pages are never contiguous.
"""

from __future__ import annotations

import random

import pytest
import torch

from ds4c.models.deepseek_v4 import DeepseekV4Model, ModelConfig
from ds4c.models.deepseek_v4.paged import PageLayout
from ds4c.runtime.pages import Pools, RequestPages
from ds4c.runtime.step_batch import Chunk, build_step
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

MAX_CONTEXT = 64
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def model(request):
    name = request.param
    hf = make_hf_model(SMALL_CONFIGS[name], seed=99)
    ours = DeepseekV4Model(ModelConfig.from_hf_dict(SMALL_CONFIGS[name], source=name), MAX_CONTEXT).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


class Paged:
    """An engine's state without its scheduler: pools (NaN-filled), shuffled page ids, one step at a time."""

    def __init__(self, model: DeepseekV4Model, max_chunk: int = MAX_CONTEXT, window_pages: int = 96,
                 comp_pages: int = 40, slots: int = 9, seed: int = 0):
        self.model = model
        self.layout = PageLayout(window=model.config.sliding_window, window_page=4, comp_page=16,
                                 max_context=MAX_CONTEXT, max_chunk=max_chunk)
        self.pools = Pools(window_pages, comp_pages, slots)
        rng = random.Random(seed)
        for pool in (self.pools.window, self.pools.compressed, self.pools.slots):
            ids = pool.alloc(pool.free_count)
            rng.shuffle(ids)
            pool.free(ids)  # handed out again last-in first-out: in a random order
        self.specs = model.paged_state_specs(self.layout, window_pages, comp_pages, slots)
        self.state = tuple(torch.full(s.shape, float("nan"), dtype=s.dtype) for s in self.specs)
        self.rates = model.compression_rates()

    def request(self) -> RequestPages:
        return RequestPages(self.layout, self.pools)

    @torch.no_grad()
    def step(self, chunks: list[Chunk]) -> dict[tuple[int, int], torch.Tensor]:
        """Run one step; logits by (chunk index, position)."""
        for c in chunks:
            assert c.pages.grow(c.start + len(c.token_ids))
        batch = build_step(chunks, self.rates)
        out = self.model.step(*batch.args(), *self.state)
        self.state = out[1:]
        assert len(self.state) == len(self.specs)
        return {owner: row for owner, row in zip(batch.logit_owners, out[0], strict=True)}

    def pool(self, name: str) -> torch.Tensor:
        return self.state[[s.name for s in self.specs].index(name)]


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _dense(model: DeepseekV4Model, ids: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model.prefill(torch.tensor([ids]))
    return out[0][0], {s.name: t[0] for s, t in zip(model.state_specs(1), out[1:], strict=True)}


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, "window", "whole"])
def test_chunked_prefill_equals_dense_prefill(model, chunk):
    ids = _ids(41, model.config.vocab_size, seed=5)  # crosses CSA, HCA and window boundaries
    want, _ = _dense(model, ids)
    size = {"window": model.config.sliding_window, "whole": len(ids)}.get(chunk, chunk)
    paged = Paged(model)
    req = paged.request()
    got = {}
    for start in range(0, len(ids), size):
        got.update(paged.step([Chunk(req, ids[start:start + size], start, logits="all")]))
    logits = torch.stack([got[(0, p)] for p in range(len(ids))])
    assert torch.isfinite(logits).all()
    assert _err(logits, want) <= TOL


def test_packed_sequences_equal_each_alone(model):
    """Five sequences of different lengths, chunked at random and packed together at different
    starts in every step, each give the logits of a dense prefill of that sequence alone."""
    rng = random.Random(7)
    lengths = [23, 9, 40, 1, 17]
    seqs = [_ids(n, model.config.vocab_size, seed=100 + i) for i, n in enumerate(lengths)]
    paged = Paged(model, max_chunk=11, seed=3)
    reqs = [paged.request() for _ in seqs]
    done = [0] * len(seqs)
    got: dict[tuple[int, int], torch.Tensor] = {}
    steps = 0
    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        live = [i for i, s in enumerate(seqs) if done[i] < len(s)]
        picked = sorted(rng.sample(live, rng.randint(1, len(live))))
        chunks = []
        for i in picked:
            n = min(rng.randint(1, 11), len(seqs[i]) - done[i])
            chunks.append(Chunk(reqs[i], seqs[i][done[i]:done[i] + n], done[i], logits="all"))
            done[i] += n
        for (k, p), row in paged.step(chunks).items():
            got[(picked[k], p)] = row
        steps += 1
    assert steps > 5
    for i, ids in enumerate(seqs):
        want, _ = _dense(model, ids)
        logits = torch.stack([got[(i, p)] for p in range(len(ids))])
        assert _err(logits, want) <= TOL, f"sequence {i}"


def test_decode_steps_equal_dense_decode(model):
    """Three sequences prefilled to different lengths, then decoded together one token per step
    (decode_step: the one-token form) give the dense decode's logits at every position."""
    lengths = [5, 18, 30]
    extra = 14  # crosses window, CSA and HCA boundaries for every sequence
    seqs = [_ids(n + extra, model.config.vocab_size, seed=40 + i) for i, n in enumerate(lengths)]
    paged = Paged(model, seed=11)
    reqs = [paged.request() for _ in seqs]
    paged.step([Chunk(r, s[:n], 0, logits="none") for r, s, n in zip(reqs, seqs, lengths, strict=True)])
    for k in range(extra):
        chunks = [Chunk(r, [s[n + k]], n + k) for r, s, n in zip(reqs, seqs, lengths, strict=True)]
        for c in chunks:
            assert c.pages.grow(c.start + 1)
        b = build_step(chunks, paged.rates)
        with torch.no_grad():
            out = model.decode_step(b.input_ids, b.positions, b.window_table, b.comp_table, b.slot, *paged.state)
        paged.state = out[1:]
        for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            with torch.no_grad():
                dense = model.prefill(torch.tensor([s[:n + k + 1]]))[0][0, -1]
            assert _err(out[0][i], dense) <= TOL, (i, n + k)


def test_pools_hold_the_dense_state(model):
    """After a chunked prefill, the window rows and compressed entries read back through the
    sequence's tables equal the dense prefill's state."""
    ids = _ids(37, model.config.vocab_size, seed=9)
    paged = Paged(model, seed=5)
    req = paged.request()
    for start in range(0, len(ids), 6):
        paged.step([Chunk(req, ids[start:start + 6], start, logits="none")])
    _, dense = _dense(model, ids)
    lay, s = paged.layout, len(ids)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        pool = paged.pool(f"layers.{i}.window_kv_pool")
        for p in range(s - attn.window, s):
            page = req.window_row[(p // lay.window_page) % lay.window_slots]
            assert _err(pool[page, p % lay.window_page], dense[f"layers.{i}.window_kv"][p % attn.window]) <= TOL
        if attn.ratio:
            per_page = lay.comp_page // attn.ratio
            names = ["compressed_kv"] + (["indexer_keys"] if attn.compressor.overlap else [])
            for name in names:
                pool = paged.pool(f"layers.{i}.{name}_pool")
                for j in range(s // attn.ratio):
                    got = pool[req.comp_row[j // per_page], j % per_page]
                    assert _err(got, dense[f"layers.{i}.{name}"][j]) <= TOL, (name, j)


def test_paged_layout_refusals(model):
    with pytest.raises(ValueError, match="not a multiple of the compression rates"):
        model.paged_state_specs(PageLayout(model.config.sliding_window, 4, 12, MAX_CONTEXT, 8), 4, 4, 2)
    with pytest.raises(ValueError, match="sliding window"):
        model.paged_state_specs(PageLayout(model.config.sliding_window + 1, 4, 16, MAX_CONTEXT, 8), 4, 4, 2)
    with pytest.raises(ValueError, match="exceeds the model"):
        model.paged_state_specs(PageLayout(model.config.sliding_window, 4, 16, 2 * MAX_CONTEXT, 8), 4, 4, 2)


def test_build_step_refusals(model):
    paged = Paged(model, max_chunk=4)
    req = paged.request()
    with pytest.raises(ValueError, match="grow them first"):
        build_step([Chunk(req, [1, 2], 0)], paged.rates)
    assert req.grow(4)
    with pytest.raises(ValueError, match="more than max_chunk"):
        build_step([Chunk(req, [1] * 5, 0)], paged.rates)
    with pytest.raises(ValueError, match="already has a chunk"):
        build_step([Chunk(req, [1], 0), Chunk(req, [2], 1)], paged.rates)
    with pytest.raises(ValueError, match="empty"):
        build_step([Chunk(req, [], 0)], paged.rates)
    b = build_step([Chunk(req, [1, 2, 3, 4], 0, logits="all")], {"compressed_sparse_attention": 4,
                                                                  "heavily_compressed_attention": 8})
    assert b.emit_csa.tolist() == [3] and b.emit_hca.tolist() == [] and b.logit_rows.tolist() == [0, 1, 2, 3]
