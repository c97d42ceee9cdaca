"""Where the engine's step with a prompt chunk spends its GPU time, against the dense prefill of the
same prompt: torch.profiler kernels grouped as in ``profile_step.py``, side by side.

    PYTHONPATH=. python benchmarks/profile_serving_step.py --target h100 --prompt 512 --out prof_serving.json

#26's concurrency-1 runs found the engine's first token 1.8x the dense prefill's (H100, flash-slice,
bf16, 512-token prompts: its step with the prompt 22-24 ms, ``generate``'s prefill 12.5 ms), in
the 768-row bucket and in the 576-row one alike, so not the padding. This profiles both without
CUDA graphs (every kernel visible): one ``ragged_step`` holding the prompt (padded to its token
bucket as the engine runs it) and ``prefill_last`` of the same ids; then the graphed step's wall
time on an engine with graphs, the figure ``bench serve`` reports.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import grouped, kernel_rows


def main() -> None:
    import ds4c
    from ds4c.cli import _parse_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--state-budget", default="24GB")
    ap.add_argument("--artifact", default="/tmp/prof_serving.ds4")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script (tiny)")
    ap.add_argument("--out", default="prof_serving.json")
    args = ap.parse_args()

    art = ds4c.compile(args.preset, target=args.target, precision=args.precision, max_context=min(8192, 4 * args.prompt + 256),
                       weights="reference", serving=True, progress=False)
    art.save(args.artifact)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    budget = _parse_bytes(args.state_budget)
    res: dict = {"preset": args.preset, "precision": args.precision, "prompt": args.prompt,
                 "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def show(name: str, rows: list[dict]) -> None:
        res[name] = {"groups": grouped(rows, 1), "top": rows[:30]}
        save()
        print(f"==== {name}")
        for g in res[name]["groups"]:
            print(f"  {g['us']:>9.1f} us {g['kernels']:>7.1f} kernels  {g['group']}")
        for row in rows[:25]:
            print(f"  {row['total_us']:>9.0f} {row['calls']:>5} {row['name'][:110]}")

    # op by op: the engine's step with the prompt (its token bucket), then the dense prefill
    model = ds4c.load(args.artifact, device=dev, cuda_graphs=False, progress=False)
    ids = torch.randint(0, min(1000, model.vocab_size), (args.prompt,)).tolist()
    for _ in range(2):  # the second is profiled (the first compiles and autotunes)
        engine = ds4c.Engine(model, state_budget=budget, prefix_cache=False)
        engine.submit(ids, ds4c.SamplingParams(max_new_tokens=2))
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            engine.step()
            sync()
            wall = time.perf_counter() - t0
        engine.close()
    res["step_op_by_op_s"] = wall
    show("ragged_step", kernel_rows(prof))
    prof.export_chrome_trace(args.out.replace(".json", "_ragged_step_trace.json"))
    for _ in range(2):
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            model.prefill([ids], logits="last")
            sync()
            wall = time.perf_counter() - t0
    res["prefill_op_by_op_s"] = wall
    show("prefill_last", kernel_rows(prof))
    weights = model.weights
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # graphed: the step as bench serve times it
    model = ds4c.load(args.artifact, device=dev, progress=False, weights=weights)
    engine = ds4c.Engine(model, state_budget=budget, prefix_cache=False)
    walls = []
    for _ in range(5):
        engine.submit(ids, ds4c.SamplingParams(max_new_tokens=1))
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        walls.append(time.perf_counter() - t0)
        engine.run_until_idle()
    res["step_graphed_s"] = sorted(walls)[len(walls) // 2]
    res["step_graphs"] = engine.stats()["step_graphs"]
    save()
    print(f"step with the prompt: graphed {res['step_graphed_s'] * 1e3:.1f} ms, op by op "
          f"{res['step_op_by_op_s'] * 1e3:.1f} ms; dense prefill op by op {res['prefill_op_by_op_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
