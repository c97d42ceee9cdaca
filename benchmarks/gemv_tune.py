"""Decode GEMV tiles on the device: ``linear.packed`` (bf16 / fp8 / int8 weights) against cuBLAS,
per linear shape of a preset, over a grid of tile configurations. MoE
is not timed here (see decode_variants.py). What the sweep found is in ``gemv_config``'s docstring.

    PYTHONPATH=. python benchmarks/gemv_tune.py --preset flash-slice --out gemv.json

Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``), so launch overhead is not
counted; GB/s is the weight bytes read (scales included) per second.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch


def linear_shapes(preset: str) -> list[tuple[int, int]]:
    """Distinct [out, in] shapes of the preset's dense linears (not experts, embedding or head)."""
    import transformers

    from ds4c.models.deepseek_v4.presets import PRESETS

    with torch.device("meta"):
        m = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**PRESETS[preset]))
    shapes = set()
    for name, p in m.named_parameters():
        if p.dim() == 2 and "experts" not in name.replace("shared_experts", "") and "embed" not in name \
                and "lm_head" not in name and min(p.shape) >= 128:
            shapes.add(tuple(p.shape))
    return sorted(shapes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--out", default="gemv.json")
    args = ap.parse_args()

    import triton
    from triton.testing import do_bench_cudagraph

    from ds4c.backends.triton.kernels.configs import KernelContext
    from ds4c.backends.triton.kernels.linear import gemv
    from ds4c.quant.formats import get_format
    from ds4c.targets import get_target

    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "triton": triton.__version__, "shapes": {}}
    grid = [dict(block_n=bn, block_k=bk, num_stages=st, num_warps=nw)
            for bn, bk, st, nw in itertools.product((16, 32, 64), (128, 256, 512), (3,), (4,))]
    grid += [dict(block_n=64, block_k=512, num_stages=st, num_warps=nw) for st, nw in ((2, 4), (4, 4), (3, 8))]
    ctx = KernelContext(get_target("h100"))
    for n, k in linear_shapes(args.preset):
        w = torch.randn(n, k, device=dev) / k ** 0.5
        for m in args.rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            wb = w.to(torch.bfloat16)
            row = {"cublas_bf16_us": 1e3 * do_bench_cudagraph(lambda x=x, wb=wb: torch.nn.functional.linear(x, wb))}
            for fmt in ("bf16", "fp8"):
                f = get_format(fmt)
                p = f.pack(w)
                parts = [p[name] for name in f.packed_spec((n, k))]
                q, s = parts[0], (parts[1] if len(parts) > 1 else None)
                nbytes = sum(t.numel() * t.element_size() for t in parts)
                row[f"{fmt}_default_us"] = 1e3 * do_bench_cudagraph(lambda x=x, q=q, s=s, fmt=fmt: gemv(ctx, x, q, s, fmt))
                best = None
                for cfg in grid:
                    try:
                        t = 1e3 * do_bench_cudagraph(lambda cfg=cfg, x=x, q=q, s=s, fmt=fmt: gemv(ctx, x, q, s, fmt, **cfg))
                    except Exception as e:  # a tile that does not fit (shared memory) is skipped
                        print("skip", cfg, type(e).__name__)
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                row[f"{fmt}_best_us"], row[f"{fmt}_best"] = best
                row[f"{fmt}_best_GBps"] = nbytes / best[0] / 1e3
                row[f"{fmt}_default_GBps"] = nbytes / row[f"{fmt}_default_us"] / 1e3
            res["shapes"][f"{n}x{k} rows={m}"] = row
            print(f"{n}x{k} m={m}", json.dumps(row), flush=True)
            with open(args.out, "w") as fh:
                json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
