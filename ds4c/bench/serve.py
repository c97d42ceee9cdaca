"""``ds4c bench serve``: a synthetic request trace through ``ds4c.Engine``, against static batching.

A workload is ``n`` requests with prompt and output lengths drawn uniformly or log-normally from
ranges (``--prompt-len 128:4096 --output-len 64:512``), random token ids, and arrivals either
Poisson at ``rate`` requests per second (open loop) or as fast as ``concurrency`` requests in
flight allow (closed loop). The engine is driven from this thread: requests are submitted when
their arrival time has passed, one ``step`` at a time; the time of every request's first token and
last token is taken after the step that produced it (its tokens are on the host then).

Reported (``summarize``): output tokens/s and requests/s over the whole run, TTFT (arrival to
first token) and TPOT (time per output token after the first) at p50/p90/p99, the most pages in
use per pool, preemptions. The static baseline runs the same requests in arrival order in batches
of ``batch``: prompts right-padded to the batch's longest and decoded to its longest output with
``CompiledModel.generate`` (timing only: a padded DeepSeek-V4 row is not a valid output, since
padding shifts compression windows), as a server without continuous batching would.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ds4c.errors import InputError

__all__ = ["Workload", "make_workload", "run_engine", "run_static", "summarize"]


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order: (arrival time in s from the start, prompt ids, output tokens)."""

    requests: tuple[tuple[float, tuple[int, ...], int], ...]
    rate: float | None
    concurrency: int | None

    @property
    def output_tokens(self) -> int:
        return sum(n for _, _, n in self.requests)


def _span(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise InputError(f"--{name} {text!r}: give LOW:HIGH token counts, e.g. 128:4096") from None
    if not 1 <= lo_i <= hi_i:
        raise InputError(f"--{name} {text!r}: need 1 <= LOW <= HIGH")
    return lo_i, hi_i


def make_workload(n: int, prompt_len: str, output_len: str, vocab: int, *, max_context: int,
                  rate: float | None = None, concurrency: int | None = None, dist: str = "uniform",
                  seed: int = 0) -> Workload:
    """``n`` requests (see the module docstring); a request longer than ``max_context`` is refused
    here, naming the lengths, rather than by the engine mid-run."""
    if n < 1:
        raise InputError(f"--requests {n}: give at least 1")
    if (rate is None) == (concurrency is None):
        raise InputError("give exactly one of --rate (requests/s, Poisson arrivals) or --concurrency (in flight)")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise InputError(f"--rate {rate}: give a positive number of requests per second")
    if concurrency is not None and concurrency < 1:
        raise InputError(f"--concurrency {concurrency}: give at least 1")
    if dist not in ("uniform", "lognormal"):
        raise InputError(f"--dist {dist!r}: uniform or lognormal")
    plo, phi = _span(prompt_len, "prompt-len")
    olo, ohi = _span(output_len, "output-len")
    if phi + ohi > max_context:
        raise InputError(f"--prompt-len up to {phi} + --output-len up to {ohi} exceeds the artifact's max_context "
                         f"{max_context}; shorten them")
    rng = random.Random(seed)

    def draw(lo: int, hi: int) -> int:
        if dist == "uniform" or lo == hi:
            return rng.randint(lo, hi)
        mu, sigma = (math.log(lo) + math.log(hi)) / 2, (math.log(hi) - math.log(lo)) / 4
        return min(hi, max(lo, round(rng.lognormvariate(mu, sigma))))

    t, out = 0.0, []
    for _ in range(n):
        if rate is not None:
            t += rng.expovariate(rate)
        prompt = tuple(rng.randrange(vocab) for _ in range(draw(plo, phi)))
        out.append((t if rate is not None else 0.0, prompt, draw(olo, ohi)))
    return Workload(tuple(out), rate, concurrency)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    v = sorted(values)
    return {f"p{q}": v[min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1)] for q in (50, 90, 99)}


