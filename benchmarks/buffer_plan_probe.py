"""What the kernels backend's buffer plan changes in one captured decode step: the bytes the capture
keeps (each live allocation made during capture, with the Python lines that made it) and the
kernels the graph replays (device time per kernel name, with and without the plan).

    PYTHONPATH=. python benchmarks/buffer_plan_probe.py --preset flash-slice --out probe.json

Loads the same artifact (bf16 by default) with ``buffer_plan`` True and False (kernels backend,
stream schedule on unless ``--one-stream``), prefills ``--prompt`` tokens, then captures the
decode step under ``torch.cuda.memory._record_memory_history`` and profiles ``--replays`` replays.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_peers import build_hf
from benchmarks.profile_step import kernel_rows


def _live_allocations(snapshot: dict[str, Any], since: int) -> list[dict[str, Any]]:
    """Allocations from trace entry ``since`` on that were not freed by the end, largest first."""
    trace = snapshot["device_traces"][0][since:]
    live: dict[int, dict[str, Any]] = {}
    for e in trace:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    rows = []
    for e in sorted(live.values(), key=lambda e: -e["size"]):
        frames = [f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in e.get("frames", [])
                  if "/ds4c/" in f["filename"] or "benchmarks" in f["filename"]]
        rows.append({"bytes": e["size"], "frames": frames[:6]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h200")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--one-stream", action="store_true")
    ap.add_argument("--out", default="probe.json")
    args = ap.parse_args()

    import ds4c
    from ds4c.models.deepseek_v4.presets import PRESETS

    dev = torch.device("cuda")
    cfg = dict(PRESETS[args.preset])
    hf = build_hf(cfg, dev, torch.bfloat16, 0)
    params = dict(hf.state_dict())
    path = f"/tmp/ds4c_probe_{args.preset}_{args.precision}.ds4"
    if not os.path.exists(path):
        ds4c.compile(args.preset, target=args.target, max_context=args.prompt + 64, progress=False,
                     weights="reference", seed=0, precision=args.precision).save(path)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                           "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    kernels: dict[str, dict[str, float]] = {}
    for plan in ("1", "0"):
        model = ds4c.load(path, device=dev, weights=params, progress=False, backend="kernels",
                          streams=not args.one_stream, buffer_plan=plan == "1")
        logits, state = model.prefill(prompt)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        del logits
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated(dev)
        torch.cuda.memory._record_memory_history(max_entries=200000)
        start = len(torch.cuda.memory._snapshot()["device_traces"][0])
        _, st = model._decode(tok, args.prompt, state)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        live = _live_allocations(snap, start)
        row: dict[str, Any] = {"capture_allocated_bytes": torch.cuda.memory_allocated(dev) - held,
                               "live_allocations": len(live), "live_bytes": sum(r["bytes"] for r in live),
                               "largest": live[:12]}
        graphed = model._graphed[1]
        for _ in range(3):
            graphed.graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.replays):
                graphed.graph.replay()
            torch.cuda.synchronize()
        rows = kernel_rows(prof)
        kernels[plan] = {r["name"]: r["total_us"] / args.replays for r in rows}
        row["kernel_us_per_step"] = sum(kernels[plan].values())
        row["kernel_count"] = sum(r["calls"] for r in rows) / args.replays
        res[f"plan={plan}"] = row
        print(plan, json.dumps({k: v for k, v in row.items() if k != "largest"}), flush=True)
        for r in live[:8]:
            print("   ", r["bytes"], " <- ".join(r["frames"][:4]), flush=True)
        del model, state, st, graphed
        torch.cuda.empty_cache()
    names = set(kernels["1"]) | set(kernels["0"])
    diff = sorted(((kernels["1"].get(n, 0.0) - kernels["0"].get(n, 0.0), n) for n in names), key=lambda d: -abs(d[0]))
    res["kernel_us_with_minus_without"] = [{"name": n, "us": d, "with": kernels["1"].get(n, 0.0),
                                            "without": kernels["0"].get(n, 0.0)} for d, n in diff[:25]]
    for d, n in diff[:12]:
        print(f"{d:+8.2f} us  {kernels['1'].get(n, 0.0):8.2f} vs {kernels['0'].get(n, 0.0):8.2f}  {n[:110]}")
    with open(args.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
