"""Prefix caching (ds4c/runtime/prefix_cache.py) on CPU, fp32: a request served from a cached
prefix gets the logprobs (<= 1e-5) and greedy tokens it gets without the cache, for shared
prefixes ending at every offset modulo the CSA rate (4), the compressed page (16), the HCA rate
(8) and the window (8), on the eager step and on the compiled artifact; it computes only the
unshared part plus at most one window; multi-turn sessions hit their own history; eviction keeps
results exact; no page leaks."""

from __future__ import annotations

import random

import pytest
import torch

from ds4c.errors import InputError
from ds4c.runtime.engine import Engine
from ds4c.runtime.sampling import SamplingParams
from tests.quant.synthetic_language import bigram_batch
from tests.runtime.test_engine import _engine, compiled, trained  # noqa: F401 - fixtures

WINDOW = 8  # the "mixed" config's sliding window
TOL = 1e-5
PARAMS = SamplingParams(max_new_tokens=6, logprobs=5)


def _prompt(successor, n, seed):
    return bigram_batch(successor, 1, n, torch.Generator().manual_seed(seed))[0].tolist()


def _serve_alone(engine, prompt, params=PARAMS):
    before = engine.stats()["prefill_tokens"]
    req = engine.submit(prompt, params)
    engine.run_until_idle()
    return req, engine.stats()["prefill_tokens"] - before


def _same(a, b):
    assert a.output_ids == b.output_ids
    for (lp_a, top_a), (lp_b, top_b) in zip(a.logprobs, b.logprobs, strict=True):
        assert abs(lp_a - lp_b) <= TOL
        assert [t for t, _ in top_a] == [t for t, _ in top_b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(top_a, top_b, strict=True)) <= TOL


def _check_shared_prefixes(model, successor, lengths):
    cached, plain = _engine(model, prefix_cache=True, max_chunk=28), _engine(model)
    for k, shared in enumerate(lengths):
        prefix = _prompt(successor, shared, seed=100 + k)
        donor = prefix + _prompt(successor, 5, seed=200 + k)
        asker = prefix + _prompt(successor, 7, seed=300 + k)
        if asker[shared] == donor[shared]:  # make the two diverge right after the prefix
            asker[shared] = (asker[shared] + 1) % 100 + 3
        _serve_alone(cached, donor)
        got, computed = _serve_alone(cached, asker)
        want, _ = _serve_alone(plain, asker)
        _same(got, want)
        unshared = len(asker) - shared
        assert unshared <= computed <= unshared + WINDOW, (shared, computed)
        if shared >= 16:
            assert got.cached_tokens >= shared - WINDOW
    stats = cached.stats()["prefix_cache"]
    assert stats["hit_tokens"] > 0 and 0 < stats["hit_rate"] < 1
    return cached


def test_hits_at_every_offset_give_the_uncached_results(trained):  # noqa: F811
    model, successor = trained
    lengths = [*range(16, 49), 63, 64, 65, 127, 128, 129, 130, 131]
    cached = _check_shared_prefixes(model, successor, lengths)
    cached._cache.clear()
    assert all(p["used"] == 0 for p in cached.stats()["pages"].values())


def test_hits_on_the_compiled_artifact(compiled, trained):  # noqa: F811
    _, successor = trained
    _check_shared_prefixes(compiled, successor, [16, 17, 18, 19, 20, 23, 24, 31, 32, 33, 100])


def test_multi_turn_sessions_hit_their_own_history(trained):  # noqa: F811
    model, successor = trained
    cached, plain = _engine(model, prefix_cache=True, max_chunk=28), _engine(model)
    history = _prompt(successor, 40, seed=1)
    for turn in range(4):
        got, computed = _serve_alone(cached, history)
        want, _ = _serve_alone(plain, history)
        _same(got, want)
        if turn:  # all but the newest tokens and one window came from the cache
            assert computed <= 13 + WINDOW, (turn, computed)
        history = history + got.output_ids + _prompt(successor, 7, seed=10 + turn)


