"""GPU smoke + exactness check: the reference backend on CUDA equals transformers (fp32) and the CPU run.

    PYTHONPATH=. python benchmarks/gpu_smoke.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _plan_summary(stats: dict) -> dict:
    """An entry point's static buffer plan in a few numbers: arena bytes, results placed / not."""
    how: dict[str, int] = {}
    for counts in stats["results"].values():
        for k, n in counts.items():
            how[k] = how.get(k, 0) + n
    return {"plans": stats["plans"], "arena_bytes": stats["arena_bytes"],
            "captured_arena_bytes": stats["captured_arena_bytes"], "results": how}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_smoke.json")
    args = ap.parse_args()
    import transformers

    import ds4c
    from tests.hf_configs import SMALL_CONFIGS, make_hf_model

    dev = "cuda"
    res: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                 "device": torch.cuda.get_device_name(0), "python": platform.python_version(), "configs": {}}
    for name, cfg in SMALL_CONFIGS.items():
        hf = make_hf_model(cfg, 1234)
        import tempfile

        d = tempfile.mkdtemp()
        hf.save_pretrained(d)
        art = ds4c.compile(d, target="h100", precision="fp32", max_context=96, progress=False)
        art.save(f"{d}/m.ds4")
        model = ds4c.load(f"{d}/m.ds4", device=dev)
        hf = hf.to(dev)
        ids = torch.randint(0, cfg["vocab_size"], (2, 61), generator=torch.Generator().manual_seed(7)).to(dev)
        with torch.no_grad():
            want = hf(ids).logits
        got = model(ids)
        graphed = model(ids)  # the second call of a shape replays a captured CUDA graph
        model.prefill(ids, logits="last")
        last = model.prefill(ids, logits="last")[0]
        hf.generation_config.eos_token_id = None
        t0 = time.time()
        g_hf = hf.generate(ids[:1, :13], max_new_tokens=32, do_sample=False)
        t1 = time.time()
        g_ds = model.generate(ids[:1, :13], max_new_tokens=32)
        t2 = time.time()
        res["configs"][name] = {"max_abs_err_logits": float((got - want).abs().max()),
                                "prefill_graph_max_abs_err": float((graphed - want).abs().max()),
                                "last_logits_max_abs_err": float((last - want[:, -1:]).abs().max()),
                                "prefill_graphs": [str(k) for k in model._prefill_graphs],
                                "prefill_graph_errors": {str(k): v for k, v in model.prefill_graph_errors.items()},
                                "greedy_equal": g_hf.tolist() == g_ds.tolist(),
                                "hf_generate_s": t1 - t0, "ds4c_generate_s": t2 - t1,
                                "ds4c_backend": model.backend, "cuda_graphs": bool(model._graphed),
                                "buffer_plans": {e: _plan_summary(st) for e, st in model.buffer_plans().items()}}
        print(name, res["configs"][name], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
