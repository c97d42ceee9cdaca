"""The engine's overlap of a decode step's launch with the host's reading of the previous one
(``Engine(overlap=True)``, the default on CUDA; ds4c/runtime/engine.py): on CPU over the eager step
and the compiled artifact, every request gets exactly the tokens it gets without overlap, with
arrivals, preemption, stop tokens, cancellation, seeded sampling with penalties and the prefix cache."""

from __future__ import annotations

import pytest
import torch

from ds4c.errors import InputError
from ds4c.runtime.sampling import SamplingParams
from tests.quant.synthetic_language import bigram_batch
from tests.runtime.test_engine import (  # noqa: F401 - the fixtures compiled and trained
    _engine,
    _greedy,
    _run_batched,
    _workload,
    compiled,
    trained,
)


def _both(model, work, params_of, **kw):
    plain = _run_batched(_engine(model, overlap=False, **kw), work, params_of)
    engine = _engine(model, overlap=True, **kw)
    over = _run_batched(engine, work, params_of)
    return plain, over, engine


def test_overlapped_decode_steps_give_the_same_tokens(trained):  # noqa: F811 - the imported fixture
    model, successor = trained
    work = _workload(successor, n=16, seed=4)
    plain, over, engine = _both(model, work, lambda i, n: SamplingParams(max_new_tokens=n), max_running=12,
                                max_step_tokens=48)
    assert [r.output_ids for r in over] == [r.output_ids for r in plain]
    assert [r.finish_reason for r in over] == [r.finish_reason for r in plain]
    assert engine.stats()["decode_tokens"] == sum(n - 1 for _, _, n in work)
    assert engine.stats()["overlapped_steps"] > 0
    # a steady batch (nothing waiting): every decode step but the first and the last few is overlapped
    steady = [(0, p, 30) for _, p, _ in work[2:6]]
    plain, over, engine = _both(model, steady, lambda i, n: SamplingParams(max_new_tokens=n))
    assert [r.output_ids for r in over] == [r.output_ids for r in plain]
    assert engine.stats()["overlapped_steps"] >= 25, engine.stats()  # of 29 decode steps
    assert engine.pools.stats() == _engine(model).pools.stats()


def test_overlap_with_preemption_stops_cancel_sampling_and_the_prefix_cache(trained):  # noqa: F811
    model, successor = trained
    work = _workload(successor, n=12, seed=5)
    g = torch.Generator().manual_seed(6)
    free = _run_batched(_engine(model, overlap=False), work[:1], _greedy)[0].output_ids
    stop = free[min(3, len(free) - 1)]

    def params(i, n):
        if i % 3 == 0:
            return SamplingParams(max_new_tokens=n, stop_token_ids=[stop])
        if i % 3 == 1:
            return SamplingParams(max_new_tokens=n, temperature=0.8, top_k=20, seed=i, repetition_penalty=1.1)
        return SamplingParams(max_new_tokens=n)

    for kw in ({"comp_pages": 25, "max_chunk": 7, "max_running": 8, "max_step_tokens": 16},
               {"prefix_cache": True, "max_running": 8, "max_step_tokens": 32}):
        plain, over, engine = _both(model, work, params, **kw)
        assert [r.output_ids for r in over] == [r.output_ids for r in plain], kw
        assert [r.finish_reason for r in over] == [r.finish_reason for r in plain], kw
        assert engine.stats()["overlapped_steps"] > 0, kw
    # cancellation mid-decode: the cancelled request stops, the others are unaffected
    prompt = bigram_batch(successor, 1, 30, g)[0].tolist()
    engine = _engine(model, overlap=True)
    a = engine.submit(prompt, SamplingParams(max_new_tokens=40))
    b = engine.submit(prompt, SamplingParams(max_new_tokens=40))
    for _ in range(6):
        engine.step()
    engine.cancel(a)
    engine.run_until_idle()
    assert a.finish_reason == "cancelled" and len(a.output_ids) < 40
    assert b.output_ids == _run_batched(_engine(model, overlap=False), [(0, prompt, 40)], _greedy)[0].output_ids
    assert engine.pools.stats() == _engine(model).pools.stats()


