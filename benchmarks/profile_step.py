"""Where a ds4c decode step / prefill spends its GPU time: torch.profiler, kernels ranked by time.

    PYTHONPATH=. python benchmarks/profile_step.py --preset flash-slice --backend kernels --out prof.json

Runs without CUDA graphs so every kernel is visible; also writes a Chrome trace next to ``--out``.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile


def top_kernels(prof, n: int = 60) -> list[dict]:
    rows, kernel_rows = [], []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t <= 0 or e.key.startswith(("ProfilerStep", "cuda")):
            continue
        row = {"name": e.key[:120], "calls": e.count, "total_us": t, "self_cpu_us": e.self_cpu_time_total}
        rows.append(row)
        if str(getattr(e, "device_type", "")).split(".")[-1] == "CUDA":
            kernel_rows.append(row)  # CPU ops' device time repeats their kernels' time
    rows = kernel_rows or rows
    rows.sort(key=lambda r: -r["total_us"])
    total = {"name": "(all kernels)", "calls": sum(r["calls"] for r in rows), "total_us": sum(r["total_us"] for r in rows),
             "self_cpu_us": 0}
    return [total] + rows[:n]


def main() -> None:
    import ds4c

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--backend", default="kernels")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default="prof.json")
    args = ap.parse_args()
    art = ds4c.compile(args.preset, target="h100", max_context=args.prompt + 64, progress=False, weights="reference",
                       precision=args.precision)
    art.save("/tmp/prof.ds4")
    model = ds4c.load("/tmp/prof.ds4", device="cuda", backend=args.backend, cuda_graphs=False, progress=False)
    ids = torch.randint(0, 1000, (1, args.prompt), device="cuda")
    logits, state = model.prefill(ids)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):
        model._decode(tok, args.prompt, dict(state))
    torch.cuda.synchronize()
    res = {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model._decode(tok, args.prompt, dict(state))
        torch.cuda.synchronize()
    res["decode_x3"] = top_kernels(prof)
    prof.export_chrome_trace(args.out.replace(".json", "_decode_trace.json"))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.prefill(ids)
        torch.cuda.synchronize()
    res["prefill"] = top_kernels(prof)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    for k, rows in res.items():
        print("==", k)
        for r in rows[:45]:
            print(f"{r['total_us']:>10.0f} {r['calls']:>5} {r['name']}")


if __name__ == "__main__":
    main()