def test_eviction_keeps_results_exact_and_frees_pages(trained):  # noqa: F811
    model, successor = trained
    cached, plain = _engine(model, prefix_cache=True, max_chunk=28, window_pages=60, comp_pages=40), _engine(model)
    prefix = _prompt(successor, 90, seed=5)
    _serve_alone(cached, prefix + [7, 8, 9])
    nodes = cached.stats()["prefix_cache"]["nodes"]
    for _ in range(nodes // 2):  # drop the newest half of the tree's leaves and windows
        assert cached._cache.evict()
    got, _ = _serve_alone(cached, prefix + [11, 12])
    _same(got, _serve_alone(plain, prefix + [11, 12])[0])
    # a workload that does not fit beside the cache: eviction makes room, results stay exact
    rng = random.Random(0)
    prompts = [_prompt(successor, rng.randint(20, 120), seed=50 + i) for i in range(8)]
    evicted = cached.stats()["prefix_cache"]["evictions"]
    reqs = [cached.submit(p, PARAMS) for p in prompts]
    cached.run_until_idle()
    assert cached.stats()["prefix_cache"]["evictions"] > evicted
    for req, p in zip(reqs, prompts, strict=True):
        _same(req, _serve_alone(plain, p)[0])
    cached._cache.clear()
    assert all(p["used"] == 0 for p in cached.stats()["pages"].values())


def test_batched_requests_sharing_a_system_prompt(trained):  # noqa: F811
    model, successor = trained
    system = _prompt(successor, 70, seed=9)
    asks = [system + _prompt(successor, random.Random(i).randint(3, 30), seed=400 + i) for i in range(10)]
    cached, plain = _engine(model, prefix_cache=True, max_chunk=28), _engine(model)
    first = cached.submit(asks[0], PARAMS)
    cached.run_until_idle()
    reqs = [first] + [cached.submit(a, PARAMS) for a in asks[1:]]
    cached.run_until_idle()
    for req, a in zip(reqs, asks, strict=True):
        want, _ = _serve_alone(plain, a)
        assert req.output_ids == want.output_ids
    assert all(r.cached_tokens >= 70 - WINDOW for r in reqs[1:])
    assert cached.stats()["prefix_cache"]["hit_rate"] > 0.5


def test_prefix_cache_needs_a_runner_that_copies_pages(trained):  # noqa: F811
    model, _ = trained
    runner = _engine(model).runner

    class NoCopy:
        layout, pools, rates, vocab_size, device = runner.layout, runner.pools, runner.rates, runner.vocab_size, "cpu"
        run = runner.run

    with pytest.raises(InputError, match="cannot copy pages"):
        Engine(NoCopy(), prefix_cache=True)
    with pytest.raises(InputError, match="prefix_granule"):
        Engine(runner, prefix_cache=True, prefix_granule=6)


def test_a_batched_workload_with_shared_prefixes_preemption_and_eviction(trained):  # noqa: F811
    """24 requests arriving at random steps, most starting with one of three system prompts, through
    small pools (preemption and eviction happen): each gets its tokens alone without the cache."""
    from tests.runtime.test_engine import _alone, _compare, _greedy, _run_batched

    model, successor = trained
    rng = random.Random(7)
    systems = [_prompt(successor, n, seed=60 + n) for n in (40, 90, 150)]
    work = []
    for i in range(24):
        head = systems[rng.randrange(3)] if rng.random() < 0.8 else []
        work.append((rng.randint(0, 30), head + _prompt(successor, rng.randint(1, 60), seed=700 + i),
                     rng.randint(1, 24)))
    engine = _engine(model, prefix_cache=True, comp_pages=40, window_pages=200, max_chunk=7, max_running=12,
                     max_step_tokens=24)
    batched = _run_batched(engine, work, _greedy)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache"]["evictions"] > 0
    assert stats["prefix_cache"]["hit_tokens"] > 0
    assert sum(r.cached_tokens for r in batched) > 0
    _compare(batched, _alone(model, work, _greedy))
    # the holds the cache counts as it goes are the tree's (stats no longer walks it)
    assert stats["prefix_cache"]["holds"] == _walked_holds(engine._cache)
    engine._cache.clear()
    assert all(p["used"] == 0 for p in engine.stats()["pages"].values())
    assert engine.stats()["prefix_cache"]["holds"] == {"window": 0, "compressed": 0} == _walked_holds(engine._cache)


def _walked_holds(cache) -> dict[str, int]:
    held = {"window": 0, "compressed": 0}
    stack = list(cache.root.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        held["compressed"] += 1
        held["window"] += len(node.window or ())
    return held


def test_sessions_keep_their_history_when_window_pages_run_short(trained):  # noqa: F811
    """Eight chat sessions (one system prompt, three turns each, interleaved) through a window pool
    too small to keep every cached node's window pages: eviction drops the windows of plain path
    nodes first, so each later turn still resumes at the end of its own history (all but the
    newest tokens, the granule and one window from the cache)."""
    model, successor = trained
    engine = _engine(model, prefix_cache=True, max_chunk=28, window_pages=50)
    system = _prompt(successor, 48, seed=3)
    histories = [system + _prompt(successor, 9, seed=400 + s) for s in range(8)]
    for turn in range(3):
        reqs = [engine.submit(h, SamplingParams(max_new_tokens=5)) for h in histories]
        engine.run_until_idle()
        for s, req in enumerate(reqs):
            if turn:
                assert req.cached_tokens >= len(histories[s]) - 9 - WINDOW - engine._cache.granule, (turn, s)
            histories[s] = histories[s] + req.output_ids + _prompt(successor, 4, seed=500 + 10 * turn + s)
    assert engine.stats()["prefix_cache"]["evictions"] > 0
