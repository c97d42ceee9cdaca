"""Where a ds4c decode step / prefill spends its GPU time: torch.profiler, kernels ranked by time
and grouped by what they do.

    PYTHONPATH=. python benchmarks/profile_step.py --preset flash-slice --backends compiled,kernels --out prof.json
    PYTHONPATH=. python benchmarks/profile_step.py --backends compiled --prompt 65536 --synthetic-state  # long context

Profiles without CUDA graphs so every kernel is visible (and reports the CUDA-graph step time of
the same load next to it); also writes a Chrome trace per backend next to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re

import torch
from torch.profiler import ProfilerActivity, profile

# kernel name pattern -> group (first match wins)
GROUPS = [
    ("gemv (linear.packed)", r"_gemv_kernel"),
    ("moe experts", r"_gate_up_kernel|_down_kernel|_gate_up_pairs_kernel|_down_pairs_kernel"),
    ("moe routing", r"_route_kernel"),
    ("attention", r"_attention_kernel"),
    ("compressor", r"_compress_kernel|_pool_kernel"),
    ("indexer scores", r"_index_scores_kernel"),
    ("mhc", r"_mix_kernel|_pre_finish_kernel|_head_finish_kernel|_post_kernel"),
    ("rms_norm / rope", r"_rms_norm_kernel|_rope_kernel"),
    ("cuBLAS / CUTLASS GEMM", r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitK"),
    ("inductor fused", r"^triton_"),
    ("topk / sort", r"topk|sort|radix|Sort|gatherTopK|bitonic"),
    ("copy / memset", r"copy|Memcpy|Memset|memcpy|memset|fill"),
    ("index / scatter / gather", r"index|scatter|gather"),
    ("aten elementwise / reduce", r"elementwise|reduce|Reduce"),
    ("cat", r"[Cc]at"),
]


def group_of(name: str) -> str:
    for g, pat in GROUPS:
        if re.search(pat, name):
            return g
    return "other"


def kernel_rows(prof) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:160], "calls": e.count, "total_us": t})
    rows.sort(key=lambda r: -r["total_us"])
    return rows


def grouped(rows: list[dict], steps: int) -> list[dict]:
    out: dict[str, dict] = {}
    for r in rows:
        g = out.setdefault(group_of(r["name"]), {"group": group_of(r["name"]), "kernels": 0, "us": 0.0})
        g["kernels"] += r["calls"] / steps
        g["us"] += r["total_us"] / steps
    total = {"group": "(all)", "kernels": sum(g["kernels"] for g in out.values()),
             "us": sum(g["us"] for g in out.values())}
    return [total] + sorted(out.values(), key=lambda g: -g["us"])


def main() -> None:
    import ds4c
    from benchmarks.gpu_peers import gpu_timed, synthetic_state, timed

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--backends", default="kernels")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--target", default="h100", help="target record the artifact is compiled for")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--synthetic-state", action="store_true",
                    help="decode from a random full state at position --prompt instead of prefilling the prompt "
                         "(a step's work depends on the static capacity: a ctx-65536 profile without a 64K prefill)")
    ap.add_argument("--out", default="prof.json")
    args = ap.parse_args()
    art = ds4c.compile(args.preset, target=args.target, max_context=args.prompt + 64, progress=False, weights="reference",
                       precision=args.precision)
    art.save("/tmp/prof.ds4")
    dev = torch.device("cuda")
    ids = torch.randint(0, 1000, (args.batch, args.prompt), device=dev)
    res: dict = {"preset": args.preset, "precision": args.precision, "device": torch.cuda.get_device_name(dev)}
    weights = None
    for backend in args.backends.split(","):
        model = ds4c.load("/tmp/prof.ds4", device=dev, backend=backend, cuda_graphs=False, progress=False,
                          weights=weights)
        # packed (FP8/MXFP4) weights are stored under other names than the program's parameters:
        # a later load regenerates those rather than being handed the packed set
        weights = model.weights if args.precision in ("bf16", "fp32") else None
        if args.synthetic_state:
            state, tok = synthetic_state(model, args.batch, dev), ids[:, -1:]
        else:
            logits, state = model.prefill(ids)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            model._decode(tok, args.prompt, dict(state))
        torch.cuda.synchronize()
        steps = 3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model._decode(tok, args.prompt, dict(state))
            torch.cuda.synchronize()
        rows = kernel_rows(prof)
        r = res[backend] = {"decode_groups": grouped(rows, steps), "decode_top": rows[:40]}
        prof.export_chrome_trace(args.out.replace(".json", f"_{backend}_decode_trace.json"))
        if not (args.no_prefill or args.synthetic_state):
            model.prefill(ids)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model.prefill(ids)
                torch.cuda.synchronize()
            rows = kernel_rows(prof)
            r["prefill_groups"] = grouped(rows, 1)
            r["prefill_top"] = rows[:30]
            r["prefill_s"] = timed(lambda m=model: m.prefill(ids), dev, warmup=1, reps=3)
        del model
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        graphed = ds4c.load("/tmp/prof.ds4", device=dev, backend=backend, progress=False, weights=weights)
        _, live = graphed._decode(tok, args.prompt, dict(state))
        # the state the step returned, passed back as generate() does (nothing copied in)
        r["decode_graph_s"] = timed(lambda g=graphed, t=tok, st=live: g._decode(t, args.prompt, st), dev,
                                    warmup=2, reps=20)
        # device time per step (replays queued back to back): what the kernel sum above is compared with
        r["decode_graph_gpu_s"] = gpu_timed(lambda g=graphed, t=tok, st=live: g._decode(t, args.prompt, st), dev)
        del graphed
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"==== {backend}: decode (CUDA graph) {r['decode_graph_s'] * 1e3:.3f} ms "
              f"({r['decode_graph_gpu_s'] * 1e3:.3f} ms device time)"
              + (f", prefill {r['prefill_s'] * 1e3:.1f} ms" if "prefill_s" in r else ""))
        for key in ("decode_groups", "prefill_groups"):
            for g in r.get(key, []):
                print(f"  {key[:7]} {g['us']:>9.1f} us {g['kernels']:>7.1f} kernels  {g['group']}")
        for key, n in (("decode_top", 40), ("prefill_top", 25)):
            print("  --", key)
            for row in r.get(key, [])[:n]:
                print(f"  {row['total_us']:>9.0f} {row['calls']:>5} {row['name'][:110]}")


if __name__ == "__main__":
    main()
