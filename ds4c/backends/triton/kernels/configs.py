"""Kernel configurations chosen from the target's facts (``ds4c.targets.Target``), in one place.

Every launcher asks this module for its tile sizes and launch options, given the shapes of the call
and the *kernel target*: the record whose hardware the kernels are built for. The same functions
serve ahead-of-time compilation (``ds4c.backends.triton.aot`` records the launches a program makes
for the artifact's target and ``pdl`` option) and run time (``ds4c.load`` gives the executor the
artifact's target when the device matches it, and the same option), so a stored binary and a live
launch agree on every constexpr.

Which facts matter:

- ``backend`` / ``vendor``: NVIDIA and AMD differ in dot precisions (``tf32``/``tf32x3`` exist only
  on NVIDIA; AMD runs fp32 dots as ``ieee`` on its fp32 MFMA) and in launch options (AMD takes
  ``waves_per_eu``, ``matrix_instr_nonkdim``, ``kpack``; CUDA refuses them);
- ``shared_memory_per_block`` (227 KB on Hopper/Blackwell, 64 KiB of LDS on MI300X, 160 KiB on
  MI355X): tiles of the GEMM-bearing kernels (attention, MoE, indexer scores) must fit, with one
  copy per software-pipeline stage; ``attention_shared_bytes`` etc. estimate what Triton allocates
  and the ahead-of-time compiler checks the real figure against the target;
- ``warp_size`` (32 / 64-wide wavefronts): MFMA tiles want M and N multiples of 16 (16x16 MFMA,
  ``matrix_instr_nonkdim=16``) and K steps of 64 bf16 values with ``kpack=2`` on gfx942 (gfx950
  dropped kpack); one wavefront of 64 lanes holds what one warp of 32 holds on NVIDIA;
- ``compute_units``: how many programs the mHC mix GEMM splits K over (~8 per SM/CU).

NVIDIA records get exactly the configurations measured on an H100 (docs/PERFORMANCE.md): every
NVIDIA target of ds4c has 227 KB of shared memory per block, so the H100 table applies to all.

Launchers are given everything that decides their configuration as one record, a ``KernelContext``
(the kernel target, the device's tuning table, the artifact's ``pdl`` compile option), as their
first argument: the executor that runs a program holds one and hands it to every launch. Nothing
here falls back to another record: whoever builds the executor picks the target (``ds4c.load``
through ``kernel_target``, the ahead-of-time compile the artifact's own).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import triton

from ds4c.backends.triton.kernels.pdl import pdl_enabled, pdl_kwargs
from ds4c.errors import InputError, KernelError
from ds4c.targets import Target, get_target, list_targets

TUNABLE = {  # family -> fields the autotuner may set (see the config functions below)
    "gemv": ("block_n", "split", "num_stages"),
    "row_gemv": ("block_n", "programs_per_sm", "num_warps", "prequant", "prefetch", "pipeline", "row_sums"),
    "moe_decode": ("block_n_up", "block_n_down", "num_stages", "fp8_rows", "row_block_n_up", "row_block_n_down",
                   "row_warps", "act_in_registers", "row_pipeline", "row_sums", "row_paired"),
    "topk": ("select", "num_warps", "chunk"),
    "moe_prefill": ("block_m", "block_n_up", "block_n_down", "block_k", "num_warps", "num_stages"),
}


@dataclass(frozen=True)
class KernelContext:
    """What a launcher is given besides its operands, and all that chooses its tiles and options.

    ``target``: the record whose hardware the kernels are built for (``kernel_target`` at load; the
    artifact's target when compiling ahead of time). ``tuning``: configuration overrides measured on
    the device (``ds4c tune``; family -> field -> value, fields outside ``TUNABLE`` ignored), None
    for the target's defaults. ``pdl``: the artifact's compile option (``ds4c compile --no-pdl``
    turns it off); whether kernels then launch with programmatic dependent launch also depends on
    the hardware (``launches_with_pdl``, ``kernels/pdl.py``).

        ctx = KernelContext(get_target("h100"))
        rms_norm(ctx, x, w, eps=1e-6)            # a registered launcher: the context first
        KernelExecutor(graph, "cuda", context=ctx)   # hands it to every launch
    """

    target: Target
    tuning: Mapping[str, Mapping[str, Any]] | None = None
    pdl: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target):
            raise KernelError(f"KernelContext.target must be a ds4c.targets.Target record (get_target(name)), "
                              f"got {type(self.target).__name__} {self.target!r}")
        if self.target.triton_target is None:
            raise KernelError(f"target '{self.target.name}' has no Triton target: its programs run no Triton kernels")
        if not isinstance(self.pdl, bool):
            raise KernelError(f"KernelContext.pdl must be true or false, got {self.pdl!r}")
        table = MappingProxyType({str(family): MappingProxyType(dict(fields))
                                  for family, fields in (self.tuning or {}).items()})
        object.__setattr__(self, "tuning", table if table else None)

    def tuned(self, family: str) -> dict[str, Any]:
        """The tuning table's overrides for ``family`` (empty: the target's defaults)."""
        fields = (self.tuning or {}).get(family) or {}
        return {k: v for k, v in fields.items() if k in TUNABLE.get(family, ())}

    @property
    def launches_with_pdl(self) -> bool:
        """Whether kernels launch with programmatic dependent launch: the ``pdl`` option and the
        hardware (``pdl.pdl_enabled``)."""
        return pdl_enabled(self.target, self.pdl)


def record_for(triton_target: Sequence[Any]) -> Target | None:
    """The first target record whose Triton target is ``(backend, arch, warp_size)``, if any."""
    want = (str(triton_target[0]), triton_target[1], int(triton_target[2]))
    for t in list_targets():
        if t.triton_target is not None and (t.triton_target[0], t.triton_target[1], t.triton_target[2]) == want:
            return t
    return None


@functools.cache
def device_target() -> Target | None:
    """The record of the GPU Triton compiles for in this process (None under the interpreter or
    without a GPU). An arch without a record of its own (e.g. sm_80) gets its vendor's record of
    the same generation of kernels, ``h100`` or ``mi300x``."""
    live = live_triton_target()
    if live is None:
        return None
    return record_for(live) or get_target("mi300x" if live[0] == "hip" else "h100")


def live_triton_target() -> tuple[str, Any, int] | None:
    """``(backend, arch, warp_size)`` of the device Triton's JIT compiles for, or None without one."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        return None
    from triton.runtime.driver import driver

    t = driver.active.get_current_target()
    return (t.backend, t.arch, t.warp_size)


