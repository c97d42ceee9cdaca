"""What is verified for each target, here (CPU, CI) and on hardware: the one list ``ds4c targets``
and the README's "Verified where" table show. Update it with the evidence (test, benchmark, date)
whenever a claim changes; ``tests/test_targets.py`` checks every target has an entry."""

from __future__ import annotations

# backend -> (verified on this CPU machine / in CI, what needs (or got) the hardware)
BY_BACKEND: dict[str, tuple[str, str]] = {
    "reference": ("everything: the reference backend runs every artifact", "-"),
    "cuda": ("compile; Triton kernels compiled ahead of time (cubin + PTX + source in the artifact) and checked "
             "against each op's reference in Triton's interpreter; artifacts run on CPU",
             "H100 (2026-11-22/25): fp32 logits vs transformers <= 3.7e-6 with kernels + CUDA graphs + streams, "
             "greedy tokens equal; stored cubins loaded without JIT (same Triton); speed in docs/PERFORMANCE.md. "
             "Not run: H200, Blackwell (sm_100a cubins untested on a device)"),
    "rocm": ("compile; every kernel compiled to hsaco for the arch with AMD tiles (MFMA present in GEMM kernels); "
             "tiny's mi300x artifact equals the reference backend through Triton's interpreter with AMD configs",
             "not run on an AMD GPU: the HIP build of PyTorch path (device 'cuda') is written, never executed"),
    "npu": ("compile through TVM: C source (compiles with gcc) + LLVM host build; the host build runs as the "
            "functional simulator and equals the reference backend (tiny, fp32)",
            "no NPU device: the C kernels have not run on hardware"),
}


def verification(backend: str) -> tuple[str, str]:
    return BY_BACKEND[backend]
