"""Where ``ds4c.load`` spends its time: one preset compiled with weights by reference, loaded with
the given weights (no checkpoint read), under cProfile; the top functions by cumulative and own
time, and the phases (read + parse, weight transforms, executors, stored binaries), as JSON.

    PYTHONPATH=. python benchmarks/load_profile.py --preset flash-slice --target h100 --out load.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="load_profile.json")
    args = ap.parse_args()

    import torch

    import ds4c
    from benchmarks.gpu_peers import build_hf
    from ds4c.models.deepseek_v4.presets import PRESETS

    dev = torch.device("cuda")
    params = dict(build_hf(dict(PRESETS[args.preset]), dev, torch.bfloat16, 0).state_dict())
    art = ds4c.compile(args.preset, target=args.target, max_context=2112, progress=False, weights="reference",
                       seed=0, precision=args.precision)
    path = f"/tmp/load_profile_{args.precision}.ds4"
    art.save(path)
    del art
    times = []
    prof = cProfile.Profile()
    for r in range(args.rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if r == args.rounds - 1:
            prof.enable()
        model = ds4c.load(path, device=dev, weights=params, progress=False)
        torch.cuda.synchronize()
        prof.disable()
        times.append(time.perf_counter() - t0)
        del model
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{file.split('site-packages/')[-1]}:{line}({fn})", "calls": calls,
                     "own_s": round(own, 5), "cum_s": round(cum, 5)})
    out = {"preset": args.preset, "target": args.target, "precision": args.precision, "load_s": times,
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "by_cumulative": sorted(rows, key=lambda r: -r["cum_s"])[:40],
           "by_own": sorted(rows, key=lambda r: -r["own_s"])[:25]}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"load_s": times}))


if __name__ == "__main__":
    main()
