"""The serving engine on a GPU: same tokens as on the CPU, pools flat, steps timed.

    PYTHONPATH=. python benchmarks/serving_smoke.py --target h100 --out serving.json

Compiles tiny with ``--serving`` for ``--target`` (fp32 and bf16), runs a ragged batch (prompts of
3..300 tokens) on the Engine on CUDA (the kernels backend: the artifact's serving graphs, pools
written in place) and on the CPU (reference backend), and reports: greedy tokens equal (fp32:
must be; bf16: the share of equal tokens), CUDA memory before/after 200 more requests, and the
step times of mixed (prefill) and decode-only steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch


def _workload(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 300))] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="h100")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", default="serving_smoke.json")
    args = ap.parse_args()
    import ds4c

    res: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "runs": {}}
    prompts = _workload(16, 512, seed=0)
    params = ds4c.SamplingParams(max_new_tokens=24)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            t0 = time.perf_counter()
            art = ds4c.compile("tiny", target=args.target, precision=precision, max_context=512, progress=False,
                               serving={"max_running": 8, "max_chunk": 128, "max_step_tokens": 256})
            path = Path(tmp) / f"tiny-{precision}.ds4"
            art.save(path)
            run: dict = {"compile_s": time.perf_counter() - t0, "pages": art.manifest["serving"]["pages"]}
            cpu = ds4c.Engine(path, device="cpu").generate(prompts, params)
            engine = ds4c.Engine(ds4c.load(path, device="cuda", trust_binaries=True))
            times: dict[str, list[float]] = {"mixed": [], "decode": []}
            reqs = [engine.submit(p, params) for p in prompts]
            while not engine.idle:
                prefilling = bool(engine._waiting) or any(len(r.tokens) - r._computed > 1 for r in engine._running)
                torch.cuda.synchronize()
                t = time.perf_counter()
                engine.step()
                torch.cuda.synchronize()
                times["mixed" if prefilling else "decode"].append(time.perf_counter() - t)
            gpu = [r.output_ids for r in reqs]
            same = sum(a == b for x, y in zip(cpu, gpu, strict=True) for a, b in zip(x, y, strict=True))
            run["tokens_equal"] = cpu == gpu
            run["equal_token_share"] = same / sum(len(x) for x in cpu)
            run["step_ms"] = {k: {"n": len(v), "median": 1e3 * sorted(v)[len(v) // 2] if v else None}
                              for k, v in times.items()}
            before = torch.cuda.memory_allocated()
            for i in range(200):
                engine.submit(prompts[i % len(prompts)][:17], ds4c.SamplingParams(max_new_tokens=2))
            engine.run_until_idle()
            run["cuda_bytes_before_after_200"] = [before, torch.cuda.memory_allocated()]
            run["pools_after"] = engine.stats()["pages"]
            res["runs"][precision] = run
            print(precision, json.dumps(run), flush=True)
            # the pools take the plan's share of HBM: give them back before the next precision's engine
            del engine, reqs
            gc.collect()
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
