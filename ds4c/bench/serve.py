"""``ds4c bench serve``: a synthetic request trace through ``ds4c.Engine``, against static batching.

A workload is ``n`` requests with prompt and output lengths drawn uniformly or log-normally from
ranges (``--prompt-len 128:4096 --output-len 64:512``), random token ids, and arrivals either
Poisson at ``rate`` requests per second (open loop) or as fast as ``concurrency`` requests in
flight allow (closed loop). The engine is driven from this thread: requests are submitted when
their arrival time has passed, one ``step`` at a time; the time of every request's first token and
last token is taken after the step that produced it (its tokens are on the host then).

Shared prefixes (``--shared-prefix LEN[:FRACTION]``): that fraction of the requests starts with
the same LEN-token system prompt. Multi-turn sessions (``--turns T``): ``n`` sessions of T turns;
turn t + 1 is submitted when turn t finishes, its prompt the whole history (every earlier prompt
and output) plus new tokens, as a chat client sends it. ``Workload.shareable`` counts the prompt
tokens a prefix cache could reuse by construction (the shared prefix of every request after the
first that has it, each later turn's history but its last token), so a run's hit rate can be
judged against the ideal.

Reported (``summarize``): output tokens/s and requests/s over the whole run, TTFT (arrival to
first token) and TPOT (time per output token after the first) at p50/p90/p99, the most pages in
use per pool, preemptions, prompt tokens computed and the prefix cache's hits. ``run_http`` drives
a running ``ds4c serve`` instead, over HTTP (streamed completions with token-id prompts). The static baseline runs the same requests in arrival order in batches
of ``batch``: prompts right-padded to the batch's longest and decoded to its longest output with
``CompiledModel.generate`` (timing only: a padded DeepSeek-V4 row is not a valid output, since
padding shifts compression windows), as a server without continuous batching would.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ds4c.errors import InputError

__all__ = ["Workload", "decode_bound", "make_workload", "run_engine", "run_http", "run_static", "summarize"]


@dataclass(frozen=True)
class Workload:
    """Requests in arrival order: (arrival time in s from the start, prompt ids, output tokens).
    With ``turns`` > 1 each entry is a session's first turn and ``later[i]`` the (new prompt ids,
    output tokens) of its later turns, submitted as the previous one finishes."""

    requests: tuple[tuple[float, tuple[int, ...], int], ...]
    rate: float | None
    concurrency: int | None
    later: tuple[tuple[tuple[tuple[int, ...], int], ...], ...] = ()
    shared_prefix: int = 0

    @property
    def turns(self) -> int:
        return 1 + (len(self.later[0]) if self.later else 0)

    @property
    def output_tokens(self) -> int:
        return sum(n for _, _, n in self.requests) + sum(n for turns in self.later for _, n in turns)

    @property
    def total_requests(self) -> int:
        return len(self.requests) * self.turns

    def shareable(self) -> int:
        """Prompt tokens reusable by construction: the shared prefix of every request after the
        first that starts with it, and each later turn's history but its newest token."""
        count = sum(1 for _, p, _ in self.requests if self.shared_prefix and len(p) > self.shared_prefix
                    and p[:self.shared_prefix] == self.requests[0][1][:self.shared_prefix])
        total = max(0, count - 1) * self.shared_prefix
        for (_, prompt, n), turns in zip(self.requests, self.later or [()] * len(self.requests), strict=True):
            history = len(prompt) + n
            for new, m in turns:
                total += history - 1
                history += len(new) + m
        return total


