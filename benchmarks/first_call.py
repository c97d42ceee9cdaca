"""The first call after ``ds4c.load`` (#29): does anything compile, and how far is the first token from the steady one?

    PYTHONPATH=. python benchmarks/first_call.py --target h200 --out first_call.json

Compiles ``flash-slice`` (``--precision``, default bf16) with its kernel binaries for ``--target``,
then, in a fresh process with empty Triton and Inductor caches (what a user's first run has),
loads it with the default backend and times the first token of a ``--prompt``-token prompt
(prefill + greedy pick, synchronised), then the same prompt ``--repeat`` more times (the steady
TTFT, median). Counted meanwhile: Triton compilations (``triton.knobs.compilation.listener``; a
cache hit does not count) and graphs Inductor / Dynamo compiled (``torch._dynamo`` counters). #29
asks for none of either and a first token within 2x of the steady TTFT.

``--serving`` compiles the serving entry points too and then starts a ``ds4c.Engine`` on the loaded
model (it captures every decode and token bucket as a CUDA graph) and serves one request: the
engine's start time and the Triton compilations during it and during the request are counted
apart (the artifact holds the steps' binaries: none expected).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def measure(path: str, prompt: int, repeat: int, device: str = "cuda", serving: bool = False) -> dict:
    """Runs in the fresh process: load, first token, steady tokens; compilations counted."""
    import torch
    import triton

    import ds4c

    compiles = {"triton": 0, "triton_kernels": []}

    def listener(*args, **kwargs):
        if not kwargs.get("cache_hit"):
            compiles["triton"] += 1
            src = kwargs.get("src") or (args[0] if args else None)
            name = getattr(getattr(src, "fn", None), "__name__", None) or str(getattr(src, "name", "?"))
            compiles["triton_kernels"].append(name)
    triton.knobs.compilation.listener = listener
    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = ds4c.load(path, device=device, progress=False)
    sync()
    load_s = time.perf_counter() - t0
    after_load = compiles["triton"]
    ids = torch.randint(0, model.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def first_token() -> float:
        sync()
        t = time.perf_counter()
        logits, _ = model.prefill(ids)
        logits[:, -1].argmax(-1).item()
        return time.perf_counter() - t

    first = first_token()
    steady = sorted(first_token() for _ in range(repeat))
    engine = {}
    if serving:
        before, k0 = compiles["triton"], len(compiles["triton_kernels"])
        t = time.perf_counter()
        eng = ds4c.Engine(model)
        sync()
        engine = {"engine_start_s": time.perf_counter() - t, "triton_compiles_engine_start": compiles["triton"] - before,
                  "engine_buckets": {k: eng.stats().get(k) for k in ("decode_graphs", "step_graphs")}}
        before = compiles["triton"]
        t = time.perf_counter()
        eng.generate([ids[0].tolist()], ds4c.SamplingParams(max_new_tokens=16))
        engine.update({"engine_first_request_s": time.perf_counter() - t,
                       "triton_compiles_engine_first_request": compiles["triton"] - before,
                       "triton_compiled_kernels_engine": compiles["triton_kernels"][k0:][:50]})
        eng.close()
    return {**engine, "backend": model.backend, "kernel_binaries": model.kernel_binaries, "load_s": load_s,
            "triton_compiles_at_load": after_load, "triton_compiles_first_call": compiles["triton"] - after_load,
            "triton_compiled_kernels": compiles["triton_kernels"][:50],
            "dynamo_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "inductor_counters": {k: int(v) for k, v in counters["inductor"].items()},
            "first_token_s": first, "steady_ttft_s": steady[len(steady) // 2], "first_over_steady":
            first / steady[len(steady) // 2], "device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
            "triton": triton.__version__}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="h200")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--artifact", default="/tmp/first_call.ds4")
    ap.add_argument("--out", default="first_call.json")
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--serving", action="store_true", help="also start a ds4c.Engine and serve one request")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.artifact, args.prompt, args.repeat, args.device, args.serving)))
        return

    import ds4c

    t0 = time.perf_counter()
    ds4c.compile(args.preset, target=args.target, precision=args.precision, weights="reference",
                 max_context=args.prompt + 64, progress=False, serving=True if args.serving else None).save(args.artifact)
    res = {"preset": args.preset, "target": args.target, "precision": args.precision, "prompt": args.prompt,
           "compile_s": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d"),
           "command": f"python benchmarks/first_call.py --target {args.target} --precision {args.precision}"
                      + (" --serving" if args.serving else "")}
    with tempfile.TemporaryDirectory() as triton_cache, tempfile.TemporaryDirectory() as inductor_cache:
        env = dict(os.environ, TRITON_CACHE_DIR=triton_cache, TORCHINDUCTOR_CACHE_DIR=inductor_cache)
        run = subprocess.run([sys.executable, __file__, "--measure", "--artifact", args.artifact, "--prompt",
                              str(args.prompt), "--repeat", str(args.repeat), "--device", args.device,
                              *(["--serving"] if args.serving else [])], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        res["error"] = run.stderr[-3000:]
    else:
        res.update(json.loads(run.stdout.strip().splitlines()[-1]))
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
