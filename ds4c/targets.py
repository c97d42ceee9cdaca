"""Targets are data: one frozen record of public hardware facts per device the passes plan for.

Passes read these through cost models (roofline time, on-chip capacity, native formats); adding
a device is adding a record. Conventions:

- Peak FLOP/s are *dense* (no 2:4 structured sparsity): NVIDIA and AMD headline figures are
  often sparse, and we halve those. Keys are ``fp32 tf32 bf16 fp16 fp8 int8 fp4`` (``fp32`` is
  the best non-tensor-core / matrix FP32 rate); a key is present only where the hardware has a
  native path for that dtype. ``Target.peak`` says what runs instead where it is absent.
- Bytes are bytes and bandwidths are bytes/s, one direction for links. Vendors write "GB" for
  10**9 bytes (NVIDIA datasheets, so 80 GB is planned as 80e9, a little below what the device
  reports); the ROCm GPU-spec table gives AMD memory in GiB, which we keep.
- Every fact cites a public source. Where a vendor publishes no number (SM count of some parts,
  L2 size) or sources disagree, the comment says "uncertain" and why we chose the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ds4c.errors import TargetError

KB = 1000
KiB = 1024
MiB = 1024**2
GiB = 1024**3
GB = 10**9
TB = 10**12

VENDORS = ("nvidia", "amd", "npu", "cpu")
BACKENDS = ("cuda", "rocm", "npu", "reference")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")

# What a dtype without a native path runs as, best first: FP4 weights are expanded to FP8 (or
# BF16) before the matrix unit sees them, TF32 falls back to FP32, and so on.
_PEAK_FALLBACK = {
    "fp4": ("fp8", "bf16", "fp16"),
    "fp8": ("bf16", "fp16"),
    "int8": ("fp8", "bf16", "fp16"),
    "bf16": ("fp16", "fp32"),
    "fp16": ("bf16", "fp32"),
    "tf32": ("fp32",),
    "fp32": (),
}
_DTYPE_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
    "mxfp8": "fp8", "mxfp4": "fp4", "nvfp4": "fp4", "float4_e2m1fn_x2": "fp4",
}


def canonical_dtype(dtype: str) -> str:
    """``'bfloat16'`` / ``'torch.bfloat16'`` / ``'mxfp4'`` -> ``'bf16'`` / ``'bf16'`` / ``'fp4'``."""
    name = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise TargetError(f"unknown dtype '{dtype}' for peak FLOP/s; valid dtypes: {', '.join(DTYPES)}")
    return name


def peak_dtype(dtype: str) -> str:
    """The peak-FLOP/s key (``DTYPES``) that work on tensors of ``dtype`` runs at: ``canonical_dtype``,
    or ``'fp32'`` for a dtype with no key of its own (float64, integers other than int8, bool)."""
    try:
        return canonical_dtype(dtype)
    except TargetError:
        return "fp32"


class _ReadOnlyDict(dict):
    """A dict that refuses mutation, so a frozen Target stays frozen; pickles and JSON-dumps as a dict."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("target facts are read-only; build a new record with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))