def _span(text: str, name: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise InputError(f"--{name} {text!r}: give LOW:HIGH token counts, e.g. 128:4096") from None
    if not 1 <= lo_i <= hi_i:
        raise InputError(f"--{name} {text!r}: need 1 <= LOW <= HIGH")
    return lo_i, hi_i


def _shared(text: str | None) -> tuple[int, float]:
    if not text:
        return 0, 0.0
    length, _, fraction = text.partition(":")
    try:
        n, f = int(length), float(fraction or 1.0)
    except ValueError:
        raise InputError(f"--shared-prefix {text!r}: give LEN or LEN:FRACTION, e.g. 2048:0.9") from None
    if n < 1 or not 0 < f <= 1:
        raise InputError(f"--shared-prefix {text!r}: need LEN >= 1 and 0 < FRACTION <= 1")
    return n, f


def make_workload(n: int, prompt_len: str, output_len: str, vocab: int, *, max_context: int,
                  rate: float | None = None, concurrency: int | None = None, dist: str = "uniform",
                  seed: int = 0, shared_prefix: str | None = None, turns: int = 1) -> Workload:
    """``n`` requests, or ``n`` sessions of ``turns`` turns (see the module docstring); a request
    longer than ``max_context`` is refused here, naming the lengths, rather than by the engine mid-run."""
    if turns < 1:
        raise InputError(f"--turns {turns}: give at least 1")
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
    share, fraction = _shared(shared_prefix)
    longest = share + turns * (phi + ohi)
    if longest > max_context:
        raise InputError(f"--shared-prefix {share} + --turns {turns} x (--prompt-len up to {phi} + --output-len up to "
                         f"{ohi}) = {longest} tokens exceeds the artifact's max_context {max_context}; shorten them")
    rng = random.Random(seed)
    system = tuple(rng.randrange(vocab) for _ in range(share))

    def draw(lo: int, hi: int) -> int:
        if dist == "uniform" or lo == hi:
            return rng.randint(lo, hi)
        mu, sigma = (math.log(lo) + math.log(hi)) / 2, (math.log(hi) - math.log(lo)) / 4
        return min(hi, max(lo, round(rng.lognormvariate(mu, sigma))))

    def tokens(count: int) -> tuple[int, ...]:
        return tuple(rng.randrange(vocab) for _ in range(count))

    t, out, later = 0.0, [], []
    for _ in range(n):
        if rate is not None:
            t += rng.expovariate(rate)
        head = system if share and rng.random() < fraction else ()
        out.append((t if rate is not None else 0.0, head + tokens(draw(plo, phi)), draw(olo, ohi)))
        later.append(tuple((tokens(draw(plo, phi)), draw(olo, ohi)) for _ in range(turns - 1)))
    return Workload(tuple(out), rate, concurrency, tuple(later) if turns > 1 else (), share)


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
    before = engine.stats()
    pending = [(i, a, p, n, 0) for i, (a, p, n) in enumerate(workload.requests)]
    live: dict[Any, dict[str, Any]] = {}
    done: list[dict[str, Any]] = []
    peak = {name: 0 for name in before["pages"]}
    while pending or live:
        now = time.perf_counter() - start
        while pending and (workload.concurrency is None and pending[0][1] <= now
                           or workload.concurrency is not None and len(live) < workload.concurrency):
            i, arrival, prompt, n, turn = pending.pop(0)
            req = engine.submit(list(prompt), ds4c.SamplingParams(max_new_tokens=n, stop_token_ids=()))
            live[req] = {"index": i, "turn": turn, "arrival": arrival if workload.concurrency is None else now,
                         "prompt": len(prompt)}
        if not live:  # open loop, the next request has not arrived yet
            time.sleep(max(0.0, min(pending[0][1] - now, 0.01)))
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
            nxt = _next_turn(workload, rec, req.tokens)
            if nxt is not None:  # the session's next turn, now: its history and new tokens
                pending.insert(0, (rec["index"], now, *nxt, rec["turn"] + 1))
    stats = engine.stats()
    cache = stats.get("prefix_cache") or {}
    return {"requests": sorted(done, key=lambda r: (r["index"], r["turn"])), "seconds": time.perf_counter() - start,
            "pages_peak": peak, "pages_capacity": {k: p["capacity"] for k, p in stats["pages"].items()},
            "prefix_cache": {k: cache[k] for k in ("nodes", "granule", "history", "holds", "evictions") if k in cache},
            "decode_graphs": stats.get("decode_graphs", []), "step_graphs": stats.get("step_graphs", []),
            "graph_errors": stats.get("graph_errors", {}),
            "preemptions": stats["preemptions"] - before["preemptions"],
            "steps": stats["steps"] - before["steps"],
            "decode_steps": stats["decode_steps"] - before["decode_steps"],
            "decode_tokens": stats["decode_only_tokens"] - before["decode_only_tokens"],  # of decode-only steps
            "decode_busy_s": stats["decode_busy_s"] - before["decode_busy_s"],
            "busy_s": stats["busy_s"] - before["busy_s"],
            "prompt_tokens_computed": stats["prefill_tokens"] - before["prefill_tokens"],
            "prefix_hit_tokens": cache.get("hit_tokens", 0) - ((before.get("prefix_cache") or {}).get("hit_tokens", 0)),
            "shareable_tokens": workload.shareable()}


def _next_turn(workload: Workload, rec: dict[str, Any], history: list[int]) -> tuple[tuple[int, ...], int] | None:
    if rec["turn"] + 1 >= workload.turns:
        return None
    new, n = workload.later[rec["index"]][rec["turn"]]
    return tuple(history) + new, n


def ds4c_padded(model: Any, sync: Callable[[], None]) -> Callable[[list[list[int]], int], float]:
    """``generate`` of a padded batch on a ``CompiledModel`` (dense prefill, graphed decode): runs
    ``steps`` tokens for every row and returns the time its first tokens were on the host."""
    def run(ids: list[list[int]], steps: int) -> float:
        logits, state = model.prefill(ids, logits="last")  # the batch's first tokens
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        sync()
        first = time.perf_counter()
        for k in range(steps - 1):  # every row decodes to the batch's longest output
            logits, state = model.decode(token, len(ids[0]) + k, state)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)
        return first
    return run


