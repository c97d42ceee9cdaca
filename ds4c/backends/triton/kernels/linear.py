"""``linear.packed`` for a few rows (decode): a GEMV that reads the packed weight bytes.

Decode multiplies one token per sequence by every weight matrix, so its linears are bound by the
weight bytes they read. Reading FP8 (1 byte + a scale per 128x128 block) or INT8 (1 byte + a
scale per row) instead of BF16 halves that traffic, provided nothing expands the weight first:
the tile is loaded in its storage type and converted in registers (exact: every e4m3 and int8
value is a bf16 value; MXFP4's e2m1 nibbles are decoded and scaled by their UE8M0 block scale,
exact in bf16 too); a K step stays inside one 128-wide FP8 scale block, so its partial product
is scaled by one scale per column (a per-element scale gather measured 1.5-3x slower on an H100),
and INT8's row scales multiply the sum.

``y[M, N] = x[M, K] @ wᵀ``, ``w`` [N, K]. A program owns ``block_n`` output columns and one
K-slice of ``k_split`` inputs; with more than one slice each program stores its fp32 partial and
counts itself in on its output tile's counter, and the last to arrive sums the partials in slice
order (deterministic) and writes the output (``split_k_store``): one kernel per linear, where a
torch sum and cast after it cost two more launches per linear in a decode step. Tiles come from
``gemv_config`` (see there).

With FP8 activations (``act="fp8"``: an FP8 weight on sm_90a/sm_100a, see ds4c.quant.activations)
the GEMV quantises its activation tile per row in registers and multiplies e4m3 by e4m3 on the
tensor cores (no weight conversion at all).

More than ``MAX_ROWS`` rows (prefill) is compute-bound: with FP8 activations the FP8 GEMM runs
(inputs quantised once by ``act_quant``, e4m3 tiles on the tensor cores at twice the bf16 rate);
otherwise the launcher declines and the reference (dequantise, cuBLAS) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.act_quant import (
    E8M0_BIAS,
    FP8_SCALE_BLOCK,
    MX_SCALE_BLOCK,
    act_quant,
    e4m3_round,
    mx_fake_quant,
    pow2,
    quantize_rows,
    scale_exponent,
)
from ds4c.backends.triton.kernels.attention import dot_operand, interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import KernelContext, Launch, dot_precision, is_amd
from ds4c.backends.triton.kernels.pdl import prefetch_l2, wait_for_producers
from ds4c.quant.activations import ACT_BLOCK
from ds4c.quant.formats import FP8_BLOCK, MX_BLOCK

MAX_ROWS = 64
SCALE_BLOCK = FP8_BLOCK  # host side; jit code reads FP8_SCALE_BLOCK / MX_SCALE_BLOCK (act_quant)
# scale modes (constexpr SCALE)
NO_SCALE, BLOCK_F32, BLOCK_UE8M0, ROW_F32, MXFP4 = 0, 1, 2, 3, 4
_MODES = {"bf16": NO_SCALE, "fp8-f32scale": BLOCK_F32, "fp8": BLOCK_UE8M0, "int8": ROW_F32, "mxfp4": MXFP4}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GemvConfig:
    block_m: int
    block_n: int
    block_k: int
    k_split: int  # inputs per program (a multiple of block_k)
    num_warps: int
    num_stages: int


def k_split_count(n_blocks: int, steps: int, programs: int, *, min_steps: int) -> int:
    """Slices of K for a GEMV of ``n_blocks`` column tiles and ``steps`` K steps: doubled until the
    grid holds ``programs`` programs or a slice would have fewer than ``min_steps`` steps."""
    split = 1
    while n_blocks * split < programs and steps // (split * 2) >= min_steps:
        split *= 2
    return split


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int, storage_bytes: int = 2,
                **override: int) -> GemvConfig:
    """Tiles for ``m`` rows of an [n, k] weight stored in ``storage_bytes`` per value: 64 columns
    x 128 inputs per step (one FP8 scale block wide), 4 stages, and K split (fp32 partials,
    summed after) until the grid holds about four programs per SM.

    Measured on an H100 (2026-11-25, flash-slice decode, whole CUDA-graph step): this beats
    narrower column tiles without a K split (16-64 columns, 256 inputs for bf16; one program per
    SM), which benchmarks/gemv_tune.py preferred per shape in isolation (FP8 step 2.26 vs 1.99 ms).
    ``override`` replaces any field (the sweep uses it, and ``gemv`` passes the tuning table's
    fields of family ``gemv`` here)."""
    block_m = max(16, triton.next_power_of_2(m))
    block_k = override.get("block_k", 64 if dtype == torch.float32 else 128)
    if storage_bytes == 1 and block_k > SCALE_BLOCK:
        raise ValueError(f"FP8 GEMV steps must stay inside one {SCALE_BLOCK}-wide scale block, got block_k={block_k}")
    block_n = override.get("block_n", 64 if block_m <= 32 else 32)
    steps = triton.cdiv(k, block_k)
    split = override.get("split", k_split_count(triton.cdiv(n, block_n), steps, 4 * sms, min_steps=4))
    k_split = triton.cdiv(steps, split) * block_k
    return GemvConfig(block_m, block_n, block_k, k_split, override.get("num_warps", 4),
                      override.get("num_stages", 2 if dtype == torch.float32 else 4))


@triton.jit
def block_scale(s_ptr, cols, col_ok, s_cols, k0, SCALE: tl.constexpr):
    """Scales of weight rows ``cols`` at input ``k0`` of a matrix with 128x128 block scales
    (``s_cols`` blocks per row of scales): fp32, or UE8M0 exponent bytes when SCALE == 2."""
    s = tl.load(s_ptr + (cols // FP8_SCALE_BLOCK) * s_cols + k0 // FP8_SCALE_BLOCK, mask=col_ok, other=0)
    if SCALE == 2:
        s = tl.exp2(s.to(tl.float32) - E8M0_BIAS)
    return s


_LOCKS: dict[tuple, torch.Tensor] = {}


def split_locks(device: torch.device, count: int) -> torch.Tensor:
    """int32 arrival counters (all zero between launches: the last program of a tile re-arms its
    own) for split-K kernels on the current stream. One set per (device, stream): kernels on one
    stream run one after the other, kernels on two streams never share a counter."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    locks = _LOCKS.get((device, stream))
    if locks is None or locks.numel() < count:
        locks = _LOCKS[(device, stream)] = torch.zeros(max(count, 4096), dtype=torch.int32, device=device)
    return locks


