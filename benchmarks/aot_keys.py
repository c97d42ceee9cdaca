"""Do the ahead-of-time workers' Triton cache keys match the keys computed at load, binary by binary?

    PYTHONPATH=. python benchmarks/aot_keys.py --target h100 --precisions fp32,bf16,fp8 --out keys.json

Compiles ``--preset`` for ``--target`` (kernel binaries built by the AOT workers), then in this
process, before any kernel runs, computes each binary's live key as ``ds4c.load`` does
(``binaries.live_cache_key`` after ``pin_ptxas``). For a binary whose key differs it compiles the
recorded specialisation here with ``triton.compile`` (is the stored key reproducible in-process?)
and recomputes the live key in a fresh interpreter (does process state change it?). JSON out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import ds4c
from ds4c.artifact.artifact import read_artifact
from ds4c.backends.triton.aot import pin_ptxas
from ds4c.runtime.binaries import live_cache_key


def fresh_key(binary: dict[str, Any]) -> str:
    code = ("import json,sys; from ds4c.backends.triton.aot import pin_ptxas; pin_ptxas(); "
            "from ds4c.runtime.binaries import live_cache_key; print(live_cache_key(json.loads(sys.stdin.read())))")
    return subprocess.run([sys.executable, "-c", code], input=json.dumps(binary), text=True,
                          capture_output=True, env=dict(os.environ)).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--out", default="aot_keys.json")
    args = ap.parse_args()
    res: dict[str, Any] = {"ptxas": pin_ptxas()}
    for precision in args.precisions.split(","):
        path = os.path.join(tempfile.mkdtemp(), f"{precision}.ds4")
        ds4c.compile(args.preset, target=args.target, precision=precision, progress=False).save(path)
        manifest, program, container = read_artifact(path)
        section = manifest["kernels"]
        rows = []
        for b in section["binaries"]:
            b = dict(b, triton_target=section["triton_target"])
            live = live_cache_key(b)
            if live == b["cache_key"]:
                continue
            import triton
            from triton.backends.compiler import GPUTarget

            from ds4c.backends.triton.launches import triton_source
            _, src, options = triton_source(b["function"], b["specialization"])
            try:
                here = triton.compile(src, target=GPUTarget(*b["triton_target"]), options=options).hash
            except Exception as e:  # noqa: BLE001 - reported
                here = f"{type(e).__name__}: {e}"
            rows.append({"name": b["name"], "function": b["function"], "stored": b["cache_key"], "live": live,
                         "compiled_here": here, "fresh_process": fresh_key(b), "fn_cache_key": src.fn.cache_key,
                         "src_hash": src.hash(), "options": {k: str(v) for k, v in options.items()},
                         "specialization": json.loads(b["specialization"])})
        if rows:  # the workers record launches before compiling: does recording change the keys?
            from ds4c.backends.triton.launches import prefill_lengths, record_launches
            from ds4c.targets import get_target
            record_launches(program.graphs, manifest["state"], get_target(args.target),
                            prefill_lengths(manifest.get("max_context", program.attrs.get("max_context"))),
                            pdl=bool(manifest.get("lowering", {}).get("options", {}).get("pdl", False)))
            for r in rows:
                b = next(dict(x, triton_target=section["triton_target"]) for x in section["binaries"]
                         if x["name"] == r["name"])
                _, src, _ = triton_source(b["function"], b["specialization"])
                r["after_recording"] = {"live": live_cache_key(b), "fn_cache_key": src.fn.cache_key,
                                        "src_hash": src.hash()}
        res[precision] = {"binaries": len(section["binaries"]), "mismatched": rows}
        print(precision, len(section["binaries"]), "binaries,", len(rows), "mismatched",
              [r["name"] for r in rows], flush=True)
        container.close()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
