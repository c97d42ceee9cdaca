"""MTP speculative decoding on the GPU (#28): verify-step times against the one-token decode step, and
per-user decode speed at given acceptance lengths.

    PYTHONPATH=. python benchmarks/speculative.py --target h200 --out speculative.json

Compiles ``flash-slice`` (bf16) with ``--serving --speculative 3`` (the preset draws the MTP block's
weights too), loads it on the GPU, captures the engine's CUDA graphs (ragged_decode, ragged_step and
mtp_step buckets), prefills B requests to ``--context`` tokens, then times, at B = 1 and 32, in one run:

- the one-token decode step (``ragged_decode``),
- the verify step of k = 1, 2, 3 drafts (``ragged_step`` with k+1 rows per request, logits on all),
- the MTP block's catch-up (k+1 rows per request, logits on each last) and one chained draft row;

each as the median of ``--reps`` replays, synchronised (wall, so host work between launches counts).
A speculative round is verify(k) + catch-up + (k - 1) chained drafts and emits ``alpha`` tokens
(the acceptance length); per-user tokens/s = alpha / round against 1 / decode. Random preset
weights accept nothing, so alpha is given (1.5, 2.0, 2.5), not measured, here; the trained tiny's
measured acceptance comes from ``--tiny`` (tests/mtp_model.py, greedy, engine wall time per token
with and without speculation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def weight_read_limit(config: dict, layers: int) -> dict:
    """Weight bytes per emitted token at B = 1 in bf16 (docs/PERFORMANCE.md): decode, verify of k + 1
    tokens (the union of their experts, picks taken as independent), an MTP step, and the speedup
    a round of verify + k MTP steps allows at acceptance lengths 1.5 / 2.0 / 2.5."""
    d, i, e, k = config["hidden_size"], config["moe_intermediate_size"], config["n_routed_experts"], \
        config["num_experts_per_tok"]
    h, hd, q, g, ol = (config["num_attention_heads"], config["head_dim"], config["q_lora_rank"], config["o_groups"],
                       config["o_lora_rank"])
    expert, head = 3 * d * i * 2, config["vocab_size"] * d * 2
    attn = (d * q + q * h * hd + d * hd + h * hd * ol + g * ol * d) * 2

    def layer(tokens: int) -> float:
        return (e * (1 - (1 - k / e) ** tokens) + 1) * expert + attn

    decode, mtp = layers * layer(1) + head, layer(1) + head + 2 * d * d * 2
    out = {"decode_bytes": decode, "mtp_step_bytes": mtp}
    for drafts in (1, 2, 3):
        verify = layers * layer(drafts + 1) + head
        out[f"verify_k{drafts}_bytes"] = verify
        for alpha in (1.5, 2.0, 2.5):
            if alpha <= drafts + 1:
                out[f"limit_speedup_k{drafts}_alpha{alpha}"] = alpha * decode / (verify + drafts * mtp)
    return out


def flash_slice(args, res: dict) -> None:
    import ds4c
    from ds4c.models.deepseek_v4.presets import PRESETS
    from ds4c.runtime.engine import CompiledStepRunner
    from ds4c.runtime.pages import RequestPages
    from ds4c.runtime.step_batch import Chunk, build_step

    res["weight_read_limit"] = weight_read_limit(PRESETS["flash-slice"], PRESETS["flash-slice"]["num_hidden_layers"])
    t0 = time.perf_counter()
    art = ds4c.compile("flash-slice", target=args.target, precision="bf16", max_context=args.context + 64,
                       serving={"max_running": 32, "max_chunk": 2048}, speculative=3, progress=False)
    art.save(args.artifact)
    res["compile_s"] = time.perf_counter() - t0
    del art
    model = ds4c.load(args.artifact, device="cuda")
    free = torch.cuda.mem_get_info()[0]
    res["free_after_load_gb"] = free / 1e9
    # pools for 32 requests of the context, not the plan's (sized for the whole HBM beside the weights)
    runner = CompiledStepRunner(model, state_budget=int(min(args.state_budget, free * 0.5)))
    t0 = time.perf_counter()
    runner.warm_up(32, 32 * 4)
    res["warm_up_s"] = time.perf_counter() - t0
    res["graphs"] = {"decode": sorted(runner.decode_graphs), "step": sorted(runner.step_graphs),
                     "mtp": sorted(runner.mtp_graphs), "errors": runner.graph_errors}
    print(json.dumps(res["graphs"]), flush=True)
    vocab = model.vocab_size
    g = torch.Generator().manual_seed(0)

    def measure(b: int) -> None:
        pages = [RequestPages(runner.layout, runner.pools) for _ in range(b)]
        ctx = args.context
        for p in pages:  # prefill each to ctx (its state, for the attention's reads)
            at = 0
            while at < ctx:
                n = min(2048, ctx - at)
                assert p.grow(at + n)
                ids = torch.randint(0, vocab, (n,), generator=g).tolist()
                runner.run(build_step([Chunk(p, ids, at, "last")], runner.rates))
                at += n
            assert p.grow(ctx + 4)  # frees the window pages no later query reads
        row = {}

        def decode():
            runner.run(build_step([Chunk(p, [1], ctx, "last") for p in pages], runner.rates))

        row["decode_s"] = _time(decode, args.reps)
        hidden = torch.zeros(b * 4, *model.manifest["serving"]["mtp"]["hidden"], dtype=torch.bfloat16, device="cuda")
        for k in (1, 2, 3):
            def verify(k=k):
                runner.run(build_step([Chunk(p, [1] * (k + 1), ctx, "all") for p in pages], runner.rates))

            def catch_up(k=k):
                runner.run_mtp(build_step([Chunk(p, [1] * (k + 1), ctx, "last") for p in pages], runner.rates),
                               hidden[:b * (k + 1)])

            row[f"verify_k{k}_s"] = _time(verify, args.reps)
            row[f"mtp_catch_up_k{k}_s"] = _time(catch_up, args.reps)

        def chained():
            runner.run_mtp(build_step([Chunk(p, [1], ctx + 1, "last") for p in pages], runner.rates), hidden[:b])

        row["mtp_draft_row_s"] = _time(chained, args.reps)
        for k in (1, 2, 3):
            round_s = row[f"verify_k{k}_s"] + row[f"mtp_catch_up_k{k}_s"] + (k - 1) * row["mtp_draft_row_s"]
            row[f"round_k{k}_s"] = round_s
            for alpha in (1.5, 2.0, 2.5):
                if alpha <= k + 1:
                    row[f"speedup_k{k}_alpha{alpha}"] = (alpha / round_s) / (1 / row["decode_s"])
        res[f"B{b}"] = row
        print(json.dumps({f"B{b}": row}), flush=True)
        for p in pages:
            p.release()

    for b in (1, 32):
        measure(b)
    runner.release()


def tiny(args, res: dict) -> None:
    """The trained tiny (tests/mtp_model.py) compiled for the GPU: acceptance and per-user tokens/s."""
    import ds4c
    from ds4c.runtime.sampling import SamplingParams
    from tests.mtp_model import MAX_CONTEXT, mtp_model, save_checkpoint
    from tests.quant.synthetic_language import bigram_batch

    model, successor = mtp_model(150)
    ckpt = save_checkpoint(model, "/tmp/mtp_tiny_ckpt")
    art = ds4c.compile(ckpt, target=args.target, precision="fp32", max_context=MAX_CONTEXT, progress=False,
                       serving={"window_page": 4, "comp_page": 16, "max_chunk": 32, "max_running": 12}, speculative=3)
    art.save("/tmp/mtp_tiny.ds4")
    compiled = ds4c.load("/tmp/mtp_tiny.ds4", device="cuda")
    prompt = bigram_batch(successor, 1, 40, torch.Generator().manual_seed(1))[0].tolist()
    out = {}
    for k in (0, 3):
        engine = ds4c.Engine(compiled, speculative=k)
        engine.generate([prompt], SamplingParams(max_new_tokens=8))  # warm
        t0 = time.perf_counter()
        toks = engine.generate([prompt], SamplingParams(max_new_tokens=200))[0]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        out[f"k{k}"] = {"tokens_per_s": len(toks) / dt, "acceptance_length": engine.stats()["acceptance_length"],
                        "tokens": toks[:16]}
        engine.close()
    out["same_tokens"] = out["k0"]["tokens"] == out["k3"]["tokens"]
    out["speedup"] = out["k3"]["tokens_per_s"] / out["k0"]["tokens_per_s"]
    res["trained_tiny"] = out
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="h200")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--state-budget", type=float, default=8e9)
    ap.add_argument("--artifact", default="/tmp/flash_slice_spec.ds4")
    ap.add_argument("--out", default="speculative.json")
    ap.add_argument("--skip-flash-slice", action="store_true")
    args = ap.parse_args()
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "command": f"python benchmarks/speculative.py --target {args.target}"}
    try:
        if not args.skip_flash_slice:
            flash_slice(args, res)
        tiny(args, res)
    finally:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
