"""MTP speculative decoding in the engine (#28; docs/design/mtp.md) on CPU over the eager paged step.

The model is tests/mtp_model.py's: the ``mixed`` config trained on a bigram language, with its MTP
block trained on top (150 steps: a good drafter; 15 steps: a poor one, so drafts are often
rejected and the rollback is exercised). Greedy speculation must give exactly the tokens plain
greedy decoding gives; sampling with speculation must sample the same distribution.
"""

from __future__ import annotations

import random

import pytest
import torch

from ds4c.errors import InputError
from ds4c.models.deepseek_v4.paged import PageLayout
from ds4c.runtime.engine import EagerStepRunner, Engine
from ds4c.runtime.pages import RequestPages
from ds4c.runtime.sampling import SamplingParams
from ds4c.runtime.step_batch import Chunk, build_step
from tests.mtp_model import MAX_CONTEXT, mtp_model
from tests.quant.synthetic_language import bigram_batch
from tests.runtime.test_engine import _run_batched as _run

DRAFTS = 3


@pytest.fixture(scope="module")
def good():
    return mtp_model(150)


@pytest.fixture(scope="module")
def poor():
    return mtp_model(15)


def _layout(model, max_chunk=32, draft_tokens=DRAFTS) -> PageLayout:
    return PageLayout(window=model.config.sliding_window, window_page=4, comp_page=16, max_context=MAX_CONTEXT,
                      max_chunk=max_chunk, draft_tokens=draft_tokens)


def _engine(model, *, speculative=0, comp_pages=200, max_chunk=32, **kw) -> Engine:
    runner = EagerStepRunner(model, _layout(model, max_chunk), window_pages=400, comp_pages=comp_pages, slots=25)
    return Engine(runner, speculative=speculative, **kw)


