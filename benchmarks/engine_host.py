"""The serving engine's host time per step, without the model: what the scheduler, the page tables and
the step's metadata cost on the CPU (#26: at concurrency 1 a GPU step is ~1.6 ms on flash-slice; the
host must stay well below it, and below the device step at any batch, or the GPU waits).

    PYTHONPATH=. python benchmarks/engine_host.py --out engine_host.json

Two measurements, no GPU needed:

- ``paging``: a decode step's page bookkeeping and metadata (``RequestPages.grow`` by one position
  and ``build_step``) for 64 requests at flash-slice's page layout, at a context of 8192 and of
  1048576 tokens (a request's compressed page row has 32 and 4096 entries);
- ``engine``: ``Engine.step()`` on the tiny preset with its step runner replaced by one that returns
  zero logits at once, in decode-only steps of B requests (the whole host side: admission, pages,
  chunks, metadata, sampling, retirement);
- ``trace``: ``bench serve``'s driver (``run_engine``) over #26's saturating trace (256 requests,
  prompts 128..3500 tokens, outputs 64..512, all submitted at once) on the tiny preset at
  flash-slice's page layout (window pages of 32 positions, compressed pages of 256, 2048-token
  chunks, 64 running), model stubbed, with and without the prefix cache: the host's share of a
  saturated run (on the GPU each of its ~1500 steps also waits for the device).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def paging(contexts: list[int], requests: int = 64, steps: int = 50) -> dict:
    from ds4c.models.deepseek_v4.paged import PageLayout
    from ds4c.runtime.pages import Pools, RequestPages
    from ds4c.runtime.step_batch import Chunk, build_step

    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    out = {}
    for ctx in contexts:
        lay = PageLayout(window=128, window_page=32, comp_page=256, max_context=ctx, max_chunk=2048)
        pools = Pools(10 * requests * lay.window_slots, requests * lay.comp_entries + 1, requests + 1)
        reqs = []
        for _ in range(requests):
            pages = RequestPages(lay, pools)
            while pages.end < ctx // 2:
                assert pages.grow(min(pages.end + lay.max_chunk, ctx // 2))
            reqs.append(pages)
        t = time.perf_counter()
        for _ in range(steps):
            chunks = []
            for pages in reqs:
                assert pages.grow(pages.end + 1)
                chunks.append(Chunk(pages, [5], pages.end - 1))
            build_step(chunks, rates)
        out[str(ctx)] = {"requests": requests, "ms_per_step": (time.perf_counter() - t) / steps * 1e3}
        print(f"paging + metadata, {requests} decodes at context {ctx}: {out[str(ctx)]['ms_per_step']:.3f} ms per step")
    return out


def engine(batches: list[int], steps: int = 100) -> dict:
    import ds4c

    art = ds4c.compile("tiny", target="cpu", max_context=1024, progress=False,
                       serving={"max_running": max(batches), "max_chunk": 256})
    eng = ds4c.Engine(art.save(tempfile.mkdtemp() + "/tiny.ds4"))
    zeros = torch.zeros(max(batches), eng.runner.vocab_size)
    eng.runner.run = lambda batch, input_ids=None: zeros[:batch.logit_rows.shape[0]]
    out = {}
    for b in batches:
        reqs = [eng.submit([1 + i, 2, 3, 4], ds4c.SamplingParams(max_new_tokens=steps + 20)) for i in range(b)]
        for _ in range(5):  # admitted, prompts done: decode-only steps from here
            eng.step()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        out[str(b)] = {"ms_per_step": (time.perf_counter() - t) / steps * 1e3}
        print(f"Engine.step, {b} decodes (model stubbed): {out[str(b)]['ms_per_step']:.3f} ms per step")
        for r in reqs:
            eng.cancel(r)
        eng.run_until_idle()
    eng.close()
    return out


def trace(requests: int = 256) -> dict:
    import ds4c
    from ds4c.bench.serve import make_workload, run_engine

    art = ds4c.compile("tiny", target="cpu", max_context=4096, progress=False,
                       serving={"max_running": 64, "max_chunk": 2048, "window_page": 32, "comp_page": 256})
    path = art.save(tempfile.mkdtemp() + "/tiny.ds4")
    out = {}
    for cache in (False, True):
        eng = ds4c.Engine(path, prefix_cache=cache)
        zeros = torch.zeros(4096, eng.runner.vocab_size)
        eng.runner.run = lambda batch, input_ids=None, zeros=zeros: zeros[:batch.logit_rows.shape[0]]
        work = make_workload(requests, "128:3500", "64:512", eng.runner.vocab_size, max_context=4096, rate=1e9)
        t = time.perf_counter()
        run = run_engine(eng, work)
        seconds = time.perf_counter() - t
        key = "prefix_cache" if cache else "no_cache"
        out[key] = {"requests": requests, "steps": run["steps"], "seconds": seconds,
                    "ms_per_step": seconds / run["steps"] * 1e3, "prefix_cache": run["prefix_cache"]}
        print(f"{requests}-request trace, model stubbed, {key}: {seconds:.2f} s host, {run['steps']} steps, "
              f"{out[key]['ms_per_step']:.2f} ms per step {run['prefix_cache'] or ''}")
        eng.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 1 << 20])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--parts", nargs="+", default=["paging", "engine", "trace"])
    ap.add_argument("--out", default="engine_host.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # host bookkeeping: one thread, as the engine's loop runs
    res = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    if "paging" in args.parts:
        res["paging"] = paging(args.contexts)
    if "engine" in args.parts:
        res["engine"] = engine(args.batches)
    if "trace" in args.parts:
        res["trace"] = trace()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
