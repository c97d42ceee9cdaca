"""The prefill MoE (grouped GEMMs, every expert read about once) on the device: tile sweep against
the weight-read floor.

    PYTHONPATH=. python benchmarks/moe_prefill_bench.py --target h100 --out moe_prefill.json

V4-Flash widths (256 experts, hidden 4096, intermediate 2048, top-6, bf16: 12.9 GB of expert
weights per layer), a prompt of ``--tokens`` tokens routed by a random router (learned-routing
scores with a bias, as V4's non-hash layers). Each configuration of the ``moe_prefill`` tuning
family (``configs.moe_config``) times the whole ``moe`` op (routing, sort, gate_up, down, the
pick sum, the shared expert) with ``triton.testing.do_bench``; the floor is the routed experts'
weight bytes over the target's HBM bandwidth. Outputs are compared with the default tiles'.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

CONFIGS = [  # (block_m, block_n_up, block_n_down, block_k, num_warps, num_stages); the first is the default
    (64, 128, 256, 64, 8, 3),
    (64, 128, 256, 64, 8, 4),
    (64, 128, 256, 128, 8, 3),
    (64, 128, 128, 64, 8, 4),
    (64, 64, 128, 64, 4, 4),
    (64, 64, 128, 128, 4, 3),
    (128, 128, 256, 64, 8, 3),
    (128, 128, 128, 64, 8, 4),
    (128, 64, 128, 64, 8, 4),
    (64, 256, 256, 64, 8, 3),
    (32, 128, 256, 64, 4, 4),
    (64, 128, 256, 32, 8, 5),
]
FIELDS = ("block_m", "block_n_up", "block_n_down", "block_k", "num_warps", "num_stages")


def main() -> None:
    import triton
    from triton.testing import do_bench

    from ds4c.backends.triton.kernels.configs import KernelContext
    from ds4c.backends.triton.kernels.moe import moe
    from ds4c.targets import get_target

    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="h200")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--out", default="moe_prefill.json")
    args = ap.parse_args()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    e, d, inter, top_k = args.experts, 4096, 2048, 6
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    x = r(1, args.tokens, d)
    ids = torch.zeros((1, args.tokens), dtype=torch.long, device=dev)
    router, selector = r(e, d, scale=d ** -0.5), r(e, scale=0.1)
    gate_up, down = r(e, 2 * inter, d, scale=d ** -0.5), r(e, d, inter, scale=inter ** -0.5)
    s_gate, s_up, s_down = r(inter, d, scale=d ** -0.5), r(inter, d, scale=d ** -0.5), r(d, inter, scale=inter ** -0.5)
    kw = dict(top_k=top_k, route_scale=2.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus")
    target = get_target(args.target)
    floor_s = (gate_up.numel() + down.numel()) * 2 / target.hbm_bandwidth
    res = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "tokens": args.tokens, "experts": e, "floor_ms": floor_s * 1e3,
           "configs": []}
    want = None
    for values in CONFIGS:
        tuned = dict(zip(FIELDS, values, strict=True))
        ctx = KernelContext(target, tuning={"moe_prefill": tuned})
        row = {**tuned}
        try:
            out = moe(ctx, x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, **kw)
            torch.cuda.synchronize()
            if want is None:
                want = out.float()
            row["max_abs_diff_vs_default"] = float((out.float() - want).abs().max())
            row["ms"] = do_bench(lambda c=ctx: moe(c, x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, **kw),
                                 warmup=5, rep=100)
            row["of_floor"] = floor_s * 1e3 / row["ms"]
        except Exception as err:  # a tile that does not fit (shared memory, registers): recorded, the sweep goes on
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        res["configs"].append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    timed = [c for c in res["configs"] if "ms" in c]
    if not timed or "ms" not in res["configs"][0]:
        raise SystemExit("the default tiles did not run: nothing to compare with (see the errors above)")
    best = min(timed, key=lambda c: c["ms"])
    print(f"floor {floor_s * 1e3:.3f} ms; default {res['configs'][0].get('ms', float('nan')):.3f} ms; "
          f"best {best['ms']:.3f} ms ({best['of_floor']:.2f} of the floor): {json.dumps({k: best[k] for k in FIELDS})}")


if __name__ == "__main__":
    main()
