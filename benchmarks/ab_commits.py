"""Two ds4c source trees, same GPU, same run: compile, load, first token and decode, side by side.

    PYTHONPATH=. python benchmarks/ab_commits.py --a oldsrc --b . --out ab.json

``--a`` / ``--b`` are directories holding a ``ds4c`` package (e.g. ``git archive REV ds4c
pyproject.toml | tar -x -C oldsrc``). Each side runs in its own process (``--side DIR``, the
tree first on ``sys.path``; the benchmark helpers come from this tree), alternating A, B, A, B
for ``--rounds`` rounds, each round compiling and loading afresh. Per precision (``--precisions``,
default bf16,fp8) a side reports, for ``--preset`` (default flash-slice) on ``--target``:

- ``compile_s``: ``ds4c.compile(..., weights="reference")`` wall time, and ``load_s``: ``ds4c.load``
  with the same seeded weights (generated on the device, as gpu_peers.py does), default backend;
- ``ttft_first_s`` / ``ttft_s``: ``prefill(prompt, logits="last")`` of a ``--prompt``-token prompt,
  the first call and the median of 3 later ones (CUDA-graph replays from the second on);
- ``decode_b{B}_gpu_s``: device seconds per decode step at context ``--prompt`` (a captured CUDA
  graph replayed back to back, ``gpu_timed``) from a random full state, for each ``--batch``;
- ``next_token``: the greedy token after the prompt (both sides must agree on bf16 weights).

The summary gives B / A per figure, median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def side(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import ds4c
    from benchmarks.gpu_peers import build_hf, gpu_timed, synthetic_state, timed
    from ds4c.models.deepseek_v4.presets import PRESETS

    dev = torch.device("cuda")
    cfg = dict(PRESETS[args.preset])
    hf = build_hf(cfg, dev, torch.bfloat16, 0)
    params = dict(hf.state_dict())
    del hf
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt), generator=g).to(dev)
    out: dict[str, Any] = {"ds4c": str(Path(ds4c.__file__).parent), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(dev)}
    for precision in args.precisions.split(","):
        r: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            art = ds4c.compile(args.preset, target=args.target, max_context=args.prompt + 64, progress=False,
                               weights="reference", seed=0, precision=precision)
            r["compile_s"] = time.perf_counter() - t0
            path = f"/tmp/ab_{os.getpid()}_{precision}.ds4"
            art.save(path)
            del art
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model = ds4c.load(path, device=dev, weights=params, progress=False)
            torch.cuda.synchronize()
            r["load_s"] = time.perf_counter() - t0
            r["backend"] = model.backend
            t0 = time.perf_counter()
            logits, _ = model.prefill(prompt, logits="last")
            torch.cuda.synchronize()
            r["ttft_first_s"] = time.perf_counter() - t0
            r["next_token"] = int(logits[0, -1].argmax())
            r["ttft_s"] = timed(lambda m=model: m.prefill(prompt, logits="last"), dev, warmup=1, reps=3)
            del logits
            for b in args.batch:
                state = synthetic_state(model, b, dev)
                tok = prompt[:, -1:].repeat(b, 1)
                _, st = model._decode(tok, args.prompt, state)  # captures the step's CUDA graph

                def step(st: dict = st, tok: Any = tok, m: Any = model) -> Any:
                    return m._decode(tok, args.prompt, st)
                r[f"decode_b{b}_gpu_s"] = gpu_timed(step, dev)
                r[f"decode_b{b}_s"] = timed(step, dev, warmup=2, reps=20)
                del state, st
            del model
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - a side that fails is a result
            import traceback

            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        out[precision] = r
        print(precision, r, file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a")
    ap.add_argument("--b", default=".")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h200")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="ab.json")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(args)))
        return
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "a": args.a,
                           "b": args.b, "rounds": {"a": [], "b": []}}
    passthrough = ["--preset", args.preset, "--target", args.target, "--prompt", str(args.prompt),
                   "--precisions", args.precisions, "--batch", *map(str, args.batch)]
    for _ in range(args.rounds):
        for name, tree in (("a", args.a), ("b", args.b)):
            # The side runs in its tree: worker processes it starts (`python -m ds4c...`) put the working
            # directory first on sys.path and must find that tree's ds4c, not this one's.
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tree).resolve()), str(HERE)]))
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--side", tree, *passthrough],
                                  env=env, capture_output=True, text=True, cwd=str(Path(tree).resolve()))
            sys.stderr.write(proc.stderr[-4000:])
            try:
                res["rounds"][name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            except (json.JSONDecodeError, IndexError):
                res["rounds"][name].append({"error": proc.stderr[-2000:]})
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    summary: dict[str, Any] = {}
    for precision in args.precisions.split(","):
        for key in ("compile_s", "load_s", "ttft_first_s", "ttft_s", *(f"decode_b{b}_gpu_s" for b in args.batch),
                    *(f"decode_b{b}_s" for b in args.batch)):
            vals = {}
            for name in ("a", "b"):
                xs = sorted(r[precision][key] for r in res["rounds"][name]
                            if isinstance(r.get(precision), dict) and key in r[precision])
                if xs:
                    vals[name] = xs[len(xs) // 2]
            if len(vals) == 2:
                summary[f"{precision}/{key}"] = {**vals, "b_over_a": vals["b"] / vals["a"]}
        tokens = {name: [r[precision].get("next_token") for r in res["rounds"][name]
                         if isinstance(r.get(precision), dict)] for name in ("a", "b")}
        summary[f"{precision}/next_token"] = tokens
    res["summary"] = summary
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