def _workload(successor, n=24, seed=0, longest=300):
    """Prompts of 1..``longest`` bigram tokens (crossing CSA and HCA boundaries and the window's wrap),
    outputs of 1..64, arrival steps 0..30."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 1 if i == 0 else longest if i == 1 else rng.randint(1, longest)
        out.append((rng.randint(0, 30), bigram_batch(successor, 1, length, g)[0].tolist(), rng.randint(1, 64)))
    return out


def _greedy(i, n):
    return SamplingParams(max_new_tokens=n)


def test_paged_mtp_step_equals_the_dense_block(poor):
    """mtp_step over chunks (7 rows, then one at a time) against mtp_logits over the whole sequence."""
    model, successor = poor
    x = bigram_batch(successor, 1, 41, torch.Generator().manual_seed(5))
    with torch.no_grad():
        h = model.final_streams(x)[0]  # [S, n, D]
        dense = model.mtp_logits(h[None, :-1], x[:, 1:])[0]  # position p predicts token p + 2
    layout = _layout(model)
    runner = EagerStepRunner(model, layout, window_pages=40, comp_pages=8, slots=3)
    pages = RequestPages(layout, runner.pools)
    got, at = [], 0
    for n in [7, 1, 1, 9, 3] + [1] * 19:
        assert pages.grow(at + n)
        batch = build_step([Chunk(pages, x[0, at + 1:at + n + 1].tolist(), at, "all")], runner.rates)
        logits, streams = runner.run_mtp(batch, h[at:at + n])
        assert streams.shape == (n, *h.shape[1:])
        got.append(logits)
        at += n
    assert at == 40
    torch.testing.assert_close(torch.cat(got), dense, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_gives_the_tokens_of_plain_greedy(poor, k):
    model, successor = poor
    work = _workload(successor)
    base = _engine(model, max_running=12, max_step_tokens=64)
    plain = _run(base, work, _greedy)
    engine = _engine(model, speculative=k, max_running=12, max_step_tokens=64)
    spec = _run(engine, work, _greedy)
    stats = engine.stats()
    assert stats["steps"] < base.stats()["steps"]
    drafted = stats["verifies"] * k
    assert stats["verifies"] > 0 and 0 < stats["accepted_drafts"] < drafted  # drafts were kept and rejected
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        assert b.output_ids == a.output_ids, i
        assert b.finish_reason == a.finish_reason == "length", i
    assert engine.pools.stats() == _engine(model).pools.stats()  # every page back


def test_preempted_speculating_requests_keep_their_tokens(poor):
    model, successor = poor
    work = _workload(successor, seed=1)
    plain = _run(_engine(model, max_running=12, max_step_tokens=48), work, _greedy)
    engine = _engine(model, speculative=DRAFTS, comp_pages=25, max_chunk=7, max_running=12, max_step_tokens=24)
    spec = _run(engine, work, _greedy)
    assert engine.stats()["preemptions"] > 0 and engine.stats()["verifies"] > 0
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]


def _committed_state(runner: EagerStepRunner, pages: RequestPages, end: int) -> dict[str, torch.Tensor]:
    """Every row of the main model's pools that a step after position ``end - 1`` may read, gathered by
    position (page ids differ between runs): the window's last W - 1 positions, every compressed entry
    and indexer key of a closed window, the compressor rings' rows of the positions a window still
    open at ``end`` reads."""
    lay = runner.layout
    specs = runner.model.paged_state_specs(lay, *(1, 1, 1))
    out = {}
    for spec, pool in zip(specs, runner.state, strict=True):
        name = spec.name
        if name.endswith("window_kv_pool"):
            qs = range(max(0, end - lay.window + 1), end)
            rows = [pool[pages.window_row[(q // lay.window_page) % lay.window_slots], q % lay.window_page] for q in qs]
        elif name.endswith("_pool"):  # compressed entries / indexer keys
            layer = runner.model.model.layers[int(name.split(".")[1])].self_attn
            per_page = lay.comp_page // layer.ratio
            rows = [pool[pages.comp_row[j // per_page], j % per_page] for j in range(end // layer.ratio)]
        else:  # a compressor ring: rows keyed by position modulo its length
            layer = runner.model.model.layers[int(name.split(".")[1])].self_attn
            comp = layer.compressor.indexer if "indexer" in name else layer.compressor
            span = comp.ring_width()[0]
            rows = [pool[pages.slot, q % pool.shape[1]] for q in range(max(0, end - span), end)]
        out[name] = torch.stack(rows) if rows else torch.empty(0)
    return out


def test_rejected_drafts_leave_no_trace_in_the_state(poor):
    """After a verify that rejected drafts, the state a later step can read equals that of a run
    without speculation at the same length, tensor for tensor, and the MTP block's window equals a
    fresh run of the block over the kept positions."""
    model, successor = poor
    prompt = bigram_batch(successor, 1, 37, torch.Generator().manual_seed(11))[0].tolist()
    spec = _engine(model, speculative=DRAFTS)
    req = spec.submit(prompt, SamplingParams(max_new_tokens=60))
    checked = 0
    while not req.finished and checked < 4:
        verifies, accepted = req.verifies, req.accepted_drafts
        drafted = len(req._drafts)
        spec.step()
        if req.finished or req.verifies == verifies or req.accepted_drafts - accepted == drafted:
            continue
        end = req._computed  # a rejection: positions end .. were written and dropped
        plain = _engine(model)
        other = plain.submit(prompt, SamplingParams(max_new_tokens=60))
        while other._computed < end:
            plain.step()
        assert other._computed == end and other.output_ids[:len(req.output_ids)] == req.output_ids
        want = _committed_state(plain.runner, other._pages, end)
        got = _committed_state(spec.runner, req._pages, end)
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        # the MTP block's window: as a fresh run of the block over the kept positions writes it
        torch.testing.assert_close(_mtp_window(spec.runner, req._pages, end), _mtp_reference(model, req.tokens, end),
                                   rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == 4, "the poor drafter never had a draft rejected"


def _mtp_window(runner: EagerStepRunner, pages: RequestPages, end: int) -> torch.Tensor:
    """The MTP block's window rows of positions end - W + 1 .. end - 1 (what a later step reads)."""
    lay, pool = runner.layout, runner.mtp_state[0]
    return torch.stack([pool[pages.window_row[(q // lay.window_page) % lay.window_slots], q % lay.window_page]
                        for q in range(max(0, end - lay.window + 1), end)])


def _mtp_reference(model, tokens: list[int], end: int) -> torch.Tensor:
    """The MTP window after running the block alone over positions 0 .. end - 1 (the dense model's
    final streams, the tokens after them), in a fresh pool."""
    runner = EagerStepRunner(model, _layout(model), window_pages=200, comp_pages=8, slots=3)
    pages = RequestPages(runner.layout, runner.pools)
    with torch.no_grad():
        h = model.final_streams(torch.tensor([tokens[:end]]))[0]
    at = 0
    while at < end:
        n = min(32, end - at)
        assert pages.grow(at + n)
        runner.run_mtp(build_step([Chunk(pages, tokens[at + 1:at + n + 1], at, "none")], runner.rates), h[at:at + n])
        at += n
    return _mtp_window(runner, pages, end)


def _chi_square_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of the two-sample chi-square test that counts ``a`` and ``b`` (same bins) come from one
    distribution; bins with fewer than 10 expected in total are pooled into one."""
    keep = (a + b) >= 10
    a = torch.cat([a[keep], a[~keep].sum(0, keepdim=True)]).double()
    b = torch.cat([b[keep], b[~keep].sum(0, keepdim=True)]).double()
    nonzero = (a + b) > 0
    a, b = a[nonzero], b[nonzero]
    total = a.sum() + b.sum()
    stat = 0.0
    for obs, n in ((a, a.sum()), (b, b.sum())):
        exp = (a + b) * n / total
        stat += float(((obs - exp) ** 2 / exp).sum())
    dof = a.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def test_sampling_with_speculation_keeps_the_distribution(poor):
    """The first 4 sampled tokens, 600 seeded requests with and without speculation (a poor drafter,
    so rejections and residual draws happen): per position and for the (first, fourth) pair the
    two samples agree by a chi-square test at p > 0.01."""
    model, successor = poor
    prompt = bigram_batch(successor, 1, 21, torch.Generator().manual_seed(13))[0].tolist()
    n = 600
    v = model.config.vocab_size

    def draws(k: int, base: int) -> torch.Tensor:
        engine = _engine(model, speculative=k, max_running=24, max_step_tokens=128)
        reqs = [engine.submit(prompt, SamplingParams(max_new_tokens=4, temperature=1.3, top_k=20, seed=base + i))
                for i in range(n)]
        engine.run_until_idle()
        if k:
            assert 0 < engine.stats()["accepted_drafts"] < engine.stats()["verifies"] * k
        return torch.tensor([r.output_ids for r in reqs])

    plain, spec = draws(0, 0), draws(DRAFTS, 10_000)
    for pos in range(4):
        p = _chi_square_p(torch.bincount(plain[:, pos], minlength=v), torch.bincount(spec[:, pos], minlength=v))
        assert p > 0.01, (pos, p)
    pair = lambda t: torch.bincount(t[:, 0] * v + t[:, 3], minlength=v * v)  # noqa: E731
    assert _chi_square_p(pair(plain), pair(spec)) > 0.01


def test_trained_drafter_accepts_at_least_two_tokens_per_step(good, capsys):
    model, successor = good
    work = _workload(successor, n=12, seed=3, longest=120)
    engine = _engine(model, speculative=3, max_running=12, max_step_tokens=64)
    reqs = _run(engine, work, _greedy)
    length = engine.stats()["acceptance_length"]
    with capsys.disabled():
        print(f"\ntrained tiny (mixed + MTP, 150 steps), greedy, k=3: acceptance length {length:.2f} over "
              f"{engine.stats()['verifies']} verify steps")
    assert length >= 2.0
    assert all(r.acceptance_length is not None for r in reqs if len(r.output_ids) > 1)


def test_speculative_engines_refuse_what_they_cannot_do(good):
    model, _ = good
    runner = EagerStepRunner(model, _layout(model, draft_tokens=2), window_pages=40, comp_pages=8, slots=3)
    with pytest.raises(InputError, match="at most 2 drafts"):
        Engine(runner, speculative=3)
    with pytest.raises(InputError, match="integer >= 0"):
        Engine(runner, speculative=-1)
    no_mtp = EagerStepRunner.__new__(EagerStepRunner)
    no_mtp.__dict__.update(runner.__dict__, mtp=False)
    with pytest.raises(InputError, match="no compiled MTP block"):
        Engine(no_mtp, speculative=1)


def test_speculation_with_the_prefix_cache(good):
    """Requests that share a prefix resume from the cache (the MTP block's window rows live in the
    same window pages, copied with them) and still give plain greedy's tokens, drafting well."""
    model, successor = good
    g = torch.Generator().manual_seed(21)
    system = bigram_batch(successor, 1, 90, g)[0].tolist()
    prompts = [system + bigram_batch(successor, 1, n, g)[0].tolist() for n in (5, 17, 1, 40, 33, 8)]
    # chunks longer than the prompts: the cache learns from the verify steps' insertions alone
    plain = _engine(model, max_chunk=160)
    want = [plain.generate([p], SamplingParams(max_new_tokens=30))[0] for p in prompts]
    engine = _engine(model, speculative=DRAFTS, prefix_cache=True, prefix_granule=16, max_chunk=160)
    got = [engine.generate([p], SamplingParams(max_new_tokens=30))[0] for p in prompts]
    stats = engine.stats()
    assert got == want
    assert stats["prefix_hit_tokens"] > 4 * 80 and stats["acceptance_length"] >= 2.0, stats


def test_penalties_and_logprobs_with_speculation(good):
    """Greedy requests with repetition / frequency / presence penalties and requests asking for
    logprobs draft too: each verify row is penalised over the drafts before it, and every emitted
    token gets its logprob and top-n from its row: the same tokens and logprobs as plain decoding."""
    model, successor = good
    g = torch.Generator().manual_seed(31)
    prompts = [bigram_batch(successor, 1, n, g)[0].tolist() for n in (7, 30, 61)]
    cases = [SamplingParams(max_new_tokens=40, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=40, frequency_penalty=0.7, presence_penalty=0.4),
             SamplingParams(max_new_tokens=40, logprobs=3)]
    for params in cases:
        plain = _engine(model)
        want = [plain.submit(p, params) for p in prompts]
        plain.run_until_idle()
        engine = _engine(model, speculative=DRAFTS)
        got = [engine.submit(p, params) for p in prompts]
        engine.run_until_idle()
        assert [r.output_ids for r in got] == [r.output_ids for r in want], params
        assert engine.stats()["verifies"] > 0 and engine.stats()["accepted_drafts"] > 0, params
        if params.logprobs:
            for a, b in zip(got, want, strict=True):
                assert len(a.logprobs) == len(b.logprobs) == 40
                for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs, strict=True):
                    assert abs(lp_a - lp_b) < 1e-4 and [t for t, _ in top_a] == [t for t, _ in top_b]


def test_a_requests_drafts_in_one_step_come_from_one_random_stream(poor, monkeypatch):
    """Sampled drafts d_1..d_k of one step are successive draws of one stream: a fresh generator per
    draft would give each the same noise (drafts correlated, the rejection rule's premise broken)."""
    import ds4c.runtime.engine as engine_mod

    model, successor = poor
    calls: list[tuple[int, int, bytes]] = []
    real = engine_mod.draft_token

    def spy(logits, params, generator):
        calls.append((engine.stats()["steps"], id(generator), bytes(generator.get_state().numpy())))
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "draft_token", spy)
    engine = _engine(model, speculative=DRAFTS)
    prompt = bigram_batch(successor, 1, 12, torch.Generator().manual_seed(3))[0].tolist()
    engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=1.0, seed=5))
    by_step: dict[int, list] = {}
    for step, gen, state in calls:
        by_step.setdefault(step, []).append((gen, state))
    full = [v for v in by_step.values() if len(v) == DRAFTS]
    assert full
    for draws in full:
        assert len({g for g, _ in draws}) == 1  # one generator per request and step
        assert len({s for _, s in draws}) == DRAFTS  # advanced between draws
