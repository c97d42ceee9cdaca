"""CUDA backend: Triton kernels for ds4c's fused ops, ahead-of-time binaries, the GPU executor.

``kernels`` holds one module per fused-op family; each registers, per IR op name, a launcher with
the op's reference signature (``ds4c.ops``). Ops without a kernel run their torch reference
(cuBLAS for plain GEMMs).
"""
