"""Compile time of the `flash` preset (V4-Flash widths) through the whole default pipeline, by layer count.

    python benchmarks/compile_time.py --layers 3 8 13 23 43 --out compile_time.json

Weights are never materialised (meta tracing, referenced preset weights), so this measures the
compiler: torch.export of both entry points, import, every pass, artifact assembly.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def flash_with_layers(n: int) -> dict:
    from ds4c.models.deepseek_v4.presets import PRESETS

    cfg = dict(PRESETS["flash"])
    cfg["num_hidden_layers"] = n
    cfg["layer_types"] = PRESETS["flash"]["layer_types"][:n]
    cfg["mlp_layer_types"] = PRESETS["flash"]["mlp_layer_types"][:n]
    return cfg


def main() -> None:
    from ds4c.compiler import compile as compile_model
    from ds4c.debug import CompileTrace
    from ds4c.frontend import source

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 8, 13, 23, 43])
    ap.add_argument("--target", default="b200")
    ap.add_argument("--out", default="compile_time.json")
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        cfg = flash_with_layers(n)
        src = source.ModelSource("preset", f"flash[{n} layers]", cfg, seed=0)
        original = source.resolve_model
        source.resolve_model = lambda model, seed=None, _s=src: _s  # compile this config as a preset
        import ds4c.compiler as comp

        comp.resolve_model = source.resolve_model
        try:
            trace = CompileTrace()
            t0 = time.perf_counter()
            art = compile_model("flash", target=args.target, instruments=[trace], progress=False, verify=False)
            total = time.perf_counter() - t0
        finally:
            source.resolve_model = original
            comp.resolve_model = original
        passes = sum(trace.timings().values())
        row = {"layers": n, "total_s": round(total, 2), "passes_s": round(passes, 2),
               "trace_and_import_s": round(total - passes, 2),
               "ops": {k: len(g.ops) for k, g in art.program.graphs.items()}}
        rows.append(row)
        print(row, flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        per_layer = (b["total_s"] - a["total_s"]) / (b["layers"] - a["layers"])
        print(f"marginal cost: {per_layer:.2f} s/layer; fixed: {a['total_s'] - per_layer * a['layers']:.1f} s")
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "torch": torch.__version__, "ds4c": __import__("ds4c.version", fromlist=["x"]).__version__, "python": platform.python_version(),
                   "cpus": __import__("os").cpu_count()}, f, indent=1)


if __name__ == "__main__":
    main()