def split_k_buffers(y: torch.Tensor, split: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials [split, *y.shape], arrival counters for ``blocks`` column blocks) of a split-K
    launch writing ``y``; without a split, ``y`` stands in for both unused pointers."""
    if split == 1:
        return y, y
    return torch.empty((split, *y.shape), dtype=torch.float32, device=y.device), split_locks(y.device, blocks)


@triton.jit
def split_k_store(part, p_ptr, y_ptr, lock_ptr, offs, mask, slice_stride, split,
                  SPLIT_K: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """Store a program's fp32 share ``part`` of the output tile at ``offs``. Without a K split it is
    the output (rounded to y's dtype). With one, it goes to its slice of the partials ``p_ptr``;
    the program then counts itself in on the tile's counter (``lock_ptr``, release/acquire), and
    the last of the ``split`` to arrive sums the slices in order, writes y and re-arms the counter."""
    if SPLIT_K:
        pid_k = tl.program_id(1)
        tl.store(p_ptr + pid_k * slice_stride + offs, part, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the count is released
        arrived = tl.atomic_add(lock_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
        if arrived == split - 1:
            total = tl.load(p_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
            for k in range(1, split):
                total += tl.load(p_ptr + k * slice_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs, round_to(total, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)
            tl.atomic_xchg(lock_ptr + tl.program_id(0), 0)
    else:
        tl.store(y_ptr + offs, round_to(part, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, p_ptr, y_ptr, lock_ptr, M, N, K, x_stride, group_rows, k_split, split, s_cols,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr,
                 ACT_FP8: tl.constexpr, SPLIT_K: tl.constexpr, PRECISION: tl.constexpr,
                 INTERPRETER_BF16: tl.constexpr, ACT_FP4: tl.constexpr = False, PDL: tl.constexpr = False):
    wait_for_producers(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    x_ptr += ((pid_n * BLOCK_N) // group_rows) * K  # linear.grouped: the block's group of inputs
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if SCALE == 4:  # MXFP4: decoded and scaled in registers
            w = mxfp4_tile(q_ptr, s_ptr, cols.to(tl.int64), offs_k, k_ok[:, None] & n_ok[None, :], K)
            if ACT_FP4:  # x quantised per row and 32 inputs to MXFP4 (exact in x's dtype), as FP4 cores take it
                x = round_to(mx_fake_quant(x.to(tl.float32), BLOCK_M, BLOCK_K), x_ptr.dtype.element_ty,
                             INTERPRETER_BF16)
        else:
            w = tl.load(q_ptr + cols.to(tl.int64)[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        if SCALE == 1 or SCALE == 2:  # one scale per column in this K step (block_k <= 128)
            s = block_scale(s_ptr, cols, n_ok, s_cols, k0, SCALE)
            if ACT_FP8:  # x quantised per row and 128-block (block_k == 128), e4m3 x e4m3 on the tensor cores
                xq, sx = quantize_rows(x.to(tl.float32))
                acc += tl.dot(xq, w) * (sx[:, None] * s[None, :])
            else:
                w = storage_to_dot(w, x_ptr.dtype.element_ty, INTERPRETER_BF16)
                acc += tl.dot(dot_operand(x, INTERPRETER_BF16), w, input_precision=PRECISION) * s[None, :]
        else:
            w = storage_to_dot(w, x_ptr.dtype.element_ty, INTERPRETER_BF16)
            acc = tl.dot(dot_operand(x, INTERPRETER_BF16), w, acc, input_precision=PRECISION)
    if SCALE == 3:
        acc = acc * tl.load(s_ptr + cols, mask=n_ok, other=0.0)[None, :]
    split_k_store(acc, p_ptr, y_ptr, lock_ptr, offs_m[:, None] * N + cols[None, :], m_ok[:, None] & n_ok[None, :],
                  M * N, split, SPLIT_K, INTERPRETER_BF16)


@dataclass(frozen=True)
class RowGemvConfig:
    block_n: int
    k_split: int  # inputs per program (a multiple of SCALE_BLOCK)
    num_warps: int
    num_stages: int
    prequant: int  # FP8 activations: 1 quantises the row first (act_quant), 0 in every program
    prefetch: int = 1  # 1: L2 prefetch of the program's first weights before waiting for x (with PDL)
    prefetch_k: int = 0  # inputs of its slice each program prefetches (prefetch_inputs); 0: none
    # the K loop's form (row_dot); these defaults are the loop before 2026-12-03, row_gemv_config
    # chooses per target and size
    pipeline: int = 0  # row_dot's STAGES: K loop software-pipelined over this many stages; 0: not
    row_sums: int = 0  # 1: row_dot sums each step over K (per-row accumulators)


# The share of L2 the prefetches of one GEMV may fill: every program asks for its first weights at
# once, and lines marked evict_last that do not fit are fetched twice (an LM head's 530 MB would
# be). flash-slice's linears (up to 32 MB) fit whole on a 50 MB L2, as `ds4c tune` measured them.
PREFETCH_L2_SHARE = 0.75


def prefetch_inputs(n: int, k_split: int, l2_bytes: int, split: int = 1) -> int:
    """Inputs (a multiple of 128) of its K slice each program of a one-row FP8 GEMV over ``n``
    weight rows and ``split`` K slices prefetches: the whole slice while all programs' prefetches
    together (``n * split`` of them per input) stay within ``PREFETCH_L2_SHARE`` of L2, else as many
    128-wide steps as fit (at least one)."""
    steps = int(l2_bytes * PREFETCH_L2_SHARE) // max(1, n * split * SCALE_BLOCK)
    return min(k_split, max(1, steps) * SCALE_BLOCK)


def row_gemv_config(n: int, k: int, sms: int, l2_bytes: int = 50 << 20, amd: bool = False,
                    **override: int) -> RowGemvConfig:
    """Tiles of the one-row FP8 GEMV: 32 weight rows x 128 inputs per step, one warp per program
    (the activation block's amax is then a warp shuffle, not a trip through shared memory), the K
    loop pipelined over 3 stages (4, with per-step row sums, past 64M values; ``pipeline``,
    ``row_sums``), K split until the grid holds 8 programs per SM (4 for weights over 16M values).
    ``num_stages`` is the launch option only: it does not pipeline this dot-less loop.

    Measured on an H200 (2026-12-02, benchmarks/fp8_gemm_bench.py, every dense linear of
    flash-slice, CUDA-graph replays): with FP8 activations 11.6-14.4 us on the 32M-value weights
    (2.3-2.9 TB/s; cuBLAS bf16 18.7-21.9 us, the tensor-core tile GEMV 20-21 us, 4 warps 21-24 us),
    and within 11% of the best of 36 tilings on every shape. Quantising the row first in a
    separate kernel (``prequant``) was no faster. On the LM head (129280 x 4096) 16-row tiles with
    the row quantised first measured 154 us in isolation against 173 us with these (cuBLAS bf16:
    244 us; H200, 2026-12-03), but the graphed decode step with an FP8 head got ~55 us slower with
    them (same-run comparisons against FP8 with a bf16 head, two machines), so they are not the
    default. ``prefetch`` (L2 prefetch of each program's weights before it waits for x; only with
    programmatic dependent launch) is on: ``ds4c tune`` on the FP8 flash-slice, H200 2026-12-03,
    graphed decode step 1.208 ms without, 1.117-1.138 ms with (docs/PERFORMANCE.md). Each program
    prefetches its whole slice while the GEMV's prefetches fit in 3/4 of ``l2_bytes``, else its
    first steps (``prefetch_inputs``): an FP8 LM head prefetching all of its 530 MB took 268 us in
    the step against 173 us in isolation (H200, 2026-12-03). The K loop is software-pipelined
    (``pipeline`` stages, row_dot's STAGES; AMD keeps the old loop, unmeasured there): before, each step waited
    for its own loads, one 4 KB tile per program in flight. H200 (2026-12-03,
    benchmarks/fp8_gemm_bench.py, FP8 activations): the LM head 173.8 us -> 136.2 us (3.9 TB/s) with
    4 stages and per-step row sums (``row_sums``), 8192x4096 / 4096x8192 12.8 / 13.1 us -> 12.2 / 12.4
    us with 3 stages and the 2D accumulator (row sums cost there); hence row sums and 4 stages only
    past 64M values. ``override`` replaces any field (``row_gemv`` passes the tuning table's
    fields of family ``row_gemv`` here); ``split`` fixes the K split."""
    block_n = override.get("block_n", 32)
    steps = triton.cdiv(k, SCALE_BLOCK)
    per_sm = override.get("programs_per_sm", 8 if n * k <= 1 << 24 else 4)
    split = override.get("split", k_split_count(triton.cdiv(n, block_n), steps, per_sm * sms, min_steps=2))
    k_split = triton.cdiv(steps, split) * SCALE_BLOCK
    prefetch = override.get("prefetch", 1)
    big = n * k > 1 << 26  # an LM head, not one of a layer's linears
    return RowGemvConfig(block_n, k_split, override.get("num_warps", 1), override.get("num_stages", 3),
                         override.get("prequant", 0), prefetch,
                         prefetch_inputs(n, k_split, l2_bytes, triton.cdiv(k, k_split)) if prefetch else 0,
                         override.get("pipeline", 0 if amd else 4 if big else 3), override.get("row_sums", int(big and not amd)))


@triton.jit
def row_dot(x_ptr, w_rows, s_rows, n_ok, k_lo, k_hi,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, ACT_FP8: tl.constexpr,
            STAGES: tl.constexpr, ROW_SUMS: tl.constexpr):
    """fp32 [BLOCK_N]: the row ``x[k_lo:k_hi]`` times ``BLOCK_N`` rows of FP8 weights with 128x128
    block scales, without the tensor cores. ``w_rows``: pointers to each row's first weight,
    ``s_rows``: to its row of block scales (the rows need not be adjacent: the MoE kernels pair
    gate and up rows). Each step multiplies a [BLOCK_N, 128] weight tile (one scale block, K
    contiguous: wide loads) by the row elementwise. Products of e4m3 and bf16 (or e4m3) values are
    exact in fp32, so this is the tensor-core GEMV's arithmetic in another order.

    ``STAGES`` > 1: the K loop is software-pipelined over that many stages (asynchronous copies
    into shared memory, ``tl.range(num_stages=...)``): Triton pipelines a loop without a dot only
    when asked, so with 1 each step waits for its own loads, one tile per program in flight
    (``pipeline_stages`` maps a config's 0 to 1). ``ROW_SUMS``: each step's products are summed over
    K and scaled per row at once (BLOCK_N fp32 accumulators, BLOCK_N scale products per step)
    instead of an fp32 [BLOCK_N, 128] accumulator summed at the end. One loop body, no helper
    calls in it: Triton's interpreter (CPU CI) pays for every call per step."""
    if ROW_SUMS:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows[:, None] + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        s = tl.load(s_rows + k0 // FP8_SCALE_BLOCK, mask=n_ok, other=0)
        if SCALE == 2:
            s = tl.exp2(s.to(tl.float32) - E8M0_BIAS)
        if ACT_FP8:  # the row's 128-block quantised to e4m3 (values times their scale: exact in fp32)
            e = scale_exponent(tl.max(tl.abs(x), axis=0))
            x = e4m3_round(x * pow2(-e)) * pow2(e)
        if ROW_SUMS:
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1) * s
        else:
            acc += w.to(tl.float32) * x[None, :] * s[:, None]
    if not ROW_SUMS:
        acc = tl.sum(acc, axis=1)
    return acc


def pipeline_stages(pipeline: int) -> int:
    """row_dot's STAGES for a config's ``pipeline`` (0: not pipelined, i.e. one stage)."""
    return max(1, int(pipeline))


@triton.jit
def _row_gemv_kernel(x_ptr, q_ptr, s_ptr, p_ptr, y_ptr, lock_ptr, N, K, group_rows, k_split, split, s_cols,
                     prefetch_k,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr, ACT_FP8: tl.constexpr,
                     SPLIT_K: tl.constexpr, INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr,
                     PREFETCH: tl.constexpr, STAGES: tl.constexpr, ROW_SUMS: tl.constexpr):
    """One row times an FP8 weight on the CUDA cores (``row_dot``), program (column block, K slice);
    with ``group_rows`` < N (linear.grouped), weight rows ``[g * group_rows, (g + 1) * group_rows)``
    multiply inputs ``[g * K, (g + 1) * K)`` of the row. With ``PREFETCH``, the program asks L2 for
    the first ``prefetch_k`` inputs of its weight slice (one request per 128 bytes) before waiting
    for the kernel that produces x."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    k_lo = tl.program_id(1) * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    if PREFETCH:  # weights only: never written while the program runs
        for k0 in range(k_lo, tl.minimum(k_hi, k_lo + prefetch_k), 128):
            prefetch_l2(q_ptr + cols.to(tl.int64) * K + k0, n_ok)
    wait_for_producers(PDL)
    x_ptr += ((tl.program_id(0) * BLOCK_N) // group_rows) * K  # linear.grouped: the block's group of inputs
    part = row_dot(x_ptr, q_ptr + cols.to(tl.int64) * K, s_ptr + (cols // FP8_SCALE_BLOCK) * s_cols, n_ok, k_lo, k_hi,
                   BLOCK_N, BLOCK_K, SCALE, ACT_FP8, STAGES, ROW_SUMS)
    split_k_store(part, p_ptr, y_ptr, lock_ptr, cols, n_ok, N, split, SPLIT_K, INTERPRETER_BF16)


def row_gemv(ctx: KernelContext, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, mode: int,
             act: str | None, groups: int = 1, **override: int) -> torch.Tensor | None:
    """x [1, groups * K] @ dequant(w)ᵀ for an FP8 weight [N, K] (block scales), group by group
    (None when no column tile fits a group); K-split partials summed by the last program of each
    column block."""
    n, k = qdata.shape
    target = ctx.target
    cfg = grouped_config(lambda **o: row_gemv_config(n, k, target.compute_units, target.l2_bytes, is_amd(target), **o),
                         n, groups, {**ctx.tuned("row_gemv"), **override})
    if cfg is None:
        return None
    if act == "fp8" and cfg.prequant:  # quantised values in x's dtype (exact), then weight-only
        x, act = act_quant(ctx, x, dequant=True)[0], None
    split = triton.cdiv(k, cfg.k_split)
    blocks = triton.cdiv(n, cfg.block_n)
    y = result_buffer(0, (1, n), x.dtype, x.device)
    parts, locks = split_k_buffers(y[0], split, blocks)
    _row_gemv_kernel[(blocks, split)](
        x, qdata, scale, parts, y, locks, n, k, n // groups, cfg.k_split, split, scale.shape[-1], cfg.prefetch_k,
        BLOCK_N=cfg.block_n, BLOCK_K=SCALE_BLOCK, SCALE=mode, ACT_FP8=act == "fp8", SPLIT_K=split > 1,
        INTERPRETER_BF16=interpreter_bf16(x.dtype), PREFETCH=cfg.prefetch_k > 0 and ctx.launches_with_pdl,
        STAGES=pipeline_stages(cfg.pipeline), ROW_SUMS=bool(cfg.row_sums), **Launch(cfg.num_warps, cfg.num_stages).kwargs(ctx))
    return y


@triton.jit
def mxfp4_tile(q_ptr, s_ptr, rows, k, mask, k_total):
    """fp32 [BLOCK_K, BLOCK_N] tile ``W[rows, k]`` of an MXFP4 matrix (OCP e2m1, two values per byte
    along the input dimension, low nibble first; ``q_ptr`` [rows, k_total / 2] bytes, ``s_ptr``
    [rows, k_total / 32] UE8M0 exponent bytes). Every value is exact in bf16."""
    byte = tl.load(q_ptr + rows[None, :] * (k_total // 2) + (k // 2)[:, None], mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((k % 2) * 4)[:, None]) & 15
    e = (nib >> 1) & 3
    m = (nib & 1).to(tl.float32)
    mag = tl.where(e == 0, m * 0.5, (1.0 + m * 0.5) * tl.exp2((e - 1).to(tl.float32)))
    s = tl.load(s_ptr + rows[None, :] * (k_total // MX_SCALE_BLOCK) + (k // MX_SCALE_BLOCK)[:, None], mask=mask,
                other=E8M0_BIAS)
    return tl.where((nib & 8) != 0, -mag, mag) * tl.exp2(s.to(tl.float32) - E8M0_BIAS)


@triton.jit
def storage_to_dot(w, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """A weight tile in its storage type (fp8, int8, bf16, ...) as a dot operand of ``dtype``
    (exact: every e4m3 and int8 value is a bf16 value); fp32 under the interpreter's bf16 bugs.

    One return, after the constexpr ``if``: triton 3.6 also visits the return after a static branch
    that returned, and refuses two result types ("Inconsistent return types") when the flag is set
    in a compiled kernel (reproduced: sm_90 cross-compile, triton 3.6)."""
    if INTERPRETER_BF16:
        out = w.to(tl.float32)
    else:
        out = w.to(dtype)
    return out


def grouped_config(make, n: int, groups: int, override: dict):
    """``make(**override)``, a GEMV config; for linear.grouped (``groups`` > 1) one whose column tile
    divides the ``n / groups`` output rows of a group (a tile never straddles two groups): halved
    until it divides, not below 16; None if none does."""
    cfg = make(**override)
    if groups == 1:
        return cfg
    rows, block_n = n // groups, cfg.block_n
    while block_n > 16 and rows % block_n:
        block_n //= 2
    if rows % block_n:
        return None
    return cfg if block_n == cfg.block_n else make(**{**override, "block_n": block_n})


def gemv(ctx: KernelContext, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor | None, format: str,
         act: str | None = None, groups: int = 1, *, one_row: bool = True, **override: int) -> torch.Tensor | None:
    """``x @ dequant(w)ᵀ`` for x [M, K] (M <= MAX_ROWS), or None when this kernel does not apply.
    ``act="fp8"`` (FP8 weights only): x is quantised per row and 128 inputs first, and e4m3 tiles
    are multiplied on the tensor cores. ``act="mxfp4"`` (MXFP4 weights only): x is quantised per row
    and 32 inputs to MXFP4 in registers (the FP4 tensor cores' operands; multiplied exactly in
    bf16 here, a bandwidth-bound GEMV). ``groups`` > 1 (``linear.grouped``): x is [M, groups * K]
    and output columns ``[g * N / groups, (g + 1) * N / groups)`` read inputs ``[g * K, (g + 1) * K)``
    (each program's column block inside one group, else None). ``one_row``: a one-row FP8 GEMV
    runs ``row_gemv`` on the CUDA cores (False: the tensor-core tile, as benchmarks/fp8_gemm_bench.py
    compares them)."""
    mode = _MODES.get(format)
    if act is not None and (groups > 1 or (act, mode) not in (("fp8", BLOCK_F32), ("fp8", BLOCK_UE8M0),
                                                                ("mxfp4", MXFP4))):
        return None
    m, k = x.shape
    n = qdata.shape[0]
    if x.shape[1] % groups or n % groups:
        return None
    k //= groups
    stored_k = k // 2 if mode == MXFP4 else k
    if mode is None or x.dtype not in _DTYPES or m > MAX_ROWS or qdata.dim() != 2 or qdata.shape[1] != stored_k:
        return None
    if mode == MXFP4 and (k % MX_BLOCK or scale is None or scale.shape != (n, k // MX_BLOCK)):
        return None
    if mode in (BLOCK_F32, BLOCK_UE8M0) and (scale is None or scale.shape != (triton.cdiv(n, SCALE_BLOCK),
                                                                             triton.cdiv(k, SCALE_BLOCK))):
        return None
    x, qdata = x.contiguous(), qdata.contiguous()
    scale = qdata if scale is None else scale.contiguous()
    if m == 1 and mode in (BLOCK_F32, BLOCK_UE8M0) and one_row:
        return row_gemv(ctx, x, qdata, scale, mode, act, groups, **override)
    target = ctx.target  # the artifact's target (the live device's when loaded elsewhere)
    if act == "fp8":
        override = {**override, "block_k": ACT_BLOCK}  # one activation scale per K step
    storage = 1 if mode == MXFP4 else qdata.element_size()
    cfg = grouped_config(lambda **o: gemv_config(m, n, k, x.dtype, target.compute_units, storage, **o), n, groups,
                         {**ctx.tuned("gemv"), **override})
    if cfg is None:
        return None
    split = triton.cdiv(k, cfg.k_split)
    blocks = triton.cdiv(n, cfg.block_n)
    y = result_buffer(0, (m, n), x.dtype, x.device)
    parts, locks = split_k_buffers(y, split, blocks)
    _gemv_kernel[(blocks, split)](
        x, qdata, scale, parts, y, locks, m, n, k, x.shape[1], n // groups, cfg.k_split, split,
        scale.shape[-1] if mode in (BLOCK_F32, BLOCK_UE8M0) else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SCALE=mode, ACT_FP8=act == "fp8",
        SPLIT_K=split > 1, PRECISION=dot_precision(x.dtype, target), INTERPRETER_BF16=interpreter_bf16(x.dtype),
        ACT_FP4=act == "mxfp4", **Launch(cfg.num_warps, cfg.num_stages).kwargs(ctx))
    return y


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int
    block_n: int
    group_m: int  # row tiles walked together (L2 reuse of the weight tiles)
    num_warps: int
    num_stages: int


def fp8_gemm_config(m: int, n: int, **override: int) -> Fp8GemmConfig:
    """64x128 output tiles, 128 inputs per step (one scale block of both operands), one warpgroup,
    3 stages: the fastest of 16 tilings (64/128 rows x 128/256 columns x 4/8 warps x 3/4 stages) on
    every dense linear of flash-slice at 2048 rows, H200, 2026-12-02 (benchmarks/fp8_gemm_bench.py):
    250-550 TFLOP/s, 0.8x cuBLAS's bf16 GEMM and 2x the dequantise-then-cuBLAS path; the per-step
    rescaling of the fp32 accumulator keeps the wgmma pipeline short. ``override`` replaces any field."""
    return Fp8GemmConfig(override.get("block_m", 64), override.get("block_n", 128), override.get("group_m", 8),
                         override.get("num_warps", 4), override.get("num_stages", 3))


@triton.jit
def _fp8_gemm_kernel(xq_ptr, xs_ptr, q_ptr, s_ptr, y_ptr, M, N, K, s_cols,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     SCALE: tl.constexpr, INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    """y = (xq * xs) @ (q * s)ᵀ: e4m3 x e4m3 per 128-input step, scaled by the row's activation
    scale and the column's weight-block scale (fp32 or UE8M0) and added to an fp32 accumulator.
    Hopper's FP8 tensor cores sum a step's products with fewer than fp32's bits (measured: about
    1e-4 of the output's magnitude, fp32 output); promoting every 128 inputs bounds it, as
    DeepSeek-V3 does."""
    wait_for_producers(PDL)
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rows < M, cols < N
    k_blocks = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, k_blocks):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(xq_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(q_ptr + cols.to(tl.int64)[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        sa = tl.load(xs_ptr + rows * k_blocks + kb, mask=m_ok, other=0.0)
        sb = block_scale(s_ptr, cols, n_ok, s_cols, kb * BLOCK_K, SCALE)
        acc += tl.dot(a, b) * (sa[:, None] * sb[None, :])
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptrs, round_to(acc, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(ctx: KernelContext, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, format: str,
             **override: int) -> torch.Tensor | None:
    """``act_fp8(x) @ dequant(w)ᵀ`` for x [M, K] and an FP8 weight with 128x128 block scales (any M;
    prefill), or None when this kernel does not apply: x is quantised once (``act_quant``), then
    e4m3 tiles are multiplied on the tensor cores."""
    mode = _MODES.get(format)
    m, k = x.shape
    n = qdata.shape[0]
    if mode not in (BLOCK_F32, BLOCK_UE8M0) or x.dtype not in _DTYPES or qdata.shape != (n, k) \
            or scale is None or scale.shape != (triton.cdiv(n, SCALE_BLOCK), triton.cdiv(k, SCALE_BLOCK)):
        return None
    xq, xs = act_quant(ctx, x)
    qdata, scale = qdata.contiguous(), scale.contiguous()
    cfg = fp8_gemm_config(m, n, **override)
    y = result_buffer(0, (m, n), x.dtype, x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fp8_gemm_kernel[grid](xq, xs, qdata, scale, y, m, n, k, scale.shape[-1],
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=ACT_BLOCK, GROUP_M=cfg.group_m,
                           SCALE=mode, INTERPRETER_BF16=interpreter_bf16(x.dtype),
                           **Launch(cfg.num_warps, cfg.num_stages).kwargs(ctx))
    return y


@register_kernel("linear.packed")
def linear_packed(ctx: KernelContext, x, *packed, format: str, shape: list[int], act: str | None = None):
    """Launcher with ``linear.packed``'s reference signature: the GEMV up to MAX_ROWS rows; beyond,
    with FP8 activations (``act="fp8"``), the FP8 GEMM. Declines the rest (the reference
    dequantises the weight and runs cuBLAS) and formats without a kernel."""
    if format not in _MODES or len(shape) != 2 or not packed or act not in (None, "fp8", "mxfp4"):
        return NotImplemented
    flat = x.reshape(-1, x.shape[-1])
    scale = packed[1] if len(packed) > 1 else None
    if flat.shape[0] <= MAX_ROWS:
        y = gemv(ctx, flat, packed[0], scale, format, act)
    elif act == "fp8":
        y = fp8_gemm(ctx, flat, packed[0], scale, format)
    else:
        y = None
    if y is None:
        return NotImplemented
    return y.view(*x.shape[:-1], shape[0])


@register_kernel("linear.grouped.packed")
def linear_grouped_packed(ctx: KernelContext, x, *packed, format: str, shape: list[int], groups: int):
    """Launcher with ``linear.grouped.packed``'s reference signature: up to MAX_ROWS tokens, the
    GEMV over the packed weight, each column block reading its group's inputs. Declines the rest
    (prefill: the reference dequantises the weight and runs the grouped matmul)."""
    if format not in _MODES or len(shape) != 2 or not packed or x.shape[-2] != groups:
        return NotImplemented
    flat = x.reshape(-1, groups * x.shape[-1])
    if flat.shape[0] > MAX_ROWS:
        return NotImplemented
    y = gemv(ctx, flat, packed[0], packed[1] if len(packed) > 1 else None, format, groups=groups)
    if y is None:
        return NotImplemented
    return y.view(*x.shape[:-1], shape[0] // groups)
