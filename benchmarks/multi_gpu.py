"""A sharded artifact on several GPUs of one machine (#31): load time, TTFT, decode step, tokens.

    # one process per GPU (rank 0 writes the report); NVLink multicast stays off
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      torchrun --standalone --nproc-per-node 4 benchmarks/multi_gpu.py --artifact flash-4.ds4 --out mgpu.json
    # the same measurements of an unsharded artifact in one process, for the ratio
    python benchmarks/multi_gpu.py --artifact flash-slice-1.ds4 --out one.json

Per batch size in ``--batch``: TTFT of a ``--prompt``-token prompt (last-position prefill), the
median decode step (CUDA graphs: the collectives are captured with the kernels), output tokens
per second, the greedy tokens (for the comparison with one GPU: same tokens in fp32, top-1
agreement in bf16) and each step's aggregate HBM bound (every rank's weights and state read once
per step, over the ranks' summed bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def greedy_steps(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], list[list[int]], dict]:
    """Greedy generation timed on the GPU: (TTFT of the last-position prefill, seconds of each
    decode step, the tokens per row, the final state)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits, state = model.prefill(ids, logits="last")
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    tokens, steps = [nxt], []
    pos = ids.shape[1]
    for _ in range(new_tokens - 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, state = model.decode(nxt, pos, state)
        torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(nxt)
        pos += 1
    return ttft, steps, torch.cat(tokens, dim=1).tolist(), state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="multi_gpu.json")
    args = ap.parse_args()

    import ds4c
    from ds4c.targets import Target

    t0 = time.perf_counter()
    model = ds4c.load(args.artifact, device="cuda", progress=False)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    rank = int(model.manifest.get("rank", 0))
    world = int((model.manifest.get("mesh") or {}).get("world", 1))
    target = Target.from_dict(model.manifest["target"])
    weight_bytes = sum(t.numel() * t.element_size() for t in model.weights.values())
    res: dict = {"artifact": args.artifact, "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
                 "gpus": world, "mesh": model.manifest.get("mesh"), "torch": torch.__version__, "load_s": load_s,
                 "weight_bytes_per_rank": weight_bytes, "env": {k: os.environ.get(k) for k in (
                     "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}, "runs": {}}
    gen = torch.Generator().manual_seed(0)
    for b in (int(x) for x in args.batch.split(",")):
        ids = torch.randint(0, model.vocab_size, (b, args.prompt), generator=gen).to("cuda")
        model.prefill(ids[:, :16], logits="last")  # warm: kernels and graphs of this batch
        ttft, steps, tokens, state = greedy_steps(model, ids, args.new_tokens)
        steady = sorted(steps[3:] or steps)
        step = steady[len(steady) // 2]
        state_bytes = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        bound = (weight_bytes + state_bytes) / target.hbm_bandwidth  # each rank reads its own, in parallel
        res["runs"][str(b)] = {"ttft_s": ttft, "decode_step_s": step, "tokens_per_s": b / step,
                               "hbm_bound_step_s": bound, "vs_bound": bound / step,
                               "tokens": tokens}
        if rank == 0:
            print(json.dumps({"batch": b, "ttft_ms": ttft * 1e3, "step_ms": step * 1e3, "vs_bound": bound / step}),
                  flush=True)
        del state
        torch.cuda.empty_cache()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
