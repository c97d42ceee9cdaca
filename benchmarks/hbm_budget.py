"""``--hbm-budget`` below the weight size on a GPU: same tokens, speed against the host-link bound.

    PYTHONPATH=. python benchmarks/hbm_budget.py --preset flash-slice --fraction 0.7 --out budget.json

Compiles the preset twice for the target (no budget; a budget of ``fraction`` x the device bytes
the unbudgeted plan needs), loads both with the same seeded weights (as gpu_peers.py), and
compares greedy tokens after a prompt. The budgeted artifact keeps the planned weights in pinned
host memory and copies them in with ``ds4c.prefetch`` on the copy stream each step; its decode
step is reported against the host-link bound (host bytes / the target's host-link bandwidth).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.gpu_peers import build_hf, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default="budget.json")
    args = ap.parse_args()

    import ds4c
    from ds4c.models.deepseek_v4.presets import PRESETS
    from ds4c.targets import get_target

    dev = torch.device("cuda")
    tgt = get_target(args.target)
    cfg = dict(PRESETS[args.preset])
    res = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "target": tgt.name, "fraction": args.fraction,
           "command": f"python benchmarks/hbm_budget.py --preset {args.preset} --fraction {args.fraction}"}
    params = dict(build_hf(cfg, dev, torch.bfloat16, 0).state_dict())
    ctx = args.prompt + args.new_tokens + 64
    full = ds4c.compile(args.preset, target=args.target, precision="bf16", weights="reference", max_context=ctx,
                        progress=False)
    need = full.manifest["memory_plan"]["decode"]["device_bytes"]
    budget = int(need * args.fraction)
    art = ds4c.compile(args.preset, target=args.target, precision="bf16", weights="reference", max_context=ctx,
                       progress=False, hbm_budget=budget)
    wplan = art.manifest["memory_plan"]["decode"]["weights"]
    res.update(device_bytes_unbudgeted=need, budget=budget, host_bytes=wplan["host_bytes"], hbm_bytes=wplan["hbm_bytes"],
               host_weights=len(wplan.get("host", [])))
    full.save("/tmp/budget_full.ds4")
    art.save("/tmp/budget_part.ds4")
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    out = {}
    for name, path in (("full", "/tmp/budget_full.ds4"), ("budget", "/tmp/budget_part.ds4")):
        m = ds4c.load(path, device=dev, weights=params, progress=False, backend="kernels")
        out[name] = m.generate(prompt, args.new_tokens)
        logits, state = m.prefill(prompt)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        m._decode(tok, args.prompt, state)
        res[f"{name}_decode_s"] = timed(lambda m=m, tok=tok, state=state: m._decode(tok, args.prompt, state), dev,
                                        warmup=1, reps=5)
        res[f"{name}_host_weights_pinned"] = len(getattr(m, "host_weights", []))
        del m, state, logits
        torch.cuda.empty_cache()
    res["tokens_equal"] = bool(torch.equal(out["full"], out["budget"]))
    res["host_link_bytes_per_s"] = tgt.host_link_bandwidth
    res["host_link_bound_s"] = res["host_bytes"] / tgt.host_link_bandwidth
    res["fraction_of_host_link_bound"] = res["host_link_bound_s"] / res["budget_decode_s"]
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