def run_static(model: Any, workload: Workload, batch: int, *, sync: Callable[[], None] = lambda: None,
               on_finish: Callable[[], None] = lambda: None,
               generate: Callable[[list[list[int]], int], float] | None = None, name: str = "static") -> dict[str, Any]:
    """The same requests in arrival order, ``batch`` at a time, prompts right-padded to the batch's
    longest and every row decoded to its longest output (timing only; see the module doc), by
    ``generate(ids, steps) -> time of the first tokens`` (default: ``ds4c_padded(model)``)."""
    if workload.turns > 1:
        raise InputError(f"--compare {name}: a padded batch cannot continue sessions (--turns > 1); compare with "
                         "nocache instead")
    generate = generate or ds4c_padded(model, sync)
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
        first = generate(ids, steps) - start
        sync()
        last = time.perf_counter() - start
        for i, (a, p, n) in group:
            done.append({"index": i, "arrival": a if workload.concurrency is None else t0, "prompt": len(p),
                         "first": first, "last": last, "tokens": n, "finish_reason": "length"})
            on_finish()
    return {"requests": done, "seconds": time.perf_counter() - start, "batch": batch}


def decode_bound(model: Any, batch: float, context: float) -> dict[str, float]:
    """The HBM limit of the engine's decode steps (``ds4c.bench.roofline``): tokens/s of ``batch``
    sequences at ``context`` positions on the artifact's target, reading the artifact's weights
    as stored and its state in the pools' dtype."""
    import torch

    from ds4c.bench.roofline import decode_bytes, decode_state_bytes
    from ds4c.targets import get_target

    cfg = model.manifest["model"]["config"]
    pools = (model.manifest.get("serving") or {}).get("pools") or [{"dtype": "bfloat16"}]
    itemsize = getattr(torch, pools[0]["dtype"]).itemsize
    target = get_target(model.manifest["target"]["name"])
    step_bytes = decode_bytes(model.weights, cfg, max(1, round(batch)), batch * decode_state_bytes(cfg, context,
                                                                                                    itemsize))
    seconds = step_bytes / target.hbm_bandwidth
    return {"step_bytes": step_bytes, "step_s": seconds, "tokens_per_s": batch / seconds,
            "hbm_bandwidth": target.hbm_bandwidth, "target": target.name}


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
    for key in ("pages_peak", "pages_capacity", "prefix_cache", "decode_graphs", "step_graphs", "graph_errors",
                "preemptions", "steps", "batch",
                "prompt_tokens_computed", "prefix_hit_tokens", "shareable_tokens"):
        if key in run:
            out[key] = run[key]
    if run.get("decode_steps"):  # decode-only steps: the batch they ran and their tokens/s
        out["decode_batch"] = run["decode_tokens"] / run["decode_steps"]
        out["decode_tokens_per_s"] = run["decode_tokens"] / run["decode_busy_s"] if run["decode_busy_s"] else None
    if run.get("steps") is not None and run.get("busy_s") is not None:  # steps that held prompt chunks
        mixed = run["steps"] - run.get("decode_steps", 0)
        out["prompt_steps"] = mixed
        out["prompt_step_s"] = (run["busy_s"] - run.get("decode_busy_s", 0.0)) / mixed if mixed else None
    out["prompt_tokens"] = sum(r["prompt"] for r in reqs)
    out["mean_context"] = (sum(r["prompt"] + r["tokens"] / 2 for r in reqs) / len(reqs)) if reqs else 0.0
    if run.get("shareable_tokens"):
        out["hit_vs_ideal"] = run.get("prefix_hit_tokens", 0) / run["shareable_tokens"]
    return out


