"""The serving engine (ds4c/runtime/engine.py) on CPU over the eager paged step.

Every request of a continuous batch gets the tokens it gets alone: same engine, one request at a
time (docs/design/serving_engine.md, section 8.3). Floating point is not batch-invariant, so the
argument is by margin: the chosen token's logprob batched vs alone agrees to 2e-4, and tokens
are compared where the alone run's top-1/top-2 margin exceeds 1e-3 (the test asserts that
margin, on a briefly trained model whose logits are peaked). The oracle of "alone" is the dense
model (tests/models/test_paged_step.py), and of that transformers.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch

from ds4c.errors import InputError
from ds4c.models.deepseek_v4 import DeepseekV4Model, ModelConfig
from ds4c.models.deepseek_v4.paged import PageLayout
from ds4c.runtime.engine import EagerStepRunner, Engine
from ds4c.runtime.sampling import SamplingParams
from tests.hf_configs import SMALL_CONFIGS
from tests.quant.synthetic_language import bigram_batch, trained_model

MAX_CONTEXT = 384
MARGIN = 1e-3
TOL = 2e-4  # on logprobs: a logit minus a logsumexp, each within 1e-4 of the alone run's


@pytest.fixture(scope="module")
def trained():
    hf, successor, g = trained_model("mixed")
    model = DeepseekV4Model(ModelConfig.from_hf_dict(SMALL_CONFIGS["mixed"], source="mixed"), MAX_CONTEXT).eval()
    model.load_state_dict(hf.state_dict(), strict=True)
    return model, successor


@pytest.fixture(scope="module")
def compiled(trained, tmp_path_factory):
    """The trained model compiled with its serving entry points (cpu, fp32): what ds4c.Engine runs."""
    import ds4c

    hf, _, _ = trained_model("mixed")
    art = ds4c.compile(hf, target="cpu", max_context=MAX_CONTEXT, progress=False,
                       serving={"window_page": 4, "comp_page": 16, "max_chunk": 32, "max_running": 24})
    path = tmp_path_factory.mktemp("engine") / "mixed.ds4"
    art.save(path)
    return ds4c.load(path)


def _engine(model, *, window_pages=400, comp_pages=200, slots=25, max_chunk=32, **kw) -> Engine:
    """An engine over ``model``: the eager step of a DeepseekV4Model, or a compiled artifact's serving
    entry points (a CompiledModel), with pools of these sizes."""
    if hasattr(model, "manifest"):
        return Engine(model, pages={"window": window_pages, "compressed": comp_pages, "slots": slots},
                      max_chunk=max_chunk, **kw)
    layout = PageLayout(window=model.config.sliding_window, window_page=4, comp_page=16, max_context=MAX_CONTEXT,
                        max_chunk=max_chunk)
    runner = EagerStepRunner(model, layout, window_pages=window_pages, comp_pages=comp_pages, slots=slots)
    return Engine(runner, **kw)


@pytest.fixture(params=["eager", "artifact"])
def served(request, trained):
    """(model to serve, successor table): the eager step, and the compiled artifact (the acceptance's)."""
    model, successor = trained
    return (request.getfixturevalue("compiled") if request.param == "artifact" else model), successor


def _workload(successor, n=24, seed=0):
    """Prompts of 1..300 bigram tokens, outputs of 1..64, arrival steps 0..30."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 1 if i == 0 else 300 if i == 1 else rng.randint(1, 300)
        prompt = bigram_batch(successor, 1, length, g)[0].tolist()
        out.append((rng.randint(0, 30), prompt, rng.randint(1, 64)))
    return out


def _run_batched(engine, workload, params_of):
    """Submit each request at its arrival step; step until all are done."""
    reqs = {}
    step = 0
    while len(reqs) < len(workload) or not engine.idle:
        for i, (arrive, prompt, n) in enumerate(workload):
            if arrive == step:
                reqs[i] = engine.submit(prompt, params_of(i, n))
        engine.step()
        step += 1
    return [reqs[i] for i in range(len(workload))]


def _alone(model, workload, params_of, **kw):
    engine = _engine(model, **kw)
    out = []
    for i, (_, prompt, n) in enumerate(workload):
        req = engine.submit(prompt, params_of(i, n))
        engine.run_until_idle()
        out.append(req)
    return out


def _compare(batched, alone):
    """Tokens equal wherever the alone run's margin allows a verdict (asserted: everywhere here)."""
    for i, (b, a) in enumerate(zip(batched, alone, strict=True)):
        assert b.finish_reason == a.finish_reason == "length", i
        for t, ((lp_b, _), (lp_a, top_a)) in enumerate(zip(b.logprobs, a.logprobs, strict=True)):
            margin = top_a[0][1] - top_a[1][1]
            assert margin >= MARGIN, f"request {i} token {t}: the alone run's top-2 margin is {margin:.2e}"
            assert b.output_ids[t] == a.output_ids[t], (i, t)
            assert abs(lp_b - lp_a) <= TOL, (i, t, lp_b, lp_a)
        assert b.output_ids == a.output_ids


def _greedy(i, n):
    return SamplingParams(max_new_tokens=n, logprobs=2)


def test_continuous_batching_gives_each_request_its_tokens_alone(served):
    model, successor = served
    work = _workload(successor)
    engine = _engine(model, max_running=12, max_step_tokens=48)
    batched = _run_batched(engine, work, _greedy)
    stats = engine.stats()
    assert stats["preemptions"] == 0 and stats["finished"] == len(work)
    assert stats["prefill_tokens"] == sum(len(p) for _, p, _ in work)
    assert stats["decode_tokens"] == sum(n - 1 for _, _, n in work)  # each request's first token ends its prompt
    assert stats["prefill_tokens_per_s"] > 0 and stats["decode_tokens_per_s"] > 0 and stats["busy_s"] > 0
    assert all(len(r.output_ids) == n for r, (_, _, n) in zip(batched, work, strict=True))
    _compare(batched, _alone(model, work, _greedy))
    assert engine.pools.stats() == _engine(model).pools.stats()  # every page back


def test_preempted_requests_finish_with_the_same_tokens(served):
    model, successor = served
    work = _workload(successor, seed=1)
    # 24 compressed pages of 16 tokens: a few long requests at once, the rest wait or are preempted
    engine = _engine(model, comp_pages=25, max_chunk=7, max_running=12, max_step_tokens=24)
    batched = _run_batched(engine, work, _greedy)
    assert engine.stats()["preemptions"] > 0
    assert sum(r.preemptions for r in batched) == engine.stats()["preemptions"]
    _compare(batched, _alone(model, work, _greedy))
    assert engine.pools.stats() == _engine(model, comp_pages=25).pools.stats()


def test_seeded_sampling_is_the_same_alone_and_batched(served):
    model, successor = served
    work = _workload(successor, n=10, seed=2)

    def sampled(i, n):
        return SamplingParams(max_new_tokens=n, temperature=0.9, top_p=0.95, top_k=40, seed=1000 + i,
                              repetition_penalty=1.1)

    batched = _run_batched(_engine(model, max_running=6, max_step_tokens=20), work, sampled)
    alone = _alone(model, work, sampled)
    assert [r.output_ids for r in batched] == [r.output_ids for r in alone]


def test_stop_tokens_finish_a_request_and_the_rest_go_on(trained):
    model, successor = trained
    prompt = bigram_batch(successor, 1, 20, torch.Generator().manual_seed(3))[0].tolist()
    engine = _engine(model)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    stop = free[5]
    a = engine.submit(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=[stop]))
    b = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    engine.run_until_idle()
    assert a.finish_reason == "stop" and a.output_ids == free[:free.index(stop) + 1]
    assert b.finish_reason == "length" and b.output_ids == free


