"""ds4c vs transformers eager vs transformers under torch.compile, same GPU, same run, same weights.

    PYTHONPATH=. python benchmarks/gpu_peers.py --preset flash-slice --out peers.json

Figures (B = batch, ctx = context):
- time to first token: one prefill of a 2048-token prompt, B=1, computing the logits of the last
  position only, as generation does (ds4c ``prefill(logits="last")``, transformers
  ``logits_to_keep=1`` as its ``generate`` passes); ds4c's all-positions prefill is recorded too;
- decode step latency at ctx 2048 for B=1 and B=32, and at ctx 32768 for B=1;
each also as a fraction of the roofline: bytes a decode step must read / HBM bandwidth, prefill
FLOPs / dense bf16 tensor-core peak (from ds4c.targets).

Weights: the preset's seeded weights are generated on the device once, into a transformers
``DeepseekV4ForCausalLM``; ds4c's artifact references the same preset and is loaded with
``weights=`` those very tensors (ds4c names weights as transformers does), so both run the same
numbers with one copy in memory. ds4c's decode state for B=32 is the B=1 state after the prompt,
repeated, with a distinct next token per sequence; at ctx 32768 the state is synthetic (random entries, every slot valid): a decode step's
work in ds4c depends on the static capacity, not on the values; transformers' ctx-32768 cache is
real (a random 32768-token prompt prefilled in ``--long-chunk`` chunks). Peers that fail (out of memory,
compile errors) are recorded with their error, not hidden.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device, *, warmup: int = 1, reps: int = 5) -> float:
    """Median wall seconds of ``fn`` (synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def gpu_timed(fn: Callable[[], Any], dev: torch.device, *, warmup: int = 2, reps: int = 50) -> float:
    """Device seconds per call of ``fn`` (a CUDA-graph replay): ``reps`` calls queued back to back
    between two CUDA events, no synchronisation in between. Unlike ``timed`` (wall time of each
    call, synchronised) it leaves out the host's launch and synchronisation latency and its
    jitter, which are tens of microseconds against a step of about a millisecond."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def synthetic_state(model: Any, batch: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """A full decode state for ``batch`` sequences with random values (seeded): a step's work in
    ds4c depends on the static capacity, not on the values, so a long context needs no prefill."""
    gen = torch.Generator(device=dev).manual_seed(2)
    state = model.new_state(batch)
    for v in state.values():
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=gen, device=dev, dtype=v.dtype) * 0.1)
    return state


def attempt(res: dict, key: str, fn: Callable[[], Any]) -> Any:
    try:
        out = fn()
        res[key] = out
        return out
    except Exception as e:  # a failing peer is a result, recorded with its error
        res[key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    finally:
        print(key, res.get(key), flush=True)


# -- roofline --------------------------------------------------------------------------------------

from ds4c.bench.roofline import decode_bytes  # noqa: E402 - re-exported for the other benchmarks


def prefill_flops(params: dict[str, torch.Tensor], cfg: dict, tokens: int, logits_positions: int | None = None) -> float:
    """2 x tokens x active weights (top-k of the routed experts) + attention scores and values;
    the LM head for ``logits_positions`` positions (default: every token)."""
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    active = 0.0
    head = 0.0
    for name, t in params.items():
        if name.endswith("embed_tokens.weight") or t.dim() < 2:
            continue
        if name.endswith("lm_head.weight") and logits_positions is not None:
            head = 2 * logits_positions * t.numel()
            continue
        active += t.numel() * (k / e if ("experts." in name and "shared" not in name) else 1)
    h, d, w = cfg["num_attention_heads"], cfg["head_dim"], cfg["sliding_window"]
    attn = 0.0
    rates = cfg.get("compress_rates", {})
    for lt in cfg["layer_types"]:
        seen = min(w, tokens)
        if lt == "compressed_sparse_attention":
            seen += min(cfg["index_topk"], tokens // rates.get(lt, 4))
        elif lt == "heavily_compressed_attention":
            seen += tokens // rates.get(lt, 128) / 2
        attn += 4 * tokens * seen * h * d
    return 2 * tokens * active + attn + head


# -- models ----------------------------------------------------------------------------------------

def build_hf(cfg: dict, dev: torch.device, dtype: torch.dtype, seed: int):
    """transformers' model of preset config ``cfg`` with the preset's weights of ``seed`` (as
    ``ds4c bench serve --compare transformers`` builds it)."""
    from ds4c.bench.peers import transformers_model

    manifest = {"model": {"config": cfg, "source": {"kind": "preset", "seed": seed}},
                "precision": {"compute_dtype": "float32" if dtype == torch.float32 else "bfloat16"}}
    return transformers_model(manifest, dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash-slice")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--long-context", type=int, default=32768)
    ap.add_argument("--long-chunk", type=int, default=1024,
                    help="transformers' long-context cache is built by prefilling the prompt in chunks of this many "
                         "tokens (one 32768-token forward would need ~140 GB of attention scores)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--peers", default="eager,compile", help="comma list of transformers peers to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-decode", action="store_true",
                    help="also time transformers' decode under torch.compile (its growing cache recompiles "
                         "every step: 27.9 s/step on an H100, 2026-11-22)")
    ap.add_argument("--ds4c-backend", default="compiled", help="kernels | compiled | reference")
    ap.add_argument("--precision", default="bf16", help="ds4c precision policy (the peers run bf16)")
    ap.add_argument("--out", default="peers.json")
    args = ap.parse_args()

    import transformers

    import ds4c
    from ds4c.models.deepseek_v4.presets import PRESETS
    from ds4c.targets import get_target

    dev = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = dict(PRESETS[args.preset])
    tgt = get_target(args.target)
    res: dict[str, Any] = {
        "preset": args.preset, "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/gpu_peers.py "
        + " ".join(f"--{k.replace('_', '-')} {v if not isinstance(v, list) else ' '.join(map(str, v))}"
                   for k, v in vars(args).items() if k != "out"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "triton": __import__("triton").__version__, "target": tgt.name,
    }
    bw, peak = tgt.hbm_bandwidth, tgt.peak("bf16")
    res["hbm_bytes_per_s"], res["bf16_flops_per_s"] = bw, peak

    def save() -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.out)

    t0 = time.perf_counter()
    hf = build_hf(cfg, dev, dtype, args.seed)
    _sync(dev)
    res["hf_build_s"] = time.perf_counter() - t0
    params = dict(hf.state_dict())
    res["weight_gb"] = sum(t.numel() * t.element_size() for t in params.values()) / 1e9

    def ds4c_model(max_context: int):
        art = ds4c.compile(args.preset, target=args.target, max_context=max_context, progress=False,
                           weights="reference", seed=args.seed, precision=args.precision)
        path = f"/tmp/ds4c_peers_{args.preset}_{max_context}.ds4"
        art.save(path)
        return ds4c.load(path, device=dev, weights=params, progress=False, backend=args.ds4c_backend)

    t0 = time.perf_counter()
    model = ds4c_model(args.prompt + 64)
    res["ds4c_compile_and_load_s"] = time.perf_counter() - t0
    res["ds4c_backend"] = model.backend
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt), generator=g).to(dev)

    # -- agreement with transformers (bf16, same weights) -------------------------------------------
    def agreement():
        short = prompt[:, :256]
        with torch.no_grad():
            want = hf(short).logits.float()
        got = model(short).float()
        return {"tokens": 256, "max_abs_err": float((got - want).abs().max()),
                "max_abs_logit": float(want.abs().max()),
                "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}
    attempt(res, "bf16_agreement_vs_transformers", agreement)
    save()

    flops = prefill_flops(params, cfg, args.prompt, logits_positions=1)
    res["prefill_flops"] = flops
    roof_prefill = flops / peak

    def ttft_ds4c():
        t = time.perf_counter()
        model.prefill(prompt, logits="last")
        _sync(dev)
        res["ds4c_prefill_first_call_s"] = time.perf_counter() - t
        s = timed(lambda: model.prefill(prompt, logits="last"), dev, warmup=0, reps=3)
        # the same prefill op by op (no CUDA graph), and with every position's logits
        entry = model._last_position_entry() or model._executors["prefill"]

        def op_by_op():
            entry.run({"input_ids": prompt}, model.weights)
        res["ds4c_prefill_no_graph_s"] = timed(op_by_op, dev, warmup=0, reps=3)
        res["ds4c_prefill_graphs"] = [str(k) for k in model._prefill_graphs]
        res["ds4c_prefill_graph_errors"] = {str(k): v for k, v in model.prefill_graph_errors.items()}
        res["ds4c_prefill_all_logits_s"] = timed(lambda: model.prefill(prompt), dev, warmup=1, reps=3)
        return {"seconds": s, "roofline_s": roof_prefill, "fraction_of_roofline": roof_prefill / s,
                "kernel_stats": model._executors["prefill"].stats() if hasattr(model._executors["prefill"], "stats")
                else None}
    attempt(res, "ttft_ds4c", ttft_ds4c)
    save()

    peers = [p for p in args.peers.split(",") if p]
    hf_compiled = None
    if "compile" in peers:
        hf_compiled = torch.compile(hf)

    def ttft_hf(m):
        def run():
            with torch.no_grad():
                return m(prompt, logits_to_keep=1).logits
        t = time.perf_counter()
        run()
        _sync(dev)
        first = time.perf_counter() - t
        s = timed(run, dev, warmup=0, reps=3)
        return {"seconds": s, "first_call_s": first, "fraction_of_roofline": roof_prefill / s}
    if "eager" in peers:
        attempt(res, "ttft_transformers_eager", lambda: ttft_hf(hf))
        save()
    if hf_compiled is not None:
        attempt(res, "ttft_transformers_compile", lambda: ttft_hf(hf_compiled))
        save()

    # -- decode at ctx = prompt -----------------------------------------------------------------
    logits, state = model.prefill(prompt)
    tok = logits[:, -1].argmax(-1, keepdim=True)
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())

    def decode_ds4c(m, st, b: int, position: int, sbytes: int):
        # distinct next tokens per sequence, so routing picks experts as a real batch does
        ids = tok if b == 1 else torch.randint(0, cfg["vocab_size"], (b, 1), generator=torch.Generator().manual_seed(b)).to(dev)
        st = {k: v.expand(b, *v.shape[1:]).contiguous() if v.shape[0] != b else v for k, v in st.items()}
        _, live = m._decode(ids, position, st)  # capture (CUDA graph) + warm up
        reps = 20
        # each step gets the state the previous one returned, as generate() does (the graph's own
        # buffers: nothing copied); before 2026-12-03 night every step was given ``st`` again,
        # which copies each state tensor into the graph's buffers first ("recopy_seconds")
        s = timed(lambda: m._decode(ids, position, live), dev, warmup=2, reps=reps)
        recopy = timed(lambda: m._decode(ids, position, st), dev, warmup=2, reps=reps)
        roof = decode_bytes(params, cfg, b, sbytes * b) / bw
        return {"seconds": s, "roofline_s": roof, "fraction_of_roofline": roof / s, "position": position,
                "cuda_graph": bool(getattr(m, "_graphed", None)), "recopy_seconds": recopy,
                "device_seconds": gpu_timed(lambda: m._decode(ids, position, live), dev)}

    for b in args.batch:
        attempt(res, f"decode_ds4c_ctx{args.prompt}_b{b}",
                lambda b=b: decode_ds4c(model, state, b, args.prompt, state_bytes))
        save()

    def hf_steps(m, cache, nxt, position: int, b: int) -> tuple[float, float]:
        """(first step, median of the next) seconds of transformers' decode steps on ``cache``."""
        pos = [position]

        def step():
            with torch.no_grad():
                o = m(nxt, past_key_values=cache, use_cache=True,
                      position_ids=torch.full((b, 1), pos[0], device=dev, dtype=torch.long))
            pos[0] += 1
            return o.logits
        t = time.perf_counter()
        step()
        _sync(dev)
        first = time.perf_counter() - t
        return first, timed(step, dev, warmup=1, reps=8)

    def decode_hf(m, b: int):
        ids = prompt.expand(b, -1).contiguous()
        with torch.no_grad():
            out = hf(ids, use_cache=True, logits_to_keep=1)
        first, s = hf_steps(m, out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), args.prompt, b)
        roof = decode_bytes(params, cfg, b, state_bytes * b) / bw
        return {"seconds": s, "first_call_s": first, "fraction_of_roofline": roof / s}
    for b in args.batch:
        if "eager" in peers:
            attempt(res, f"decode_transformers_eager_ctx{args.prompt}_b{b}", lambda b=b: decode_hf(hf, b))
            save()
        if hf_compiled is not None and args.compile_decode:
            attempt(res, f"decode_transformers_compile_ctx{args.prompt}_b{b}", lambda b=b: decode_hf(hf_compiled, b))
            save()

    # -- decode at a long context (ds4c: synthetic full state) ---------------------------------------
    if args.long_context:
        del model, state
        torch.cuda.empty_cache() if dev.type == "cuda" else None

        def long_decode():
            m = ds4c_model(args.long_context + 64)
            st = synthetic_state(m, 1, dev)
            sbytes = sum(t.numel() * t.element_size() for t in st.values())
            return decode_ds4c(m, st, 1, args.long_context, sbytes)
        attempt(res, f"decode_ds4c_ctx{args.long_context}_b1", long_decode)
        save()

        def long_decode_hf():
            # a real cache: a random long prompt prefilled chunk by chunk (exact: transformers'
            # DeepseekV4 continues a cache chunk by chunk as one forward would, to 1e-6 on the
            # foundation's configs), then decode steps on it
            long_prompt = torch.randint(0, cfg["vocab_size"], (1, args.long_context),
                                        generator=torch.Generator().manual_seed(3)).to(dev)
            cache, out = None, None
            t = time.perf_counter()
            with torch.no_grad():
                for s0 in range(0, args.long_context, args.long_chunk):
                    out = hf(long_prompt[:, s0:s0 + args.long_chunk], past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
                    cache = out.past_key_values
            _sync(dev)
            build = time.perf_counter() - t
            first, s = hf_steps(hf, cache, out.logits[:, -1].argmax(-1, keepdim=True), args.long_context, 1)
            roof = res.get(f"decode_ds4c_ctx{args.long_context}_b1", {}).get("roofline_s")
            return {"seconds": s, "first_call_s": first, "cache_build_s": build, "chunk": args.long_chunk,
                    "fraction_of_roofline": roof / s if roof else None}
        if "eager" in peers:
            attempt(res, f"decode_transformers_eager_ctx{args.long_context}_b1", long_decode_hf)
            save()

    # -- ratios ---------------------------------------------------------------------------------
    ratios = {}
    for key in list(res):
        if key.startswith(("ttft_transformers", "decode_transformers")) and isinstance(res[key], dict) \
                and "seconds" in res[key]:
            ours = key.replace("transformers_eager", "ds4c").replace("transformers_compile", "ds4c")
            if isinstance(res.get(ours), dict) and "seconds" in res[ours]:
                ratios[key + "/ds4c"] = res[key]["seconds"] / res[ours]["seconds"]
    res["speedup_of_ds4c"] = ratios
    res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    save()
    print(json.dumps({k: v for k, v in res.items() if k != "command"}, indent=1, default=str))
    assert math.isfinite(res.get("weight_gb", float("nan")))


if __name__ == "__main__":
    main()
