"""The whole DeepSeek-V4-Flash on one GPU (#30): release formats, weights beyond the budget in host memory.

    PYTHONPATH=. python benchmarks/flash_one_gpu.py --target h200 --budget 120GB --out flash_one_gpu.json

Compiles ``flash`` (43 layers, MXFP4 routed experts, FP8 elsewhere: ``mxfp4-experts``) with
``--hbm-budget``, loads it (weights drawn from the preset seed one tensor at a time on the GPU,
packed, and placed on the device or in pinned host memory as the memory plan says), generates 16
tokens after a 32-token prompt, and reports load time, TTFT and the decode step time against the
host-link bound (the bytes the plan streams in per step over the target's host link) and the HBM
bound (the bytes it reads from device memory).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="h200")
    ap.add_argument("--budget", default="120GB")
    ap.add_argument("--precision", default="mxfp4-experts")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--artifact", default="/tmp/flash_one_gpu.ds4")
    ap.add_argument("--out", default="flash_one_gpu.json")
    args = ap.parse_args()

    import ds4c
    from benchmarks.multi_gpu import greedy_steps
    from ds4c.cli import _parse_bytes
    from ds4c.targets import get_target

    tgt = get_target(args.target)
    budget = _parse_bytes(args.budget)
    res: dict = {"preset": "flash", "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                 "torch": torch.__version__, "target": tgt.name, "precision": args.precision, "budget": budget,
                 "command": f"python benchmarks/flash_one_gpu.py --target {args.target} --budget {args.budget}"}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)

    t0 = time.perf_counter()
    art = ds4c.compile("flash", target=args.target, precision=args.precision, weights="reference",
                       max_context=args.prompt + args.new_tokens + 64, hbm_budget=budget, progress=False)
    art.save(args.artifact)
    plan = art.manifest["memory_plan"]["decode"]
    w = plan["weights"]
    res.update(compile_s=time.perf_counter() - t0, device_bytes=plan["device_bytes"], fits=plan["fits"],
               hbm_weight_bytes=w["hbm_bytes"], host_weight_bytes=w["host_bytes"], host_weights=len(w.get("host", [])),
               weight_bytes=art.manifest["weights"]["bytes"])
    print(json.dumps({k: res[k] for k in ("compile_s", "device_bytes", "hbm_weight_bytes", "host_weight_bytes")}),
          flush=True)
    save()
    del art
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = ds4c.load(args.artifact, device="cuda", progress=False)
    torch.cuda.synchronize()
    res.update(load_s=time.perf_counter() - t0, peak_gpu_bytes_load=torch.cuda.max_memory_allocated(),
               host_resident=len(model.host_weights))
    print(json.dumps({k: res[k] for k in ("load_s", "peak_gpu_bytes_load", "host_resident")}), flush=True)
    save()
    prompt = torch.randint(0, model.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to("cuda")
    ttft, steps, rows, _ = greedy_steps(model, prompt, args.new_tokens)
    res["ttft_s"], tokens = ttft, rows[0]
    steady = sorted(steps[2:]) if len(steps) > 4 else sorted(steps)
    step = steady[len(steady) // 2]
    res.update(tokens=tokens, decode_steps_s=steps, decode_step_s=step,
               host_link_bound_s=w["host_bytes"] / tgt.host_link_bandwidth,
               hbm_bound_s=w["hbm_bytes"] / tgt.hbm_bandwidth, peak_gpu_bytes=torch.cuda.max_memory_allocated())
    res["step_vs_host_link_bound"] = step / res["host_link_bound_s"] if res["host_link_bound_s"] else None
    print(json.dumps({k: res[k] for k in ("ttft_s", "decode_step_s", "host_link_bound_s", "hbm_bound_s", "tokens")}),
          flush=True)
    save()


if __name__ == "__main__":
    main()