def kernel_target(artifact_target: Target | dict[str, Any] | str) -> Target:
    """The kernel target for running an artifact compiled for ``artifact_target`` here: the live
    device's record on a GPU of another arch (or for an artifact without Triton kernels), else the
    artifact's own record (on a device of its arch, and under the interpreter)."""
    art = artifact_target if isinstance(artifact_target, Target) else (
        Target.from_dict(artifact_target) if isinstance(artifact_target, dict) else get_target(artifact_target))
    live = device_target()
    if live is not None and tuple(live.triton_target or ()) != tuple(art.triton_target or ()):
        return live
    if art.triton_target is None:
        raise InputError(f"this artifact was compiled for target '{art.name}', which has no Triton kernels, and "
                         "no GPU is here to choose them for: load it with backend='reference', or compile it "
                         "for a GPU target (h100, b200, mi300x, ...)")
    return art


# -- launch options -------------------------------------------------------------------------------

def is_amd(target: Target) -> bool:
    return target.backend == "rocm"


@dataclass(frozen=True)
class Launch:
    """Launch options of one kernel (keyword arguments of ``kernel[grid](...)``), with the
    kernel's ``PDL`` constexpr (``kernels/pdl.py``)."""

    num_warps: int
    num_stages: int | None = None  # None: Triton's default for the backend
    waves_per_eu: int = 0  # AMD: occupancy hint (0 = compiler's choice)
    matrix_instr_nonkdim: int = 0  # AMD: MFMA shape, 16 -> 16x16, 32 -> 32x32 (0 = compiler's choice)
    kpack: int = 1  # AMD gfx942: K elements packed per MFMA operand load

    def kwargs(self, ctx: KernelContext) -> dict[str, Any]:
        """The options for ``ctx``'s target, with its PDL decision (``KernelContext.launches_with_pdl``)."""
        target = ctx.target
        out: dict[str, Any] = {"num_warps": self.num_warps, **pdl_kwargs(ctx.launches_with_pdl)}
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        if is_amd(target):
            if self.waves_per_eu:
                out["waves_per_eu"] = self.waves_per_eu
            if self.matrix_instr_nonkdim:
                out["matrix_instr_nonkdim"] = self.matrix_instr_nonkdim
            if self.kpack != 1 and target.arch == "gfx942":
                out["kpack"] = self.kpack
        return out