def test_overlap_needs_a_runner_that_takes_device_tokens(trained):  # noqa: F811
    model, _ = trained
    runner = _engine(model).runner
    runner.accepts_device_tokens = False
    from ds4c.runtime.engine import Engine

    with pytest.raises(InputError, match="overlap"):
        Engine(runner, overlap=True)
    assert Engine(runner).overlap is False


def test_overlap_on_the_compiled_artifact(trained, compiled):  # noqa: F811 - the imported fixtures
    """The artifact's runner takes the in-flight tokens as its input ids (op by op here; on CUDA the
    decode graphs copy them on the device)."""
    _, successor = trained
    steady = [(0, p, 20) for _, p, _ in _workload(successor, n=5, seed=7)[1:]]
    plain, over, engine = _both(compiled, steady, lambda i, n: SamplingParams(max_new_tokens=n))
    assert [r.output_ids for r in over] == [r.output_ids for r in plain]
    assert engine.stats()["overlapped_steps"] >= 15


def test_a_failing_overlapped_step_fails_its_requests_once(trained):  # noqa: F811
    """A chained step that raises: the tokens of the step before it are kept (once), the step's
    requests finish with "error", and the engine goes on with new requests."""
    model, successor = trained
    prompt = bigram_batch(successor, 1, 20, torch.Generator().manual_seed(9))[0].tolist()
    want = _run_batched(_engine(model, overlap=False), [(0, prompt, 12)], _greedy)[0].output_ids
    engine = _engine(model, overlap=True)
    req = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    real = engine.runner.run
    chained = []

    def run(batch, input_ids=None):
        if input_ids is not None:
            chained.append(1)
            if len(chained) == 3:
                raise RuntimeError("device lost")
        return real(batch, input_ids=input_ids)

    engine.runner.run = run
    with pytest.raises(RuntimeError, match="device lost"):
        while not req.finished:
            engine.step()
    assert req.finish_reason == "error" and "device lost" in req.error
    assert req.output_ids == want[:len(req.output_ids)] and 3 <= len(req.output_ids) < 12
    engine.runner.run = real
    again = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    engine.run_until_idle()
    assert again.output_ids == want and req.finish_reason == "error"
    assert engine.pools.stats() == _engine(model).pools.stats()


def test_decode_time_under_overlap_counts_the_wait_for_the_tokens(trained, monkeypatch):  # noqa: F811
    """With overlapped steps the host returns from a launch at once and waits when it reads the
    tokens: the engine's decode time (what bench serve's tokens/s and its HBM-bound ratio divide by)
    is the wall time until each step's tokens are read, counted once where steps overlap. Here a
    device that takes 20 ms per step is mimicked by reading the tokens 20 ms late."""
    import time

    from ds4c.runtime import engine as engine_module

    model, successor = trained
    read = engine_module._Inflight.tokens

    def late(self):
        time.sleep(0.02)
        return read(self)

    monkeypatch.setattr(engine_module._Inflight, "tokens", late)
    engine = _engine(model, overlap=True)
    work = [(0, bigram_batch(successor, 1, 12, torch.Generator().manual_seed(i))[0].tolist(), 20) for i in range(3)]
    started = time.perf_counter()
    _run_batched(engine, work, lambda i, n: SamplingParams(max_new_tokens=n))
    wall = time.perf_counter() - started
    stats = engine.stats()
    assert stats["overlapped_steps"] >= 15
    assert stats["decode_busy_s"] >= 0.02 * stats["decode_steps"] * 0.9, stats  # each step's wait counted
    assert stats["busy_s"] <= wall * 1.01, (stats, wall)  # and never twice
