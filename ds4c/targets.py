"""Targets are data: one frozen record of public hardware facts per device the passes plan for.

Passes read these through cost models (roofline time, on-chip capacity, native formats); adding
a GPU is adding a record. Peak FLOP/s are *dense* (no 2:4 sparsity). Each fact cites its public
source; where a vendor gives a range or the figure is a reading of a chart, the comment says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ds4c.errors import TargetError

TB = 1e12
GB = 1e9
KiB = 1024
MiB = 1024 * 1024


@dataclass(frozen=True)
class NpuFacts:
    matrix_unit: tuple[int, int, int]  # M x N x K of one matrix-unit instruction
    vector_width: int  # lanes (fp16) of the vector unit
    sram_bytes: int  # on-chip scratchpad per core (the unit tiles must fit)
    dma_bandwidth: float  # bytes/s between HBM and scratchpad, per chip
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    name: str
    vendor: str  # nvidia | amd | npu | cpu
    backend: str  # cuda | rocm | npu | reference
    arch: str
    triton_target: tuple[Any, ...] | None  # (backend, arch, warp size) for triton.compile
    compute_units: int  # SMs / CUs / AI cores
    warp_size: int
    shared_memory_per_block: int  # bytes a kernel can use per block / workgroup
    shared_memory_per_unit: int  # bytes per SM / CU
    registers_per_unit: int  # 32-bit registers
    l2_bytes: int
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    host_link_bandwidth: float  # bytes/s, one direction
    peak_flops: dict[str, float] = field(default_factory=dict)  # dense, per dtype
    native_fp8: bool = False
    native_fp4: bool = False
    npu: NpuFacts | None = None
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["triton_target"] = list(self.triton_target) if self.triton_target else None
        return d

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        for fallback in ("bf16", "fp16", "fp32"):
            if fallback in self.peak_flops:
                return self.peak_flops[fallback]
        raise TargetError(f"target {self.name} lists no peak FLOP/s")

    def roofline_seconds(self, flops: float, bytes_moved: float, dtype: str = "bf16") -> float:
        """Lower bound on time: the slower of compute at peak and memory traffic at HBM bandwidth."""
        return max(flops / self.peak(dtype), bytes_moved / self.hbm_bandwidth)


_TARGETS: dict[str, Target] = {}


def _add(t: Target) -> None:
    _TARGETS[t.name] = t


# NVIDIA H100 SXM5 80GB. Source: NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 989 TFLOPS,
# FP8 1,979 TFLOPS, INT8 1,979 TOPS, TF32 495 TFLOPS dense (half the "with sparsity" figures),
# FP32 67 TFLOPS, HBM3 80 GB at 3.35 TB/s, PCIe Gen5 (64 GB/s per direction). NVIDIA Hopper
# Tuning Guide: 132 SMs, 228 KB shared memory per SM (227 KB per block), 64K registers/SM, 50 MB L2.
_add(Target("h100", "nvidia", "cuda", "sm_90a", ("cuda", 90, 32), 132, 32, 227 * KiB, 228 * KiB, 65536,
            50 * MiB, 80 * GB, 3.35 * TB, 64 * GB,
            {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12,
             "int8": 1978.9e12}, native_fp8=True, native_fp4=False))

# NVIDIA H200 SXM 141GB. Source: NVIDIA H200 Tensor Core GPU datasheet (2024): same compute as H100
# SXM; HBM3e 141 GB at 4.8 TB/s; PCIe Gen5. SM/shared-memory facts as Hopper (tuning guide).
_add(Target("h200", "nvidia", "cuda", "sm_90a", ("cuda", 90, 32), 132, 32, 227 * KiB, 228 * KiB, 65536,
            50 * MiB, 141 * GB, 4.8 * TB, 64 * GB,
            {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12,
             "int8": 1978.9e12}, native_fp8=True, native_fp4=False))

# NVIDIA B200 (HGX B200, per GPU). Source: NVIDIA HGX B200 / DGX B200 datasheets (2024-25): per GPU
# FP4 9 PFLOPS dense (18 sparse), FP8 4.5 PFLOPS dense, BF16 2.25 PFLOPS dense, TF32 1.1 PFLOPS dense,
# HBM3e 180 GB usable (192 GB physical) at 8 TB/s. Blackwell Tuning Guide: 228 KB shared memory per
# SM, 64K registers/SM; 148 SMs per B200 (public die descriptions). Host: PCIe Gen5 x16 in HGX B200.
# L2 126 MB (public reports; NOT in the datasheet).
_add(Target("b200", "nvidia", "cuda", "sm_100a", ("cuda", 100, 32), 148, 32, 227 * KiB, 228 * KiB, 65536,
            126 * MiB, 180 * GB, 8 * TB, 64 * GB,
            {"fp32": 75e12, "tf32": 1.1e15, "bf16": 2.25e15, "fp16": 2.25e15, "fp8": 4.5e15, "int8": 4.5e15,
             "fp4": 9e15}, native_fp8=True, native_fp4=True))

# NVIDIA B300 (HGX B300 / Blackwell Ultra, per GPU). Source: NVIDIA HGX B300 datasheet (2025):
# NVFP4 dense ~13.5-15 PFLOPS (datasheet: 14 PF dense FP4 per GPU — we take 14e15), FP8 4.5 PF
# dense, BF16 2.25 PF dense, HBM3e 288 GB at 8 TB/s; PCIe Gen6 x16 (128 GB/s per direction) via
# ConnectX-8. 160 SMs (Blackwell Ultra public descriptions; NOT in the datasheet).
_add(Target("b300", "nvidia", "cuda", "sm_100a", ("cuda", 100, 32), 160, 32, 227 * KiB, 228 * KiB, 65536,
            126 * MiB, 288 * GB, 8 * TB, 128 * GB,
            {"fp32": 75e12, "tf32": 1.1e15, "bf16": 2.25e15, "fp16": 2.25e15, "fp8": 4.5e15, "int8": 0.33e15,
             "fp4": 14e15}, native_fp8=True, native_fp4=True,
            notes="Blackwell Ultra trades INT8/FP64 throughput for FP4; INT8 figure from the B300 datasheet."))

# NVIDIA GB200 (one B200 GPU of a GB200 superchip, NVL72). Source: NVIDIA GB200 NVL72 datasheet
# (2024): per rack 72 GPUs, FP4 720 PF dense? (1,440 PF sparse) -> 10 PF dense per GPU, FP8 5 PF,
# BF16 2.5 PF dense per GPU; HBM3e 13.4 TB per 72 GPUs (186 GB each) at 8 TB/s; NVLink-C2C to Grace
# 900 GB/s bidirectional (450 GB/s per direction).
_add(Target("gb200", "nvidia", "cuda", "sm_100a", ("cuda", 100, 32), 148, 32, 227 * KiB, 228 * KiB, 65536,
            126 * MiB, 186 * GB, 8 * TB, 450 * GB,
            {"fp32": 80e12, "tf32": 1.25e15, "bf16": 2.5e15, "fp16": 2.5e15, "fp8": 5e15, "int8": 5e15,
             "fp4": 10e15}, native_fp8=True, native_fp4=True))

# AMD Instinct MI300X. Source: AMD Instinct MI300X datasheet and CDNA 3 whitepaper (2023): 304 CUs,
# 64 KB LDS per CU, wavefront 64, 256 MB Infinity Cache, 4 MB L2 per XCD, HBM3 192 GB at 5.3 TB/s,
# peak dense BF16/FP16 1,307.4 TFLOPS, FP8 2,614.9 TFLOPS, INT8 2,614.9 TOPS, FP32 matrix 163.4 TFLOPS,
# TF32 653.7 TFLOPS; PCIe Gen5 x16 (64 GB/s per direction). 512 VGPRs x 64 lanes per SIMD, 4 SIMDs/CU.
_add(Target("mi300x", "amd", "rocm", "gfx942", ("hip", "gfx942", 64), 304, 64, 64 * KiB, 64 * KiB, 4 * 512 * 64,
            256 * MiB, 192 * GB, 5.3 * TB, 64 * GB,
            {"fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12, "fp8": 2614.9e12,
             "int8": 2614.9e12}, native_fp8=True, native_fp4=False))

# AMD Instinct MI355X. Source: AMD Instinct MI355X datasheet and CDNA 4 whitepaper (2025): 256 CUs,
# 160 KB LDS per CU, HBM3E 288 GB at 8 TB/s, 256 MB Infinity Cache, peak dense FP16/BF16 2.5 PF,
# FP8 5.0 PF, MXFP6/MXFP4 10 PF, INT8 5.0 POPS, FP32 157.3 TF; PCIe Gen5 x16.
_add(Target("mi355x", "amd", "rocm", "gfx950", ("hip", "gfx950", 64), 256, 64, 160 * KiB, 160 * KiB, 4 * 512 * 64,
            256 * MiB, 288 * GB, 8 * TB, 64 * GB,
            {"fp32": 157.3e12, "tf32": 1.25e15, "bf16": 2.5e15, "fp16": 2.5e15, "fp8": 5.0e15, "int8": 5.0e15,
             "fp4": 10e15}, native_fp8=True, native_fp4=True))

# A representative scratchpad NPU (not a specific product), modelled on public Huawei Ascend 910B
# figures (Ascend 910 paper, Hot Chips 2019; 910B public spec sheets): 32 AI cores, cube unit
# 16x16x16 fp16 MAC per cycle per core, 256-byte (128 x fp16) vector unit, 192 KB unified buffer +
# 1 MB L1 per core (we plan against the unified buffer), 64 GB HBM2e at 1.6 TB/s, ~320 TFLOPS fp16,
# ~640 TOPS int8, PCIe Gen4 x16 host link (32 GB/s). Treat the numbers as illustrative.
_add(Target("npu", "npu", "npu", "scratchpad-npu-v1", None, 32, 1, 192 * KiB, 192 * KiB, 0,
            32 * MiB, 64 * GB, 1.6 * TB, 32 * GB,
            {"fp32": 20e12, "bf16": 320e12, "fp16": 320e12, "int8": 640e12}, native_fp8=False, native_fp4=False,
            npu=NpuFacts((16, 16, 16), 128, 192 * KiB, 1.6 * TB, ("fp16", "bf16", "int8", "fp32")),
            notes="Representative record for a scratchpad NPU; verify against your vendor's data."))

# The host CPU through the reference backend (torch ops). Order-of-magnitude facts for a server
# socket (DDR5, 8 channels ~ 300 GB/s; ~2 TFLOP/s fp32 with AVX-512); used only by cost models.
_add(Target("cpu", "cpu", "reference", "x86_64", None, 1, 1, 0, 0, 0, 32 * MiB, 256 * GB, 300 * GB, 300 * GB,
            {"fp32": 2e12, "bf16": 2e12}, native_fp8=False, native_fp4=False,
            notes="Reference backend; figures are illustrative for cost models only."))


def get_target(name: str) -> Target:
    try:
        return _TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target '{name}'; valid targets: {', '.join(_TARGETS)}") from None


def list_targets() -> list[Target]:
    return list(_TARGETS.values())
