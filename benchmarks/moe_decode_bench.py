# ruff: noqa: B023 (every lambda is timed before its loop variables move on)
"""The decode MoE (one token: router, routing, gate_up, down, combine kernels) on the device, bf16
expert weights against FP8 ones, and the FP8 path's tiles: the tensor-core 16-row tile
(``fp8_rows=0``) and the CUDA-core row kernel over a grid of column blocks and warps.

    PYTHONPATH=. python benchmarks/moe_decode_bench.py --preset flash-slice --out moe_decode.json

Widths (hidden, intermediate, top-k) are the preset's; ``--experts`` stacked experts (fewer than
the preset's 256 keeps the packing quick: a token reads top-k of them either way, each bigger
than the L2 share it could hit). Times are CUDA-graph replays (``do_bench_cudagraph``); GB/s
counts the expert bytes one token reads (top-k routed + the shared expert).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

ROW_GRID = {"row_block_n_up": (8, 16), "row_block_n_down": (16, 32), "row_warps": (1, 2, 4), "row_pipeline": (0, 3),
            "row_sums": (0, 1), "row_paired": (0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--target", default="h200")
    ap.add_argument("--out", default="moe_decode.json")
    args = ap.parse_args()

    import triton
    from triton.testing import do_bench_cudagraph

    from ds4c.backends.triton.kernels.configs import KernelContext
    from ds4c.backends.triton.kernels.moe import moe, moe_packed
    from ds4c.ir.registry import get_op
    from ds4c.models.deepseek_v4.presets import PRESETS
    from ds4c.quant.formats import get_format
    from ds4c.targets import get_target

    cfg = PRESETS[args.preset]
    d, inter, top_k, e = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"], args.experts
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, scale):
        return (torch.randn(*shape, device=dev, generator=g) * scale).bfloat16()

    x = r(1, 1, d, scale=1.0)
    ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
    router, selector = r(e, d, scale=d ** -0.5), r(e, scale=0.1)
    weights = [r(e, 2 * inter, d, scale=d ** -0.5), r(e, d, inter, scale=inter ** -0.5),
               r(inter, d, scale=d ** -0.5), r(inter, d, scale=d ** -0.5), r(d, inter, scale=inter ** -0.5)]
    kw = dict(top_k=top_k, route_scale=float(cfg.get("routed_scaling_factor", 1.0)),
              swiglu_limit=float(cfg.get("swiglu_limit", 10.0)), routing="bias", score="sqrtsoftplus")
    fmt = get_format("fp8")
    packed = []
    for w in weights:
        p = fmt.pack(w.float())
        packed += [p["qdata"], p["scale"]]
    fp8_kw = dict(formats=["fp8"] * 5, shapes=[list(w.shape) for w in weights], **kw)
    read = (top_k + 1) * 3 * inter * d  # values one token reads
    res = {"preset": args.preset, "experts": e, "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "bf16_read_bytes": 2 * read, "fp8_read_bytes": read, "grid": []}

    def bench(fn) -> float:
        return do_bench_cudagraph(fn, rep=50) * 1e-3

    target = get_target(args.target)
    ctx = KernelContext(target)  # the target's configurations, PDL where it has it
    res["bf16_s"] = bench(lambda: moe(ctx, x, ids, router, selector, *weights, **kw))
    want = get_op("moe.packed").reference(x, ids, router, selector, *packed, **fp8_kw).float()
    tile = KernelContext(target, tuning={"moe_decode": {"fp8_rows": 0}})
    res["fp8_tile_s"] = bench(lambda: moe_packed(tile, x, ids, router, selector, *packed, **fp8_kw))
    print({k: v for k, v in res.items() if k != "grid"}, flush=True)
    best = None
    for values in itertools.product(*ROW_GRID.values()):
        over = dict(zip(ROW_GRID, values, strict=True))
        rows = KernelContext(target, tuning={"moe_decode": {"fp8_rows": 1, **over}})
        t = bench(lambda rows=rows: moe_packed(rows, x, ids, router, selector, *packed, **fp8_kw))
        got = moe_packed(rows, x, ids, router, selector, *packed, **fp8_kw).float()
        err = float((got - want).abs().max() / want.abs().max())
        res["grid"].append([over, t, err])
        if best is None or t < best[1]:
            best = (over, t)
        print(over, f"{t * 1e6:.1f} us", f"rel err {err:.1e}", flush=True)
        with open(args.out, "w") as f:  # so far (a run stopped by a time limit keeps its grid)
            json.dump(res, f, indent=1)
    res["fp8_rows_default_s"] = bench(lambda: moe_packed(ctx, x, ids, router, selector, *packed, **fp8_kw))
    res["fp8_rows_best"] = best
    for key in ("bf16_s", "fp8_tile_s", "fp8_rows_default_s"):
        byts = res["bf16_read_bytes"] if key == "bf16_s" else res["fp8_read_bytes"]
        res[key.replace("_s", "_gb_per_s")] = byts / res[key] / 1e9
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "grid"}, indent=1))


if __name__ == "__main__":
    main()