def test_bad_requests_are_refused_alone(trained):
    model, successor = trained
    engine = _engine(model)
    good = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
    vocab = model.config.vocab_size
    for prompt, params, match in [
        ([], SamplingParams(max_new_tokens=2), "prompt is empty"),
        ([1, vocab], SamplingParams(max_new_tokens=2), "outside"),
        ([1] * 380, SamplingParams(max_new_tokens=10), "exceeds max_context"),
        ([1, 2], SamplingParams(max_new_tokens=2, stop_token_ids=[vocab + 3]), "stop_token_ids"),
        ("abc", SamplingParams(max_new_tokens=2), "token ids"),
    ]:
        with pytest.raises(InputError, match=match):
            engine.submit(prompt, params)
    with pytest.raises(InputError, match="temperature"):
        SamplingParams(max_new_tokens=2, temperature=-1)
    engine.run_until_idle()
    assert good.finish_reason == "length" and len(good.output_ids) == 4
    assert engine.stats()["waiting"] == engine.stats()["running"] == 0


def test_cancel_frees_pages_at_the_next_step(trained):
    model, successor = trained
    engine = _engine(model)
    start = engine.pools.stats()
    long = engine.submit(list(range(100)), SamplingParams(max_new_tokens=50))
    queued = engine.submit([5, 6], SamplingParams(max_new_tokens=3))
    engine.cancel(queued)
    assert queued.finish_reason == "cancelled"
    for _ in range(6):
        engine.step()
    assert long.status == "running" and engine.pools.stats() != start
    engine.cancel(long)
    engine.step()
    assert long.finish_reason == "cancelled" and engine.idle and engine.pools.stats() == start


