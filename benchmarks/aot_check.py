"""Stored kernel binaries on the GPU: does ``ds4c.load`` use them, and how many JIT compiles remain?

    PYTHONPATH=. python -c "import ds4c; ds4c.compile('tiny', target='h100', precision='fp32').save('/tmp/a.ds4')"
    TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python benchmarks/aot_check.py /tmp/a.ds4

Run in a fresh process with an empty Triton cache. Prints JSON: what the runtime did with the
binaries (``kernel_binaries``), Triton compilations during a generate (a cache miss counts one),
and whether greedy tokens equal the reference backend's.
"""

from __future__ import annotations

import json
import sys

import torch
import triton

import ds4c


def main() -> None:
    misses = {"n": 0}

    def listener(*args, **kwargs):
        misses["n"] += 0 if kwargs.get("cache_hit") else 1
    triton.knobs.compilation.listener = listener
    m = ds4c.load(sys.argv[1], device="cuda")
    r = ds4c.load(sys.argv[1], device="cuda", backend="reference")
    ids = torch.tensor([[1, 2, 3, 4, 5]], device="cuda")
    a, b = m.generate(ids, 8), r.generate(ids, 8)
    print(json.dumps({"kernel_binaries": m.kernel_binaries, "jit_compiles_during_generate": misses["n"],
                      "tokens_equal_reference": bool(torch.equal(a, b)), "kernel_stats": m._executors["decode"].stats()}))


if __name__ == "__main__":
    main()