def gemm_launch(target: Target, num_warps: int, num_stages: int, dtype: torch.dtype,
                waves_per_eu: int = 0) -> Launch:
    """Options of a GEMM-bearing kernel: on AMD 16x16 MFMAs, kpack=2 for 16-bit operands on gfx942."""
    if not is_amd(target):
        return Launch(num_warps, num_stages)
    kpack = 2 if dtype != torch.float32 and target.arch == "gfx942" else 1
    return Launch(num_warps, num_stages, waves_per_eu=waves_per_eu, matrix_instr_nonkdim=16, kpack=kpack)


def dot_precision(dtype: torch.dtype, target: Target) -> str:
    """``input_precision`` of ``tl.dot`` on ``dtype`` operands: fp32 exactly (``ieee``) for fp32;
    for 16-bit operands the backend's default (the products are exact either way)."""
    if dtype == torch.float32 or is_amd(target):
        return "ieee"
    return "tf32"


def fp32_gemm_precision(target: Target) -> str:
    """fp32-accurate dot on fp32 operands, fastest form: tf32x3 on NVIDIA tensor cores (~1e-7
    relative, 3x faster than FMA on an H100); AMD's fp32 MFMA is exact ``ieee``."""
    return "ieee" if is_amd(target) else "tf32x3"


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- attention ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # (query, head) rows per tile
    block_t: int  # keys per step of the online softmax
    block_d: int  # chunk of D in the Q·Kᵀ reduction
    block_dv: int  # output columns per program
    num_warps: int
    num_stages: int
    launch: Launch = field(default=Launch(4), compare=False)


def attention_shared_bytes(cfg: AttentionConfig, head_dim: int, dtype: torch.dtype, skip_masked: bool) -> int:
    """Upper estimate of the shared memory / LDS a config allocates: pipelined (decode), every D
    chunk of Q and K and the V slice once per stage; unpipelined (S > 1), one chunk of each."""
    d_pad = max(16, triton.next_power_of_2(head_dim))
    e = _elem(dtype)
    if skip_masked or cfg.num_stages <= 1:
        return e * (cfg.block_m * cfg.block_d + cfg.block_t * cfg.block_d + cfg.block_t * cfg.block_dv) \
            + 4 * cfg.block_m * cfg.block_t
    return cfg.num_stages * e * (cfg.block_m * d_pad + cfg.block_t * d_pad + cfg.block_t * cfg.block_dv)


