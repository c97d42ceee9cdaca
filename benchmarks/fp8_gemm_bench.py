# ruff: noqa: B023 (every lambda is timed before its loop variables move on)
"""FP8 activation GEMMs on the device, per dense linear shape of a preset: the decode GEMV
(``act="fp8"``: activations quantised in registers, e4m3 x e4m3) against the weight-only FP8 GEMV
and cuBLAS bf16, and the prefill FP8 GEMM (``act_quant`` + e4m3 tiles) over a grid of tiles
against cuBLAS bf16 and the dequantise-then-cuBLAS path the weight-only artifact takes.

    PYTHONPATH=. python benchmarks/fp8_gemm_bench.py --preset flash-slice --rows 1 2048 --out fp8_gemm.json

Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``); TFLOP/s counts 2*M*N*K.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from benchmarks.gemv_tune import linear_shapes

ROW_GRID = {"block_n": (16, 32), "num_warps": (1, 2), "programs_per_sm": (4, 8), "pipeline": (0, 3, 4),
            "row_sums": (0, 1)}
GEMM_GRID = {"block_m": (64, 128), "block_n": (128, 256), "num_warps": (4, 8), "num_stages": (3, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2048])
    ap.add_argument("--target", default="h200")
    ap.add_argument("--gemm-grid", action="store_true", help="sweep the prefill GEMM's tiles too")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="NxK",
                    help="weight shapes to run instead of the preset's dense linears (e.g. the LM head, 129280x4096)")
    ap.add_argument("--out", default="fp8_gemm.json")
    args = ap.parse_args()

    import triton
    from triton.testing import do_bench_cudagraph

    from ds4c.backends.triton.kernels.act_quant import act_quant
    from ds4c.backends.triton.kernels.configs import KernelContext
    from ds4c.backends.triton.kernels.linear import fp8_gemm, gemv
    from ds4c.ir.registry import get_op
    from ds4c.quant.formats import get_format
    from ds4c.targets import get_target

    dev = torch.device("cuda")
    res = {"preset": args.preset, "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(dev),
           "torch": torch.__version__, "triton": triton.__version__, "shapes": []}
    fmt = get_format("fp8")
    ref = get_op("linear.packed").reference

    def bench(fn) -> float:
        return do_bench_cudagraph(fn, rep=50) * 1e-3

    from ds4c.quant.activations import fp8_roundtrip

    ctx = KernelContext(get_target(args.target))
    xs = torch.randn(4096, 4096, device=dev) * torch.logspace(-6, 3, 4096, device=dev)
    res["act_quant_bit_exact"] = bool(torch.equal(act_quant(ctx, xs, dequant=True)[0], fp8_roundtrip(xs)))
    print("act_quant bit-exact on the device:", res["act_quant_bit_exact"], flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else linear_shapes(args.preset)
    for (n, k), m in itertools.product(shapes, args.rows):
        g = torch.Generator(device=dev).manual_seed(n + k)
        w = torch.randn(n, k, device=dev, generator=g) / 32
        packed = {name: t.to(dev) for name, t in fmt.pack(w.cpu()).items()}
        q, s = packed["qdata"], packed["scale"]
        wb = w.bfloat16()
        x = torch.randn(m, k, device=dev, generator=g).bfloat16()
        row: dict = {"m": m, "n": n, "k": k, "flop": 2 * m * n * k}
        row["cublas_bf16_s"] = bench(lambda: x @ wb.T)
        want = ref(x, q, s, format="fp8", shape=[n, k], act="fp8").float()
        if m <= 64:
            row["gemv_weight_only_s"] = bench(lambda: gemv(ctx, x, q, s, "fp8"))
            row["gemv_act_fp8_s"] = bench(lambda: gemv(ctx, x, q, s, "fp8", "fp8"))
            got = gemv(ctx, x, q, s, "fp8", "fp8").float()
            if m == 1:  # the tensor-core tile kernel for comparison, and the row kernel's tiles
                row["tile_gemv_weight_only_s"] = bench(lambda: gemv(ctx, x, q, s, "fp8", one_row=False))
                row["tile_gemv_act_fp8_s"] = bench(lambda: gemv(ctx, x, q, s, "fp8", "fp8", one_row=False))
                best = None
                for cfg in itertools.product(*ROW_GRID.values()):
                    over = dict(zip(ROW_GRID, cfg, strict=True))
                    t = bench(lambda over=over: gemv(ctx, x, q, s, "fp8", "fp8", **over))
                    row.setdefault("row_grid", []).append([over, t])
                    if best is None or t < best[1]:
                        best = (over, t)
                row["row_gemv_best_act"] = best
            row["weight_gb_per_s"] = (q.numel() + s.numel() * s.element_size()) / row["gemv_weight_only_s"] / 1e9
        else:
            row["dequant_cublas_s"] = bench(lambda: ref(x, q, s, format="fp8", shape=[n, k]))
            row["act_quant_s"] = bench(lambda: act_quant(ctx, x))
            best = None
            for cfg in itertools.product(*GEMM_GRID.values()) if args.gemm_grid else ():
                over = dict(zip(GEMM_GRID, cfg, strict=True))
                try:
                    t = bench(lambda over=over: fp8_gemm(ctx, x, q, s, "fp8", **over))
                except Exception as e:  # out of shared memory and the like
                    row.setdefault("failed", []).append([over, type(e).__name__])
                    continue
                row.setdefault("grid", []).append([over, t])
                if best is None or t < best[1]:
                    best = (over, t)
            row["fp8_gemm_default_s"] = bench(lambda: fp8_gemm(ctx, x, q, s, "fp8"))
            row["fp8_gemm_best"] = best
            got = fp8_gemm(ctx, x, q, s, "fp8").float()
        row["max_rel_err_vs_reference"] = float((got - want).abs().max() / want.abs().max())
        res["shapes"].append(row)
        print({k: v for k, v in row.items() if k not in ("grid", "row_grid")}, flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