def run_engine(engine: Any, workload: Workload, *, sync: Callable[[], None] = lambda: None,
               on_finish: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Drive ``engine`` through ``workload``; per-request times and the engine's peaks."""
    import ds4c

    start = time.perf_counter()
    pending = list(enumerate(workload.requests))
    live: dict[Any, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    peak = {name: 0 for name in engine.stats()["pages"]}
    while pending or live:
        now = time.perf_counter() - start
        while pending and (workload.concurrency is None and pending[0][1][0] <= now
                           or workload.concurrency is not None and len(live) < workload.concurrency):
            i, (arrival, prompt, n) = pending.pop(0)
            req = engine.submit(list(prompt), ds4c.SamplingParams(max_new_tokens=n, stop_token_ids=()))
            live[req] = {"index": i, "arrival": arrival if workload.concurrency is None else now, "prompt": len(prompt)}
        if not live:  # open loop, the next request has not arrived yet
            time.sleep(max(0.0, min(pending[0][1][0] - now, 0.01)))
            continue
        stepped = engine.step()
        sync()
        now = time.perf_counter() - start
        for name, p in engine.stats()["pages"].items():
            peak[name] = max(peak[name], p["used"])
        for req in stepped:
            rec = live.get(req)
            if rec is not None and "first" not in rec and req.output_ids:
                rec["first"] = now
        for req in [r for r in live if r.finished]:
            rec = live.pop(req)
            rec.update(last=now, tokens=len(req.output_ids), finish_reason=req.finish_reason)
            rec.setdefault("first", now)
            done.append(rec)
            on_finish()
    stats = engine.stats()
    return {"requests": sorted(done, key=lambda r: r["index"]), "seconds": time.perf_counter() - start,
            "pages_peak": peak, "preemptions": stats["preemptions"], "steps": stats["steps"]}


def run_static(model: Any, workload: Workload, batch: int, *, sync: Callable[[], None] = lambda: None,
               on_finish: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The same requests in arrival order, ``batch`` at a time, padded (timing only; see the module doc)."""
    start = time.perf_counter()
    done = []
    reqs = list(enumerate(workload.requests))
    for at in range(0, len(reqs), batch):
        group = reqs[at:at + batch]
        arrive = max(a for _, (a, _, _) in group) if workload.concurrency is None else 0.0
        wait = arrive - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        longest = max(len(p) for _, (_, p, _) in group)
        steps = max(n for _, (_, _, n) in group)
        ids = [list(p) + [0] * (longest - len(p)) for _, (_, p, _) in group]
        t0 = time.perf_counter() - start
        logits, state = model.prefill(ids, logits="last")  # the batch's first tokens
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        sync()
        first = time.perf_counter() - start
        for k in range(steps - 1):  # every row decodes to the batch's longest output
            logits, state = model.decode(token, longest + k, state)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
        sync()
        last = time.perf_counter() - start
        for i, (a, p, n) in group:
            done.append({"index": i, "arrival": a if workload.concurrency is None else t0, "prompt": len(p),
                         "first": first, "last": last, "tokens": n, "finish_reason": "length"})
            on_finish()
    return {"requests": done, "seconds": time.perf_counter() - start, "batch": batch}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Throughput and latency percentiles of a run (``run_engine`` / ``run_static``)."""
    reqs = run["requests"]
    tokens = sum(r["tokens"] for r in reqs)
    ttft = [r["first"] - r["arrival"] for r in reqs]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in reqs if r["tokens"] > 1]
    out = {"requests": len(reqs), "seconds": run["seconds"], "output_tokens": tokens,
           "output_tokens_per_s": tokens / run["seconds"] if run["seconds"] else None,
           "requests_per_s": len(reqs) / run["seconds"] if run["seconds"] else None,
           "ttft_s": _percentiles(ttft), "tpot_s": _percentiles(tpot)}
    for key in ("pages_peak", "preemptions", "steps", "batch"):
        if key in run:
            out[key] = run[key]
    return out