def attention_config(head_dim: int, dtype: torch.dtype, skip_masked: bool,
                     target: Target) -> AttentionConfig:
    """Tile sizes from (D, dtype, whether masked blocks are skipped) and the target.

    NVIDIA (measured on an H100, triton 3.6): Triton software-pipelines the T loop only without the
    block-skipping branch (decode), and then keeps ``num_stages`` copies of every D chunk of Q and K
    and of the V slice in shared memory. D=512 bf16 decode (block_t=32): 164 KB shared, 172
    registers, no spills; block_t=64 asked for 264 KB and failed to launch (an H100 block may use
    227 KB). With skipping (S > 1) nothing is pipelined and one chunk lives at a time, so prefill
    takes block_t=64 and the whole 512-column output per program (64x512 fp32 accumulator over 8
    warps: 64 KB shared, 255 registers, a few spills), 1.7x faster than two 256-column programs at
    S=T=2048. fp32 (tests, reference checks) runs unpipelined: 168 KB shared at D=512.

    AMD: the same tiles while they fit the LDS (MI355X: 160 KiB), else the largest that do with
    block_m=64 (a multiple of the 16x16 MFMA): first without software pipelining (one D chunk of
    Q and K live at a time), then halving the output slice, the D chunk and the key block; 4
    wavefronts of 64 lanes, ``waves_per_eu=2``.
    """
    d_pad = max(16, triton.next_power_of_2(head_dim))
    if d_pad <= 128:
        base = AttentionConfig(64, 64, d_pad, d_pad, 4, 2)
    elif dtype == torch.float32:
        base = AttentionConfig(64, 32, 64, min(256, d_pad), 8, 1)
    elif skip_masked:
        base = AttentionConfig(64, 64, 128, min(512, d_pad), 8, 2)
    else:
        base = AttentionConfig(64, 32, 128, 256, 8, 2)
    if not is_amd(target):
        return AttentionConfig(*_fields(base), launch=gemm_launch(target, base.num_warps, base.num_stages, dtype))
    limit = target.shared_memory_per_block
    cfg = AttentionConfig(base.block_m, base.block_t, base.block_d, base.block_dv, min(base.num_warps, 4),
                          base.num_stages)
    shrink = ("num_stages", "block_dv", "block_d", "block_t")
    while attention_shared_bytes(cfg, head_dim, dtype, skip_masked) > limit:
        for name in shrink:
            value = getattr(cfg, name)
            floor = 1 if name == "num_stages" else 16
            if value // 2 >= floor and not (name == "num_stages" and value == 1):
                cfg = _replace(cfg, **{name: value // 2 if name != "num_stages" else value - 1})
                break
        else:
            break  # smallest tiles; the ahead-of-time compiler reports what Triton allocates
    return _replace(cfg, launch=gemm_launch(target, cfg.num_warps, cfg.num_stages, dtype, waves_per_eu=2))


def _fields(cfg: Any) -> tuple[Any, ...]:
    return tuple(getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "launch")


def _replace(cfg: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# -- MoE ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoeConfig:
    block_m: int  # sorted (token, pick) rows per program: all of one expert's rows in decode
    block_n_up: int  # columns of each of the gate and up halves per program
    block_n_down: int  # hidden columns per program of the down GEMM
    block_k: int  # reduction step
    num_warps: int
    num_stages: int
    launch: Launch = field(default=Launch(4), compare=False)


def moe_shared_bytes(cfg: MoeConfig, dtype: torch.dtype) -> int:
    """Shared memory / LDS of the larger (gate_up) GEMM: A tile and both weight tiles per stage."""
    e = _elem(dtype)
    gate_up = cfg.block_k * (cfg.block_m + 2 * cfg.block_n_up)
    down = cfg.block_k * (cfg.block_m + cfg.block_n_down)
    return max(1, cfg.num_stages) * e * max(gate_up, down)


def moe_config(pairs: int, experts: int, dtype: torch.dtype, target: Target,
               tuned: dict[str, Any] | None = None) -> MoeConfig:
    """Tiles from the mean rows per expert (pairs / experts), the dtype and the target.

    NVIDIA (measured on an H100, triton 3.6, V4-Flash shapes: 256 experts, D=4096, I=2048, top-6,
    bf16, CUDA-graph replays). Decode (under 8 rows per expert on average) is bound by the selected
    experts' weight bytes (50 MB each): block_m=16 (tl.dot's minimum) holds an expert's tokens in
    one block and narrow N tiles spread one expert over many SMs (gate_up 2048/32, down 4096/64 =
    64 programs each). 1 / 8 / 32 tokens: 0.21 / 0.79 / 2.1 ms for the whole op (routing and shared
    expert 0.07 ms), about 3.1-3.3 TB/s from 8 tokens on; other N and K tiles and stage counts were
    within 2%. Prefill (2048 tokens, ~48 rows per expert, every expert read once): 64 x (2x128) and
    64 x 256 tiles over 8 warps, 3 stages (40 KB of shared memory per stage): 5.7 ms, against 6.3
    ms for 64 x (2x64) / 64 x 128 over 4 warps and 6.3 ms for block_m=128. fp32 (tests, reference
    checks) keeps small tiles and 2 stages: its ieee dots run on the FMA units.

    AMD: 2 pipeline stages (the stream pipeliner's double buffer), N tiles halved and K steps
    shortened until both stages fit the LDS; 16x16 MFMAs.

    ``tuned`` (the ``moe_prefill`` family of a tuning table) overrides the prefill tiles (8+ rows
    per expert on average); ``benchmarks/moe_prefill_bench.py`` sweeps them. Its sweep on an H100
    (2026-12-07): the default 5.48 ms for the whole op against a 3.85 ms weight-read floor; the best
    of 11 other tiles 5.44 ms (64 x (2x256)), none past 0.71 of the floor.
    """
    fp32 = dtype == torch.float32
    if pairs < 8 * experts:
        base = MoeConfig(16, 32, 64, 64 if fp32 else 128, 4, 2 if fp32 else 4)
    elif fp32:
        base = MoeConfig(64, 64, 128, 32, 4, 2)
    else:
        base = MoeConfig(64, 128, 256, 64, 8, 3)
    if tuned and pairs >= 8 * experts:
        base = _replace(base, **{k: int(v) for k, v in tuned.items()})
    if not is_amd(target):
        return MoeConfig(*_fields(base), launch=gemm_launch(target, base.num_warps, base.num_stages, dtype))
    cfg = _replace(base, num_stages=min(base.num_stages, 2))
    while moe_shared_bytes(cfg, dtype) > target.shared_memory_per_block:
        if cfg.block_n_up > 32:
            cfg = _replace(cfg, block_n_up=cfg.block_n_up // 2, block_n_down=cfg.block_n_down // 2)
        elif cfg.block_k > 32:
            cfg = _replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.num_stages > 1:
            cfg = _replace(cfg, num_stages=1)
        else:
            break
    return _replace(cfg, launch=gemm_launch(target, cfg.num_warps, cfg.num_stages, dtype))


@dataclass(frozen=True)
class MoeDecodeConfig:
    """Tiles of the per-pair decode path (``moe`` with a few tokens): GEMVs, no tensor cores."""

    max_pairs: int  # the path applies up to this many (token, pick) pairs
    block_n_up: int  # columns of each of the gate and up halves per program
    block_n_down: int  # hidden columns per program of the down GEMV
    block_k: int  # reduction step (<= 128: FP8 scale blocks)
    launch: Launch = field(default=Launch(4), compare=False)
    # FP8 expert weights (128x128 block scales): the CUDA-core row kernel (linear.row_dot) instead
    # of the 16-row tensor-core tile, with these tiles
    fp8_rows: bool = True
    row_block_n_up: int = 8
    row_block_n_down: int = 16
    row_launch: Launch = field(default=Launch(2, 3), compare=False)
    # FP8 activations with the row kernels: 1 quantises the token's row in every program
    # (row_dot's ACT_FP8), 0 once before each GEMV (act_quant: two ~3 us kernels per MoE)
    act_in_registers: int = 0
    # row_dot's STAGES and ROW_SUMS; row_paired: gate and up rows in one loop (one tile per step).
    # These defaults are the loop before 2026-12-03; moe_decode_config chooses per target.
    row_pipeline: int = 0
    row_sums: int = 0
    row_paired: int = 0


def moe_decode_config(dtype: torch.dtype, ctx: KernelContext) -> MoeDecodeConfig:
    """Decode (a few tokens): one program per (pair, column block), reading its expert's rows once.

    Up to ``max_pairs`` pairs the picked experts rarely repeat (V4-Flash: 6 of 256 per token), so
    grouping tokens by expert would save no bytes and costs a sort on the device; past it, the
    grouped kernels share each expert's tile among its tokens. The tiles are the grouped kernels'
    measured decode tiles (``moe_config``): 32 gate/up columns, 64 down columns, 128-wide K steps
    (one FP8 scale block), 4 warps, 4 stages — for V4-Flash and one token 448 programs per GEMV.

    FP8 expert weights take the one-row CUDA-core kernel of the dense FP8 GEMV (``row_dot``, two
    warps; 8 gate/up rows of each half, 16 down rows per program): the tile path
    converted every e4m3 tile to bf16 for a 16-row dot of which one row is real, and streamed
    FP8 experts at 1.8 TB/s on an H200. Measured there (2026-12-03, benchmarks/moe_decode_bench.py,
    flash-slice widths, one token, router to combine): bf16 108 us, FP8 tile 98.6 us, FP8 rows
    82.9 us with these tiles, the fastest of 27 (8-32 up rows x 16-64 down rows x 1-4 warps;
    16/32 rows on one warp: 99 us). FP8 activations (``act``) are quantised once per GEMV input
    before the row kernels (``act_in_registers`` = 0), not in every program, where each 128-input
    amax serves only 8 rows of work: graphed FP8 flash-slice decode step 1.335 ms quantising in
    registers, 1.113 ms quantising first (H200, 2026-12-03, two machines whose bf16 steps were
    1.139 / 1.151 ms). The row kernels' K loop is software-pipelined over 3 stages (``row_pipeline``;
    0 on AMD, unmeasured there) and each gate/up program reads its gate and up rows interleaved in
    one loop (``row_paired``): one MoE 77.3 us -> 61.0 us (2.9 TB/s), the best of 96 (tiles x warps
    x pipeline x row sums x pairing; per-step row sums, ``row_sums``, 61 -> 65 us here); graphed
    FP8 flash-slice decode step 1.145 -> 1.021 ms with these and the one-row GEMV's pipelining
    (H200, 2026-12-03, same run; docs/PERFORMANCE.md).
    """
    target = ctx.target
    fp32 = dtype == torch.float32
    t = ctx.tuned("moe_decode")
    return MoeDecodeConfig(24, t.get("block_n_up", 32), t.get("block_n_down", 64), 64 if fp32 else 128,
                           launch=Launch(4, t.get("num_stages", 2 if fp32 or is_amd(target) else 4)),
                           fp8_rows=bool(t.get("fp8_rows", not is_amd(target))),
                           row_block_n_up=t.get("row_block_n_up", 8), row_block_n_down=t.get("row_block_n_down", 16),
                           row_launch=Launch(t.get("row_warps", 2), 3),
                           act_in_registers=int(t.get("act_in_registers", 0)),
                           row_pipeline=int(t.get("row_pipeline", 0 if is_amd(target) else 3)),
                           row_sums=int(t.get("row_sums", 0)), row_paired=int(t.get("row_paired", 1)))


# -- indexer scores -------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexScoresConfig:
    block_h: int  # indexer heads per GEMM tile (M)
    block_c: int  # compressed entries per program (N)
    block_d: int  # reduction chunk
    launch: Launch


def index_scores_config(heads: int, head_dim: int, dtype: torch.dtype,
                        target: Target) -> IndexScoresConfig:
    """Heads on M (16..64), entries on N (64 fp32 / 128 16-bit), D in chunks of up to 128; 4 warps,
    2 stages. AMD: the entry block halves until both stages of Q and K chunks fit the LDS."""
    block_h = max(16, min(64, triton.next_power_of_2(heads)))
    block_d = max(16, min(128, triton.next_power_of_2(head_dim)))
    block_c = 64 if dtype == torch.float32 else 128
    stages = 2
    if is_amd(target):
        e = _elem(dtype)
        while stages * e * block_d * (block_h + block_c) > target.shared_memory_per_block and block_c > 16:
            block_c //= 2
    return IndexScoresConfig(block_h, block_c, block_d, gemm_launch(target, 4, stages, dtype))


# -- top-k of the indexer scores --------------------------------------------------------------------

TOPK_MAX_ENTRIES = 16384  # the select and bitonic forms hold a row's keys in registers: up to ctx 64K at ratio 4
TOPK_CHUNK = 4096  # entries per first-stage program of the chunked select


@dataclass(frozen=True)
class TopkConfig:
    select: int  # 1: bitwise search of the k-th largest key in registers, then one compaction;
    #              2: chunked (each chunk's k largest, then the k largest of those; rows of any length); 0: bitonic top-k
    launch: Launch
    chunk: int = TOPK_CHUNK  # the chunked select's first-stage chunk


def topk_config(entries: int, ctx: KernelContext) -> TopkConfig:
    """How the k largest of a row of ``entries`` scores are picked (``compress.top_indices``).

    The bitonic top-k (``tl.topk``) sorts the whole row in the program: ~log2(n)^2/2 compare-exchange
    steps over n keys. The select form finds the k-th largest key with 32 counting passes (one per
    bit) and writes the chosen indices in index order with one prefix sum: O(32 n), no sort. The set
    is the same (ties to the smaller index); the order differs, which ``indexer.topk``'s consumers
    do not use. Measured on an H200 (``benchmarks/topk_bench.py``, k=512, one launch in a CUDA
    graph): 528 entries (ctx 2K decode) 6.3 us vs bitonic 13.3 us; 2064: 10.8 vs 62 us; 8208 (ctx
    32K): 26.6 vs 267 us; 2048 rows x 528 (prefill) 25 vs 169 us; torch.topk 22 / 31 / 56 / 117 us.
    So select up to ``TOPK_MAX_ENTRIES`` entries (both in-register forms hold the padded row);
    warps for the padded row n: 4 up to 8192, then n / 2048 (8208 entries pad to 16384: 8 warps
    26.6 us, 16 warps 30.9 us, 4 warps 44.1 us). Longer rows (ctx 64K and up at ratio 4) take the
    chunked select: chunks of ``TOPK_CHUNK`` entries side by side, 8 warps each, then the same
    select over their candidates. H100: 16400 entries 22.1 us (torch.topk 85.5 us), 65552 entries
    38.5 us (64.5), 32 rows x 16400 25.2 us (68.6); 4 / 16 / 32 warps per chunk were slower but for
    32 rows (4 warps 24.9 us). A one-program radix select streaming the row in tiles took 74 us
    and 251 us for the first two."""
    n = triton.next_power_of_2(max(entries, 16))
    t = ctx.tuned("topk")
    select = int(t.get("select", 1 if n <= TOPK_MAX_ENTRIES else 2))
    if n > TOPK_MAX_ENTRIES and select != 2:
        # too long for registers: chunked whatever the table says (its warps were for another form)
        return TopkConfig(select=2, launch=Launch(8), chunk=int(t.get("chunk", TOPK_CHUNK)))
    if select == 2:
        warps = int(t.get("num_warps", 8))
    else:
        warps = int(t.get("num_warps", min(32, max(4, n // 2048))))
    return TopkConfig(select=select, launch=Launch(warps), chunk=int(t.get("chunk", TOPK_CHUNK)))


# -- compress, mHC, RMSNorm, RoPE (memory-bound: the same tiles on every target) ------------------

COMPRESS_TILE_ELEMENTS = 4096  # slots x channels loaded per step of ``compress``


def compress_config(slots: int, dim: int) -> tuple[int, int, Launch]:
    """(block_s, block_d, launch) of the pooling kernel: every slot in one tile where ~4K elements
    leave at least 16 channels per program (V4: CSA's 8 slots x 512 channels, HCA's 128 x 32),
    else 16-channel programs stepping over the slots; 4 warps."""
    slots_p2 = triton.next_power_of_2(slots)
    block_d = min(triton.next_power_of_2(dim), max(16, COMPRESS_TILE_ELEMENTS // slots_p2))
    block_s = max(1, min(slots_p2, COMPRESS_TILE_ELEMENTS // block_d))
    return block_s, block_d, elementwise_launch(4)


MHC_BLOCK_T = 16  # tokens per mix program (tl.dot's minimum M)
MHC_BLOCK_K = 64  # K step of the mix GEMM
MHC_PROGRAMS_PER_UNIT = 8  # mix programs per SM / CU to aim for when choosing the K split


def mhc_mix_programs(target: Target) -> int:
    """Mix programs to aim for: ~8 per SM/CU, rounded down to a power of two (H100: 132 SMs -> 1024)."""
    return _pow2_floor(MHC_PROGRAMS_PER_UNIT * target.compute_units)


def mhc_mix_launch(target: Target) -> tuple[str, Launch]:
    """(dot precision, launch) of the mix GEMM: fp32-accurate dots, 4 warps. NVIDIA: three tf32
    tensor-core products (hi·hi + hi·lo + lo·hi), the fp32 linear to ~1e-7 relative and 3x faster
    than "ieee" (FMA units) on an H100: mix of 2048 tokens 0.12 ms vs 0.59 ms, 1 token 8 vs 16 us."""
    return fp32_gemm_precision(target), gemm_launch(target, 4, None, torch.float32)  # type: ignore[arg-type]


def elementwise_launch(nvidia_warps: int) -> Launch:
    """Launch of a memory-bound kernel measured with ``nvidia_warps`` warps of 32 on an H100: the
    same warp count on every target: on AMD these are 64-lane wavefronts (4 -> 256 lanes, the usual
    workgroup size there), and one-warp kernels keep their reductions in one wavefront."""
    return Launch(nvidia_warps)


def rms_norm_config(rows: int, dim: int, max_block_d: int) -> tuple[int, int, Launch]:
    """(block_r, block_d, launch): a row of up to ``max_block_d`` channels read once, ~2K elements
    per program for narrow rows (per-head q/kv norms, D=64..512); 4 warps up to 2K elements, else 8."""
    block_d = min(triton.next_power_of_2(dim), max_block_d)
    block_r = max(1, min(triton.next_power_of_2(rows), 2048 // block_d))
    return block_r, block_d, elementwise_launch(4 if block_r * block_d <= 2048 else 8)


def rope_config(dim: int, rope_dim: int) -> tuple[int, int, int, Launch]:
    """(block_r, block_nope, block_p, launch): rows per program so a program moves ~1K pairs/columns."""
    block_p = triton.next_power_of_2(rope_dim // 2)
    block_nope = min(triton.next_power_of_2(max(dim - rope_dim, 1)), 512)
    block_r = max(1, min(16, 1024 // max(block_p, block_nope)))
    return block_r, block_nope, block_p, elementwise_launch(4)