def test_engine_configuration_errors(trained):
    model, _ = trained
    with pytest.raises(InputError, match="max_running"):
        _engine(model, slots=5, max_running=8)
    with pytest.raises(InputError, match="max_step_tokens"):
        _engine(model, max_running=8, max_step_tokens=4)
    with pytest.raises(InputError, match="window pool"):
        _engine(model, window_pages=3)


@pytest.mark.slow
def test_ten_thousand_requests_leave_pools_and_memory_flat(trained):
    model, successor = trained
    engine = _engine(model, max_running=24, max_step_tokens=48)
    start = engine.pools.stats()
    rng = random.Random(5)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    counts = []
    for wave in range(10):
        for _ in range(1000):
            engine.submit([rng.randrange(160) for _ in range(rng.randint(1, 6))],
                          SamplingParams(max_new_tokens=rng.randint(1, 3)))
        engine.run_until_idle()
        counts.append(live_tensors())
        assert engine.pools.stats() == start, wave
    assert engine.stats()["finished"] == 10_000
    assert max(counts[1:]) <= counts[1] + 5, counts


def test_requests_stream_tokens_inline_in_a_background_loop_and_async(trained):
    import asyncio

    model, successor = trained
    prompts = [bigram_batch(successor, 1, n, torch.Generator().manual_seed(n))[0].tolist() for n in (5, 17, 40)]
    want = _engine(model).generate(prompts, SamplingParams(max_new_tokens=6))
    # inline: iterating a request steps the engine
    engine = _engine(model)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    assert list(reqs[1]) == want[1] and [r.output_ids for r in reqs if r.finished]
    engine.run_until_idle()
    # a background loop: submitted from this thread, consumed as they come
    engine.start()
    try:
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts]
        assert [list(r) for r in reqs] == want

        async def consume():
            rs = [engine.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts]
            return await asyncio.gather(*[_collect(r) for r in rs])

        async def _collect(r):
            return [t async for t in r.stream()]

        assert asyncio.run(consume()) == want
    finally:
        engine.stop(timeout=30)
    assert engine.idle and engine.pools.stats() == _engine(model).pools.stats()


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(trained):
    model, _ = trained
    engine = _engine(model)
    real_run = engine.runner.run
    calls = []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real_run(batch)

    engine.runner.run = flaky
    bad = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert bad.finish_reason == "error" and "device lost" in bad.error
    good = engine.submit([4, 5], SamplingParams(max_new_tokens=3))
    engine.run_until_idle()
    assert good.finish_reason == "length" and len(good.output_ids) == 3
    assert engine.pools.stats() == _engine(model).pools.stats()
