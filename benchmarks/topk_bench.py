"""The indexer's top-k on the GPU: bitonic top-k vs threshold select vs chunked select vs torch.topk, per row shape.

    PYTHONPATH=. python benchmarks/topk_bench.py --out topk.json

Rows of C fp32 scores (C = compressed entries at a context: ctx/4 + the compressor's pending
entries), k = 512 (V4's index_topk). Each kernel is captured 20 times in a CUDA graph and the
replay timed (median of 10), so the figure is one launch inside a graph, as in a decode step.
Every form is checked to pick the same set as torch.topk (ties aside: the scores are distinct).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch


def graph_time(fn, reps: int = 20, trials: int = 10) -> float:
    """Seconds per call of ``fn`` replayed from a CUDA graph of ``reps`` calls (median of ``trials``)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    import triton

    from ds4c.backends.triton.kernels.compress import top_indices
    from ds4c.backends.triton.kernels.configs import TOPK_MAX_ENTRIES, KernelContext, topk_config
    from ds4c.targets import get_target

    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="h200")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--shapes", nargs="*", default=["1x528", "1x2064", "1x8208", "1x16400", "1x65552", "32x528",
                                                    "32x8208", "32x16400", "2048x528"])
    ap.add_argument("--out", default="topk.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "k": args.k, "rows": []}
    ctx = KernelContext(get_target(args.target))
    for shape in args.shapes:
        rows, c = (int(v) for v in shape.split("x"))
        k = min(args.k, c)
        scores = torch.randn(rows, c, device=dev)
        ref = scores.topk(k, dim=-1).values.sort(-1).values
        row = {"rows": rows, "entries": c, "k": k, "default_select": topk_config(c, ctx).select}
        row["torch_topk_us"] = graph_time(lambda s=scores, k=k: s.topk(k, dim=-1)) * 1e6
        n = triton.next_power_of_2(max(c, 16))
        forms = (("bitonic", {"select": 0}), ("select", {"select": 1})) if n <= TOPK_MAX_ENTRIES else ()
        for name, table in (*forms, ("chunked", {"select": 2})):
            for warps in (4, 8, 16, 32):
                tuned = KernelContext(ctx.target, tuning={"topk": {**table, "num_warps": warps}})
                idx = top_indices(tuned, scores, k)
                same = torch.equal(scores.gather(-1, idx).sort(-1).values, ref)
                t = graph_time(lambda s=scores, k=k, tuned=tuned: top_indices(tuned, s, k))
                row[f"{name}_w{warps}_us"] = t * 1e6
                row[f"{name}_w{warps}_same"] = same
        row["default_us"] = graph_time(lambda s=scores, k=k: top_indices(ctx, s, k)) * 1e6
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

if __name__ == "__main__":
    main()