@dataclass(frozen=True)
class NpuFacts:
    """What a scratchpad NPU adds to the common record: tiles must fit ``sram_bytes`` explicitly."""

    matrix_unit: tuple[int, int, int]  # M x N x K of one matrix-unit step (fp16)
    vector_width: int  # fp16 lanes of the vector unit
    sram_bytes: int  # software-managed on-chip buffer per core that vector tiles live in
    dma_bandwidth: float  # bytes/s, HBM <-> on-chip buffers, whole chip
    dtypes: tuple[str, ...]  # dtypes the matrix/vector units compute in

    def __post_init__(self) -> None:
        if len(self.matrix_unit) != 3 or min(self.matrix_unit) <= 0 or min(
                self.vector_width, self.sram_bytes, self.dma_bandwidth) <= 0 or not self.dtypes:
            raise TargetError(f"npu facts {self} must have a 3-d matrix unit, positive sizes and some dtypes")

    def to_dict(self) -> dict[str, Any]:
        return {"matrix_unit": list(self.matrix_unit), "vector_width": self.vector_width,
                "sram_bytes": self.sram_bytes, "dma_bandwidth": self.dma_bandwidth, "dtypes": list(self.dtypes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NpuFacts:
        return cls(tuple(d["matrix_unit"]), int(d["vector_width"]), int(d["sram_bytes"]),  # type: ignore[arg-type]
                   float(d["dma_bandwidth"]), tuple(d["dtypes"]))


@dataclass(frozen=True)
class Target:
    """Public hardware facts of one device. See the module docstring for units and conventions."""

    name: str
    vendor: str  # nvidia | amd | npu | cpu
    backend: str  # cuda | rocm | npu | reference
    arch: str  # sm_90a, sm_100a, gfx942, ...
    triton_target: tuple[Any, ...] | None  # triton GPUTarget(backend, arch, warp_size); None: no Triton
    compute_units: int  # SMs / CUs / AI cores / CPU cores
    warp_size: int  # threads per warp / wavefront; SIMD fp32 lanes on a CPU
    shared_memory_per_block: int  # on-chip bytes one block/workgroup may allocate
    shared_memory_per_unit: int  # on-chip bytes per SM / CU / core
    registers_per_unit: int  # 32-bit registers per SM / CU / core
    l2_bytes: int  # L2 cache, whole chip
    last_level_cache_bytes: int  # L2 on NVIDIA; AMD Infinity Cache (memory-side L3); CPU L3
    hbm_bytes: int  # device memory capacity
    hbm_bandwidth: float  # bytes/s
    host_link: str  # what connects the device to host memory
    host_link_bandwidth: float  # bytes/s, one direction
    peak_flops: Mapping[str, float] = field(default_factory=dict)  # dense, per dtype (see DTYPES)
    native_fp8: bool = False  # matrix unit takes FP8 operands
    native_fp4: bool = False  # matrix unit takes FP4 (MXFP4/NVFP4) operands
    npu: NpuFacts | None = None  # scratchpad facts, only for vendor "npu"
    # what connects this device to its peers in one machine (sharded programs' collectives), and
    # its bandwidth per GPU, one direction, all links together; None: not planned for
    peer_link: str = "none"
    peer_link_bandwidth: float | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_flops", _ReadOnlyDict(self.peak_flops))
        if self.triton_target is not None:
            object.__setattr__(self, "triton_target", tuple(self.triton_target))
        where = f"target record '{self.name}'"
        if self.vendor not in VENDORS:
            raise TargetError(f"{where}: vendor '{self.vendor}' is not one of {', '.join(VENDORS)}")
        if self.backend not in BACKENDS:
            raise TargetError(f"{where}: backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and not value > 0:
                raise TargetError(f"{where}: {f.name} must be positive, got {value}")
        unknown = sorted(set(self.peak_flops) - set(DTYPES))
        if unknown:
            raise TargetError(f"{where}: peak_flops has unknown dtypes {unknown}; use {', '.join(DTYPES)}")
        if "fp32" not in self.peak_flops or not all(v > 0 for v in self.peak_flops.values()):
            raise TargetError(f"{where}: peak_flops needs a positive 'fp32' entry and positive values")
        if self.native_fp8 != ("fp8" in self.peak_flops) or self.native_fp4 != ("fp4" in self.peak_flops):
            raise TargetError(f"{where}: native_fp8/native_fp4 must match the fp8/fp4 entries of peak_flops")
        if (self.vendor == "npu") != (self.npu is not None):
            raise TargetError(f"{where}: npu facts are required for vendor 'npu' and only for it")

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; without a native path, the rate of what it runs as."""
        name = canonical_dtype(dtype)
        for candidate in (name, *_PEAK_FALLBACK[name], "fp32"):
            if candidate in self.peak_flops:
                return self.peak_flops[candidate]
        raise AssertionError("unreachable: every record has fp32")  # __post_init__ guarantees it

    def roofline_seconds(self, flops: float, bytes_moved: float, dtype: str = "bf16") -> float:
        """Lower bound on time: the slower of compute at peak and HBM traffic at full bandwidth."""
        return max(flops / self.peak(dtype), bytes_moved / self.hbm_bandwidth)

    def host_transfer_seconds(self, nbytes: float) -> float:
        """Lower bound on moving ``nbytes`` one way between host memory and the device."""
        return nbytes / self.host_link_bandwidth

    def to_dict(self) -> dict[str, Any]:
        """JSON-able facts; ``Target.from_dict`` gives the record back."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["triton_target"] = list(self.triton_target) if self.triton_target is not None else None
        d["peak_flops"] = dict(self.peak_flops)
        d["npu"] = self.npu.to_dict() if self.npu is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TargetError(f"target facts have unknown fields {unknown}; this ds4c knows {sorted(names)}")
        kw = dict(d)
        if kw.get("triton_target") is not None:
            kw["triton_target"] = tuple(kw["triton_target"])
        if kw.get("npu") is not None:
            kw["npu"] = NpuFacts.from_dict(kw["npu"])
        try:
            return cls(**kw)
        except TypeError as e:
            raise TargetError(f"target facts are incomplete: {e}") from None


# ---------------------------------------------------------------------------------------------
# NVIDIA Hopper
# ---------------------------------------------------------------------------------------------
H100 = Target(
    name="h100",  # H100 SXM5 80GB
    vendor="nvidia",
    backend="cuda",
    arch="sm_90a",  # compute capability 9.0; "a" = Hopper-specific features (wgmma, TMA): CUDA C++ guide
    triton_target=("cuda", 90, 32),
    compute_units=132,  # SMs on H100 SXM5: NVIDIA H100 Tensor Core GPU Architecture whitepaper
    warp_size=32,  # CUDA C++ Programming Guide
    shared_memory_per_block=227 * KiB,  # Hopper Tuning Guide: max 227 KB per thread block
    shared_memory_per_unit=228 * KiB,  # Hopper Tuning Guide: up to 228 KB shared memory per SM
    registers_per_unit=64 * 1024,  # CUDA guide, compute capability 9.0 table: 64K 32-bit registers per SM
    l2_bytes=50 * MiB,  # H100 whitepaper: 50 MB L2 on H100 SXM5
    last_level_cache_bytes=50 * MiB,  # L2 is the last level
    hbm_bytes=80 * GB,  # H100 datasheet: 80 GB HBM3
    hbm_bandwidth=3.35 * TB,  # H100 datasheet (SXM): 3.35 TB/s
    host_link="PCIe Gen5 x16",  # H100 datasheet: PCIe Gen5 128 GB/s (both directions)
    host_link_bandwidth=64 * GB,  # 128 GB/s bidirectional -> 64 GB/s per direction
    peer_link="NVLink 4 (18 links)",  # H100 datasheet (SXM): NVLink 900 GB/s (bidirectional, per GPU)
    peer_link_bandwidth=450 * GB,  # 900 / 2 per direction
    # H100 datasheet (SXM), dense = half of the "with sparsity" figures: TF32 989 -> 494.7 TF,
    # BF16/FP16 1,979 -> 989.4 TF, FP8 3,958 -> 1,978.9 TF, INT8 3,958 -> 1,978.9 TOPS; FP32 67 TF.
    peak_flops={"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12,
                "int8": 1978.9e12},
    native_fp8=True,  # H100 whitepaper: FP8 (E4M3/E5M2) Tensor Cores
    native_fp4=False,  # FP4 Tensor Cores arrive with Blackwell
)

H200 = dataclasses.replace(
    H100,  # H200 is the GH100 die with HBM3e (H200 datasheet): SMs, caches and compute as H100 SXM
    name="h200",
    hbm_bytes=141 * GB,  # H200 datasheet (SXM): 141 GB HBM3e
    hbm_bandwidth=4.8 * TB,  # H200 datasheet (SXM): 4.8 TB/s
    # host link: H200 datasheet, PCIe Gen5 128 GB/s (as H100); peer link: H200 datasheet (SXM),
    # NVLink 900 GB/s (as H100)
)

# ---------------------------------------------------------------------------------------------
# NVIDIA Blackwell (sm_100 family)
# ---------------------------------------------------------------------------------------------
B200 = Target(
    name="b200",  # one GPU of an HGX/DGX B200 (1,000 W configuration)
    vendor="nvidia",
    backend="cuda",
    arch="sm_100a",  # compute capability 10.0: CUDA C++ Programming Guide / Blackwell Tuning Guide
    triton_target=("cuda", 100, 32),
    compute_units=148,  # 74 of 80 SMs enabled per die x 2 dies; NVIDIA publishes no count:
    #                     Chips and Cheese, "Nvidia's B200: Keeping the CUDA Juggernaut Rolling" (measured)
    warp_size=32,
    shared_memory_per_block=227 * KiB,  # Blackwell Tuning Guide: max 227 KB per thread block (cc 10.0)
    shared_memory_per_unit=228 * KiB,  # Blackwell Tuning Guide: 228 KB shared memory per SM
    registers_per_unit=64 * 1024,  # CUDA guide, compute capability 10.0: 64K 32-bit registers per SM
    l2_bytes=126 * MiB,  # uncertain: not in NVIDIA's datasheet; 126 MB measured/reported by Chips and Cheese
    last_level_cache_bytes=126 * MiB,
    hbm_bytes=180 * GB,  # DGX B200 datasheet: 1,440 GB HBM3e for 8 GPUs -> 180 GB usable per GPU
    hbm_bandwidth=8 * TB,  # DGX B200 datasheet: 64 TB/s for 8 GPUs -> 8 TB/s per GPU
    host_link="PCIe Gen5 x16",  # HGX B200 datasheet / Tom's Hardware (Hot Chips 2025): PCIe 5 at 64 GB/s
    host_link_bandwidth=64 * GB,
    peer_link="NVLink 5 (18 links)",  # HGX B200 datasheet: NVLink 1.8 TB/s per GPU (bidirectional)
    peer_link_bandwidth=900 * GB,  # 1.8 TB/s / 2 per direction
    # HGX B200 datasheet, 8 GPUs, sparse -> per GPU dense: FP4 144 PF -> 9 PF, FP8 72 PF -> 4.5 PF,
    # INT8 72 POPS -> 4.5 POPS, BF16/FP16 36 PF -> 2.25 PF, TF32 18 PF -> 1.1 PF (rounded by NVIDIA).
    # FP32 600 TF / 8 = 75 TF (NVIDIA's Blackwell datasheet lists 80 TF: uncertain, we take the lower).
    peak_flops={"fp32": 75e12, "tf32": 1.1e15, "bf16": 2.25e15, "fp16": 2.25e15, "fp8": 4.5e15, "int8": 4.5e15,
                "fp4": 9e15},
    native_fp8=True,
    native_fp4=True,  # Blackwell whitepaper: 5th-generation Tensor Cores with FP4 (NVFP4, MXFP4)
)

B300 = dataclasses.replace(
    B200,  # Blackwell Ultra: same SM design as B200 ("Inside NVIDIA Blackwell Ultra", NVIDIA tech blog, 2025)
    name="b300",  # one GPU of an HGX B300
    arch="sm_103a",  # compute capability 10.3 (CUDA 12.9 release notes: sm_103 for B300/GB300); sm_100 family
    triton_target=("cuda", 103, 32),
    compute_units=160,  # NVIDIA blog above: 160 SMs in the full implementation; uncertain whether every
    #                     shipping B300 enables all 160
    # l2: uncertain, NVIDIA publishes none; assumed as B200 (same die family)
    hbm_bytes=288 * GB,  # NVIDIA blog above / HGX B300 datasheet: 288 GB HBM3e per GPU
    hbm_bandwidth=8 * TB,  # same sources: 8 TB/s
    host_link="PCIe Gen6 x16",  # Tom's Hardware (Hot Chips 2025): PCIe 6 at 128 GB/s
    host_link_bandwidth=128 * GB,  # taken per direction; uncertain whether 128 GB/s is per direction
    peer_link="NVLink 5 (18 links)",  # HGX B300 datasheet: NVLink 1.8 TB/s per GPU (bidirectional)
    peer_link_bandwidth=900 * GB,
    # HGX B300 datasheet, 8 GPUs: FP4 108 PF dense -> 13.5 PF per GPU (NVIDIA quotes 15 PF dense NVFP4
    # for the GB300 version); FP8 72 PF sparse -> 4.5 PF; BF16/FP16 36 PF sparse -> 2.25 PF; TF32
    # 18 PF sparse -> 1.1 PF; FP32 75 TF as B200. INT8 is cut to ~0.32 POPS per GPU (Tom's Hardware,
    # Hot Chips 2025: 0.319 PF); uncertain.
    peak_flops={"fp32": 75e12, "tf32": 1.1e15, "bf16": 2.25e15, "fp16": 2.25e15, "fp8": 4.5e15, "int8": 0.32e15,
                "fp4": 13.5e15},
    notes="Blackwell Ultra trades INT8 and FP64 throughput for FP4.",
)

GB200 = dataclasses.replace(
    B200,  # a B200 GPU of a GB200 Grace Blackwell superchip (1,200 W configuration), NVL72 rack
    name="gb200",
    # compute units: uncertain, NVIDIA publishes none; assumed as B200 (148)
    hbm_bytes=186 * GB,  # GB200 NVL72 datasheet: 13.4 TB HBM3e for 72 GPUs -> 186 GB per GPU
    hbm_bandwidth=8 * TB,  # GB200 NVL72 datasheet: 576 TB/s for 72 GPUs -> 8 TB/s per GPU
    host_link="NVLink-C2C to Grace",  # GB200 datasheet: NVLink-C2C, 900 GB/s bidirectional
    host_link_bandwidth=450 * GB,  # 900 / 2 per direction; uncertain: the superchip's two GPUs share one
    peer_link="NVLink 5 (NVL72 switch)",  # GB200 NVL72 datasheet: 130 TB/s for 72 GPUs = 1.8 TB/s per GPU
    peer_link_bandwidth=900 * GB,  # bidirectional -> per direction
    #                                Grace, so both streaming at once may see less
    # GB200 NVL72 datasheet, per superchip (2 GPUs), sparse -> per GPU dense: FP4 40 PF -> 10 PF,
    # FP8 20 PF -> 5 PF, INT8 20 POPS -> 5 POPS, BF16/FP16 10 PF -> 2.5 PF, TF32 5 PF -> 1.25 PF;
    # FP32 90 TF per GPU (NVIDIA Blackwell datasheet as summarised by G. Lockwood's B200 notes; uncertain).
    peak_flops={"fp32": 90e12, "tf32": 1.25e15, "bf16": 2.5e15, "fp16": 2.5e15, "fp8": 5e15, "int8": 5e15,
                "fp4": 10e15},
)

# ---------------------------------------------------------------------------------------------
# AMD Instinct (CDNA 3 / CDNA 4)
# ---------------------------------------------------------------------------------------------
MI300X = Target(
    name="mi300x",
    vendor="amd",
    backend="rocm",
    arch="gfx942",  # LLVM target: ROCm "AMD GPU specifications" table
    triton_target=("hip", "gfx942", 64),
    compute_units=304,  # ROCm GPU specs: 304 CUs (38 per XCD x 8)
    warp_size=64,  # ROCm GPU specs: wavefront size 64
    shared_memory_per_block=64 * KiB,  # ROCm GPU specs: 64 KiB LDS per CU, all of it one workgroup's
    shared_memory_per_unit=64 * KiB,
    registers_per_unit=512 * KiB // 4,  # ROCm GPU specs: 512 KiB VGPR file per CU
    l2_bytes=32 * MiB,  # ROCm GPU specs: 4 MiB per XCD x 8 (each XCD's L2 is private to it)
    last_level_cache_bytes=256 * MiB,  # ROCm GPU specs / CDNA 3 whitepaper: 256 MB Infinity Cache
    hbm_bytes=192 * GiB,  # ROCm GPU specs: 192 GiB HBM3 (MI300X datasheet: 192 GB)
    hbm_bandwidth=5.3 * TB,  # MI300X datasheet: 5.3 TB/s peak
    host_link="PCIe Gen5 x16",  # MI300X datasheet: PCIe Gen5 x16, 128 GB/s
    host_link_bandwidth=64 * GB,  # per direction
    peer_link="Infinity Fabric (7 links to peers)",  # MI300X datasheet: 128 GB/s peak per Infinity Fabric
    #   link (bidirectional); an 8-GPU platform connects each GPU to the 7 others: 7 x 64 GB/s per direction
    peer_link_bandwidth=448 * GB,  # uncertain: assumes every peer is used at once (all-to-all / ring of 8)
    # MI300X datasheet, dense ("without sparsity") peaks: FP32 matrix 163.4 TF, TF32 653.7 TF,
    # FP16/BF16 1,307.4 TF, FP8 2,614.9 TF, INT8 2,614.9 TOPS.
    peak_flops={"fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12, "fp8": 2614.9e12,
                "int8": 2614.9e12},
    native_fp8=True,  # CDNA 3 whitepaper: FP8 (E4M3/E5M2 FNUZ variants) in the matrix cores
    native_fp4=False,  # FP4/FP6 arrive with CDNA 4
)

MI355X = Target(
    name="mi355x",
    vendor="amd",
    backend="rocm",
    arch="gfx950",  # ROCm GPU specs table
    triton_target=("hip", "gfx950", 64),
    compute_units=256,  # ROCm GPU specs: 256 CUs (32 per XCD x 8)
    warp_size=64,
    shared_memory_per_block=160 * KiB,  # ROCm GPU specs: 160 KiB LDS per CU; uncertain that one workgroup
    #                                     may take all of it (Triton's gfx950 kernels assume so)
    shared_memory_per_unit=160 * KiB,
    registers_per_unit=512 * KiB // 4,  # ROCm GPU specs: 512 KiB VGPR file per CU
    l2_bytes=32 * MiB,  # ROCm GPU specs: 4 MiB per XCD x 8
    last_level_cache_bytes=256 * MiB,  # ROCm GPU specs / CDNA 4 whitepaper: 256 MB Infinity Cache
    hbm_bytes=288 * GiB,  # ROCm GPU specs: 288 GiB HBM3E
    hbm_bandwidth=8 * TB,  # MI355X datasheet: 8 TB/s
    host_link="PCIe Gen5 x16",  # MI355X datasheet: PCIe Gen5 x16
    host_link_bandwidth=64 * GB,
    peer_link="Infinity Fabric (7 links to peers)",  # MI355X datasheet: 153.6 GB/s peak per link (bidir.)
    peer_link_bandwidth=537.6 * GB,  # 7 x 76.8 GB/s per direction; uncertain as for MI300X
    # MI355X datasheet, dense: FP32 157.3 TF, FP16/BF16 2.5 PF (2,516.6 TF), FP8 5.0 PF, INT8 5.0 POPS,
    # MXFP6/MXFP4 10 PF. No TF32 entry: CDNA 4 dropped TF32 hardware in favour of BF16 (AMD's Alan
    # Smith, Chips and Cheese interview on MI350); TF32 falls back to the FP32 rate.
    peak_flops={"fp32": 157.3e12, "bf16": 2516.6e12, "fp16": 2516.6e12, "fp8": 5033.2e12, "int8": 5033.2e12,
                "fp4": 10066.3e12},
    native_fp8=True,  # CDNA 4 whitepaper: FP8 (OCP E4M3/E5M2) and MXFP8
    native_fp4=True,  # CDNA 4 whitepaper: MXFP4 / MXFP6 matrix instructions
)

# ---------------------------------------------------------------------------------------------
# A representative scratchpad NPU
# ---------------------------------------------------------------------------------------------
# Not a product record: a generic NPU for planning and for the TVM backend, modelled on the
# public figures of Huawei's Ascend 910 (Da Vinci "Max" AI core): Huawei Hot Chips 31 talk "Da
# Vinci: A Scalable Architecture for Neural Network Computing" (2019, AnandTech live blog) and
# the Ascend 910 launch figures; Liao et al., "Ascend: a Scalable and Unified Architecture for
# Ubiquitous Deep Neural Network Computing", HPCA 2021. Use it to exercise scratchpad tiling
# and explicit DMA, not to predict the speed of any shipping NPU.
NPU = Target(
    name="npu",
    vendor="npu",
    backend="npu",
    arch="davinci-max",  # representative, not a real compiler arch string
    triton_target=None,  # lowered through TVM, not Triton
    compute_units=32,  # Hot Chips 2019: 32 Da Vinci cores on Ascend 910
    warp_size=1,  # no SIMT; the vector unit's width is in npu.vector_width
    shared_memory_per_block=256 * KiB,  # Unified Buffer per core (HPCA 2021 paper; uncertain, 910-class)
    shared_memory_per_unit=256 * KiB,
    registers_per_unit=32,  # general-purpose scalar registers per core (Ascend C docs: GPR); uncertain
    l2_bytes=32 * MiB,  # on-chip L2 buffer shared by the cores (HPCA 2021 paper); uncertain
    last_level_cache_bytes=32 * MiB,
    hbm_bytes=32 * GB,  # 4 HBM2 stacks, 32 GB on Ascend 910 (launch figures); uncertain
    hbm_bandwidth=1.2 * TB,  # Ascend 910 HBM2 bandwidth 1.2 TB/s (launch figures); uncertain
    host_link="PCIe Gen4 x16",  # Ascend 910 launch figures: PCIe 4.0 x16
    host_link_bandwidth=32 * GB,  # per direction
    # Hot Chips 2019 / Huawei: 256 TFLOPS FP16 and 512 TOPS INT8 (cube: 4096 FP16 or 8192 INT8 MACs
    # per cycle per core, ~1 GHz). FP32 runs only on the vector unit: 64 FP32 lanes x 2 x 32 cores
    # x ~1 GHz ~= 4 TFLOPS (derived, uncertain).
    peak_flops={"fp32": 4e12, "fp16": 256e12, "int8": 512e12},
    native_fp8=False,
    native_fp4=False,
    npu=NpuFacts(
        matrix_unit=(16, 16, 16),  # Hot Chips 2019: 16^3 = 4096 FP16 MACs per cube step
        vector_width=128,  # Hot Chips 2019: 2048-bit vector unit = 128 FP16 lanes
        sram_bytes=256 * KiB,  # Unified Buffer, as shared_memory_per_unit (L1 buffer of 1 MB feeds the cube)
        dma_bandwidth=1.2 * TB,  # bounded by HBM; per-core MTE bandwidth is not published
        dtypes=("fp16", "int8", "fp32"),  # Ascend 910 cube: FP16/INT8; vector: FP16/FP32 (no BF16 on 910)
    ),
    notes="Representative scratchpad NPU modelled on public Ascend 910 (Da Vinci) figures; not a product record.",
)

# ---------------------------------------------------------------------------------------------
# The host CPU (reference backend)
# ---------------------------------------------------------------------------------------------
# Representative server socket, modelled on AMD EPYC 9654 (Zen 4 "Genoa") public specifications
# (AMD EPYC 9004 product page and Zen 4 software optimisation guide). Cost models only use it to
# compare against devices; the reference backend runs wherever torch runs.
CPU = Target(
    name="cpu",
    vendor="cpu",
    backend="reference",
    arch="x86_64",
    triton_target=None,
    compute_units=96,  # EPYC 9654: 96 cores
    warp_size=16,  # AVX-512: 16 fp32 lanes
    shared_memory_per_block=1 * MiB,  # EPYC 9654: 1 MB L2 per core (what one core's tile can live in)
    shared_memory_per_unit=1 * MiB,
    registers_per_unit=32 * 16,  # 32 zmm registers x 16 32-bit lanes
    l2_bytes=96 * MiB,  # 1 MB x 96 cores
    last_level_cache_bytes=384 * MiB,  # EPYC 9654: 384 MB L3
    hbm_bytes=768 * GB,  # illustrative: 12 DIMMs x 64 GB (the platform takes up to 6 TB)
    hbm_bandwidth=460.8 * GB,  # 12 channels DDR5-4800: 12 x 38.4 GB/s
    host_link="host memory",  # the host is the device: "transfers" are memory copies
    host_link_bandwidth=460.8 * GB,
    # Zen 4 executes AVX-512 on two 256-bit FMA pipes: 32 fp32 FLOP/cycle/core x 96 x 2.4 GHz base
    # = 7.4 TF; AVX512_BF16 dot products double that. Derived, not a vendor figure.
    peak_flops={"fp32": 7.4e12, "bf16": 14.7e12},
    notes="Representative host CPU for cost models (EPYC 9654-class); the reference backend runs anywhere.",
)

_TARGETS: dict[str, Target] = {t.name: t for t in (H100, H200, B200, B300, GB200, MI300X, MI355X, NPU, CPU)}


def get_target(name: str | Target) -> Target:
    """The record for ``name`` (a Target passes through unchanged)."""
    if isinstance(name, Target):
        return name
    try:
        return _TARGETS[name.lower()]
    except (KeyError, AttributeError):
        raise TargetError(f"unknown target '{name}'; valid targets: {', '.join(_TARGETS)}") from None


def list_targets() -> list[Target]:
    """All records, NVIDIA first, then AMD, NPU, CPU."""
    return list(_TARGETS.values())


def target_names() -> list[str]:
    return list(_TARGETS)