def run_http(url: str, workload: Workload, *, model: str | None = None, timeout: float = 600.0,
             on_finish: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Drive a running ``ds4c serve`` at ``url`` through ``workload``: each request a streamed
    ``/v1/completions`` with a token-id prompt (greedy, ``ignore_eos``: it produces its drawn
    length); times as the chunks arrive. Later turns send the history the server returned
    (``token_ids`` of the chunks)."""
    import httpx

    async def main() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=limits) as client:
            name = model
            if name is None:
                r = await client.get("/v1/models")
                r.raise_for_status()
                name = r.json()["data"][0]["id"]
            metrics_before = await _scrape(client)
            start = time.perf_counter()
            done: list[dict[str, Any]] = []
            slots = asyncio.Semaphore(workload.concurrency or 1 << 30)

            async def one(i: int, arrival: float, prompt: tuple[int, ...], n: int, turn: int) -> None:
                wait = arrival - (time.perf_counter() - start)
                if wait > 0:
                    await asyncio.sleep(wait)
                async with slots:
                    rec = {"index": i, "turn": turn, "prompt": len(prompt),
                           "arrival": time.perf_counter() - start}
                    out: list[int] = []
                    body = {"model": name, "prompt": list(prompt), "max_tokens": n, "temperature": 0, "stream": True,
                            "ignore_eos": True}
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            raise InputError(f"{url}/v1/completions answered {r.status_code}: {(await r.aread())[:300]!r}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            choices = json.loads(line[6:]).get("choices") or []
                            if choices and choices[0].get("token_ids"):
                                rec.setdefault("first", time.perf_counter() - start)
                                out += choices[0]["token_ids"]
                                reason = choices[0].get("finish_reason")
                                if reason:
                                    rec["finish_reason"] = reason
                    rec.update(last=time.perf_counter() - start, tokens=len(out))
                    rec.setdefault("first", rec["last"])
                done.append(rec)
                on_finish()
                nxt = _next_turn(workload, rec, [*prompt, *out])
                if nxt is not None:
                    await one(i, 0.0, *nxt, turn + 1)

            await asyncio.gather(*[one(i, a if workload.concurrency is None else 0.0, p, n, 0)
                                   for i, (a, p, n) in enumerate(workload.requests)])
            seconds = time.perf_counter() - start
            metrics_after = await _scrape(client)

        def delta(key: str) -> float:
            return metrics_after.get(key, 0.0) - metrics_before.get(key, 0.0)

        return {"requests": sorted(done, key=lambda r: (r["index"], r["turn"])), "seconds": seconds,
                "preemptions": int(delta("ds4c_preemptions_total")), "steps": int(delta("ds4c_engine_steps_total")),
                "prompt_tokens_computed": int(delta("ds4c_computed_prefill_tokens_total")),
                "prefix_hit_tokens": int(delta("ds4c_prefix_hit_tokens_total")),
                "shareable_tokens": workload.shareable()}

    return asyncio.run(main())


async def _scrape(client) -> dict[str, float]:
    """The server's unlabelled counters from ``/metrics`` (Prometheus text)."""
    r = await client.get("/metrics")
    out = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out
