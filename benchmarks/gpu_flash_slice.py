"""flash-slice on a GPU: compile here-or-there, load with preset weights generated on the device, generate.

    PYTHONPATH=. python benchmarks/gpu_flash_slice.py --out flash_slice.json

Reference backend only (no device kernels yet): this checks that a small artifact whose 39 GB of
bf16 weights are *referenced* (preset seed) loads and runs on the GPU, and records the baseline
decode latency the CUDA backend has to beat.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    import ds4c

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="flash_slice.json")
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    t0 = time.time()
    art = ds4c.compile("flash-slice", target="h100", max_context=args.context + 64, progress=False)
    art.save("/tmp/fs.ds4")
    t1 = time.time()
    model = ds4c.load("/tmp/fs.ds4", device="cuda")
    torch.cuda.synchronize()
    t2 = time.time()
    ids = torch.randint(0, 129280, (1, args.context), generator=torch.Generator().manual_seed(0)).cuda()
    torch.cuda.synchronize()
    t3 = time.time()
    logits, state = model.prefill(ids)
    torch.cuda.synchronize()
    t4 = time.time()
    tok = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for i in range(8):
        torch.cuda.synchronize()
        s = time.time()
        logits, state = model.decode(tok, args.context + i, state)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        times.append(time.time() - s)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "compile_s": t1 - t0, "load_s": t2 - t1,
           "weights_gb": art.manifest["weights"]["bytes"] / 1e9, "artifact_mb": __import__("os").path.getsize("/tmp/fs.ds4") / 1e6,
           "prefill_s": t4 - t3, "decode_ms_median": sorted(times)[len(times) // 2] * 1e3,
           "logits_finite": bool(torch.isfinite(logits).all()), "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9}
    print(res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
