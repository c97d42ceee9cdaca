"""One program, several ways to run its decode step: precision x backend x streams, same GPU, same run.

    PYTHONPATH=. python benchmarks/decode_variants.py --preset flash-slice --out variants.json

For each precision policy (default ``bf16``, ``fp8`` and ``fp8:compute``: FP8 weights with the
activations left in bf16, ``compile(activations="compute")``) the preset is compiled once for the
target and loaded with the same seeded weights (generated on the device, as in gpu_peers.py;
the fp8 artifact packs them at load); then each backend variant times a decode step at context
``--prompt`` (B=1, CUDA graph: ``decode_s`` the median wall time of 20 synchronised replays,
``decode_gpu_s`` the device time per replay of 50 queued back to back; each step is given the
state the previous one returned, as ``generate`` does: ``decode_recopy_s`` / ``decode_recopy_gpu_s``
give the prefill's state dict every time instead, which copies each of its tensors into the
graph's buffers first, as these figures were timed before 2026-12-03 night) and, optionally, one
prefill:

- ``kernels+streams``: Triton kernels op by op, the compiler's stream schedule on CUDA streams;
- ``kernels``: the same program and order on one stream (``ds4c.load(streams=False)``);
- ``compiled``: kernels + TorchInductor between them (one stream);
- ``compiled-nopdl``: the same on a program compiled without programmatic dependent launch
  (``compile(lowering={"pdl": False})``, ``ds4c compile --no-pdl``; ``ds4c/backends/triton/kernels/pdl.py``),
  to measure what PDL gives in the same run;
- ``compiled-nomergepacked``: ``compiled`` on a program compiled with packed sibling linears kept
  apart (``compile(lowering={"merge_packed": False})``; the pass ``ds4c/passes/merge_sibling_linears.py``
  merges them by default).
- ``compiled-rowloop0``: ``compiled`` with the FP8 one-row kernels' K loop as before 2026-12-03
  (not pipelined, one [rows, 128] fp32 accumulator, gate and up rows in two loops; ``row_dot``).
- ``compiled-topk0``: ``compiled`` with the indexer's top-k as a bitonic sort in every case (before
  2026-12-03 late: ``topk_config``'s threshold select for rows of 2048+ entries).
- ``compiled-nonormrope``: ``compiled`` on a program compiled with each query/key norm and its rotary
  embedding as two launches (``compile(lowering={"fuse_norm_rope": False})``; the pass
  ``ds4c/passes/fuse_norm_rope.py`` fuses them by default).
- ``kernels+streams-noplan`` / ``kernels-noplan``: the kernels backend without its static buffer
  plan (``ds4c.load(buffer_plan=False)``: every result allocated by the caching allocator, inside the CUDA
  graph from its pool), to measure what the plan costs or saves in time and in the bytes the
  capture holds (``capture_allocated_bytes``).

Ratios answer two acceptance questions: fp8 weights vs bf16 weights (bytes read), and the
stream schedule vs one stream (same program).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from typing import Any

import torch

from benchmarks.gpu_peers import attempt, build_hf, decode_bytes, gpu_timed, synthetic_state, timed

# name -> (backend, streams)
VARIANTS = {"kernels+streams": ("kernels", True), "kernels": ("kernels", False),
            "compiled": ("compiled", False), "compiled-nopdl": ("compiled", False),
            "compiled-nomergepacked": ("compiled", False),
            "compiled-rowloop0": ("compiled", False), "compiled-topk0": ("compiled", False),
            "compiled-nonormrope": ("compiled", False),
            "kernels+streams-noplan": ("kernels", True),
            "kernels-noplan": ("kernels", False)}
# name -> ds4c.load options of the variant
LOAD_OPTIONS = {"kernels+streams-noplan": {"buffer_plan": False}, "kernels-noplan": {"buffer_plan": False}}
# name -> lowering options the variant's program is compiled with (a program of its own)
LOWERING = {"compiled-nomergepacked": {"merge_packed": False}, "compiled-nonormrope": {"fuse_norm_rope": False},
            "compiled-nopdl": {"pdl": False}}
# name -> tuning table applied after loading (model.tuning), as ``ds4c tune`` would
TUNING = {"compiled-rowloop0": {"row_gemv": {"pipeline": 0, "row_sums": 0},
                                "moe_decode": {"row_pipeline": 0, "row_sums": 0, "row_paired": 0}},
          "compiled-topk0": {"topk": {"select": 0}}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precisions", default="bf16,fp8,fp8:compute")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prefill", action="store_true", help="also time one prefill of the prompt per variant")
    ap.add_argument("--synthetic-state", action="store_true",
                    help="decode from a random full state at position --prompt instead of prefilling the prompt "
                         "(a step's work depends on the static capacity, not the values; as gpu_peers.py at ctx 32768)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="keep every variant of a precision loaded and time them in turn, this many rounds "
                         "(decode_s: the median of the round medians)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="variants.json")
    args = ap.parse_args()

    import transformers
    import triton

    import ds4c
    from ds4c.models.deepseek_v4.presets import PRESETS
    from ds4c.targets import get_target

    dev = torch.device("cuda")
    cfg = dict(PRESETS[args.preset])
    tgt = get_target(args.target)
    res: dict[str, Any] = {
        "preset": args.preset, "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/decode_variants.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not False),
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(), "target": tgt.name,
    }

    def save() -> None:
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    hf = build_hf(cfg, dev, torch.bfloat16, args.seed)
    params = dict(hf.state_dict())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (args.batch, args.prompt), generator=g).to(dev)
    for precision in args.precisions.split(","):
        policy, _, activations = precision.partition(":")  # "fp8:compute": weight-only quantisation
        def compiled(lowering: dict[str, bool] | None = None, policy: str = policy,
                     activations: str = activations, precision: str = precision) -> tuple[str, Any]:
            art = ds4c.compile(args.preset, target=args.target, max_context=args.prompt + 64, progress=False,
                               weights="reference", seed=args.seed, precision=policy,
                               activations=activations or "native", lowering=lowering)
            tag = "_".join(k for k, v in (lowering or {}).items() if not v)
            path = f"/tmp/ds4c_variants_{args.preset}_{re.sub(r'[^A-Za-z0-9]+', '_', precision)}{tag and '_no_' + tag}.ds4"
            art.save(path)
            return path, art

        path, art = compiled()
        res[f"{precision}_weight_bytes"] = art.manifest["precision"]["weight_bytes"]
        live: dict[str, tuple[Any, Any]] = {}  # --rounds > 1: name -> (model, step), timed in turn below
        for name in args.variants.split(","):
            backend, streams = VARIANTS[name]

            def run(backend=backend, streams=streams, name=name) -> dict[str, Any]:
                return measure(backend, streams, name)

            def measure(backend: str, streams: bool, name: str, path: str = path, live: dict = live) -> dict[str, Any]:
                if name in LOWERING:  # a program of its own, compiled with the variant's lowering options
                    path = compiled(LOWERING[name])[0]
                model = ds4c.load(path, device=dev, weights=params, progress=False, backend=backend,
                                  streams=streams, **LOAD_OPTIONS.get(name, {}))
                if name in TUNING:
                    base = dict(model.tuning or {})
                    model.tuning = {**base, **{f: {**base.get(f, {}), **v} for f, v in TUNING[name].items()}}
                context = model.kernel_context
                out: dict[str, Any] = {"kernel_binaries": getattr(model, "kernel_binaries", None),
                                       "pdl": context is not None and context.launches_with_pdl}
                if args.synthetic_state:
                    state, tok = synthetic_state(model, args.batch, dev), prompt[:, -1:]
                else:
                    logits, state = model.prefill(prompt)
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    del logits
                if args.prefill:
                    out["prefill_s"] = timed(lambda: model.prefill(prompt), dev, warmup=0, reps=3)

                torch.cuda.synchronize(dev)
                held = torch.cuda.memory_allocated(dev)
                nxt, graph_state = model._decode(tok, args.prompt, state)  # captures the CUDA graph
                torch.cuda.synchronize(dev)
                # what the capture keeps: the graph's pool (activations, scratch) + its state buffers
                out["capture_allocated_bytes"] = torch.cuda.memory_allocated(dev) - held
                out["next_token"] = int(nxt[0, -1].argmax())

                def step(st: dict = graph_state) -> Any:
                    # as generate() steps: the graph's own state buffers passed back, nothing copied
                    return model._decode(tok, args.prompt, st)

                def step_recopy() -> Any:
                    # another dict each step: all its tensors are copied into the graph's buffers
                    # first (how the decode figures were timed before 2026-12-03, night)
                    return model._decode(tok, args.prompt, state)
                out["decode_s"] = timed(step, dev, warmup=2, reps=20)
                out["decode_gpu_s"] = gpu_timed(step, dev)
                out["decode_recopy_s"] = timed(step_recopy, dev, warmup=2, reps=20)
                out["decode_recopy_gpu_s"] = gpu_timed(step_recopy, dev)
                sbytes = sum(t.numel() * t.element_size() for t in state.values())
                packed = sum(t.numel() * t.element_size() for t in model.weights.values())
                out["weights_resident_bytes"] = packed
                out["bf16_roofline_s"] = decode_bytes(params, cfg, args.batch, sbytes) / tgt.hbm_bandwidth
                ex = model._executors["decode"]
                out["stream_events"] = getattr(ex, "stream_events", 0)
                out["kernel_stats"] = ex.stats() if hasattr(ex, "stats") else None
                out["buffer_plans"] = model.buffer_plans()
                if args.rounds > 1:
                    live[name] = (model, step)
                else:
                    del model, state
                    torch.cuda.empty_cache()
                return out
            attempt(res, f"{precision}/{name}", run)
            save()
        # same-run A/B: between two loads a step moves by up to ~10% on the lent machines, so with
        # --rounds the loaded variants are timed in turn, round after round, and each keeps the
        # median of its round medians
        rounds: dict[str, list[float]] = {name: [] for name in live}
        gpu_rounds: dict[str, list[float]] = {name: [] for name in live}
        for _ in range(args.rounds if live else 0):
            for name, (_, replay) in live.items():
                rounds[name].append(timed(replay, dev, warmup=2, reps=20))
                gpu_rounds[name].append(gpu_timed(replay, dev))
        for name, times in rounds.items():
            r = res[f"{precision}/{name}"]
            r["decode_first_s"], r["decode_rounds_s"] = r["decode_s"], times
            r["decode_s"] = sorted(times)[len(times) // 2]
            r["decode_gpu_rounds_s"] = gpu_rounds[name]
            r["decode_gpu_s"] = sorted(gpu_rounds[name])[len(times) // 2]
        live.clear()
        torch.cuda.empty_cache()
        save()
    ratios = {}
    for p in args.precisions.split(","):
        a, b = res.get(f"{p}/kernels", {}), res.get(f"{p}/kernels+streams", {})
        if "decode_s" in a and "decode_s" in b:
            ratios[f"{p}: one stream / streams"] = a["decode_s"] / b["decode_s"]
    for name in args.variants.split(","):
        for p in args.precisions.split(","):
            a, b = res.get(f"bf16/{name}", {}), res.get(f"{p}/{name}", {})
            if p != "bf16" and "decode_s" in a and "decode_s" in b:
                ratios[f"{name}: bf16 / {p}"] = a["decode_s"] / b["decode_s"]
            if p != "bf16" and "prefill_s" in a and "prefill_s" in b:
                ratios[f"{name} prefill: bf16 / {p}"] = a["prefill_s"] / b["prefill_s"]
    for p in args.precisions.split(","):
        a, b = res.get(f"{p}/compiled-nopdl", {}), res.get(f"{p}/compiled", {})
        if "decode_s" in a and "decode_s" in b:
            ratios[f"{p}: compiled without PDL / with PDL"] = a["decode_s"] / b["decode_s"]
        a = res.get(f"{p}/compiled-rowloop0", {})
        if "decode_s" in a and "decode_s" in b:
            ratios[f"{p}: row kernels' old loop / new"] = a["decode_s"] / b["decode_s"]
        a = res.get(f"{p}/compiled-topk0", {})
        if "decode_s" in a and "decode_s" in b:
            ratios[f"{p}: bitonic top-k / select"] = a["decode_s"] / b["decode_s"]
        for v in ("kernels", "kernels+streams"):
            a, b = res.get(f"{p}/{v}-noplan", {}), res.get(f"{p}/{v}", {})
            for key in ("decode_s", "decode_gpu_s", "capture_allocated_bytes"):
                if key in a and key in b and b[key]:
                    ratios[f"{p}: {v} without / with the buffer plan ({key})"] = a[key] / b[key]
        for v in ("compiled-nonormrope",):
            a = res.get(f"{p}/{v}", {})
            if "decode_s" in a and "decode_s" in b:
                ratios[f"{p}: {v} / compiled"] = a["decode_s"] / b["decode_s"]
            if "decode_gpu_s" in a and "decode_gpu_s" in b:
                ratios[f"{p}: {v} / compiled (device time)"] = a["decode_gpu_s"] / b["decode_gpu_s"]
    best = {p: min((v["decode_s"], k) for k, v in res.items() if k.startswith(p + "/") and "decode_s" in v)
            for p in args.precisions.split(",") if any(k.startswith(p + "/") and "decode_s" in v
                                                         for k, v in res.items() if isinstance(v, dict))}
    for p in best:
        if p != "bf16" and "bf16" in best:
            ratios[f"best bf16 / best {p}"] = best["bf16"][0] / best[p][0]
    res["best"] = best
    res["ratios"] = ratios
    save()
    print(json.dumps({"ratios": ratios, "best": best}, indent=1))


if __name__ == "__main__":
    main()
