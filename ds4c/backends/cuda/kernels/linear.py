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
K-slice of ``k_split`` inputs; with more than one slice the fp32 partials are summed by torch
(deterministic, no atomics). Tiles come from ``gemv_config`` (see there).

More than ``MAX_ROWS`` rows (prefill) is compute-bound: the launcher declines and the reference
(dequantise once, cuBLAS) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ds4c.backends.cuda.kernels import register_kernel
from ds4c.backends.cuda.kernels.attention import dot_operand, interpreter_bf16, round_to
from ds4c.backends.cuda.kernels.configs import active_target, dot_precision, tuned

MAX_ROWS = 64
SCALE_BLOCK = 128
MX_BLOCK = 32  # MXFP4: inputs per UE8M0 scale
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


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int, storage_bytes: int = 2,
                **override: int) -> GemvConfig:
    """Tiles for ``m`` rows of an [n, k] weight stored in ``storage_bytes`` per value: 64 columns
    x 128 inputs per step (one FP8 scale block wide), 4 stages, and K split (fp32 partials,
    summed after) until the grid holds about four programs per SM.

    Measured on an H100 (2026-11-25, flash-slice decode, whole CUDA-graph step): this beats
    narrower column tiles without a K split (16-64 columns, 256 inputs for bf16; one program per
    SM), which benchmarks/gemv_tune.py preferred per shape in isolation (FP8 step 2.26 vs 1.99 ms).
    ``override`` replaces any field (the sweep uses it); so does the active tuning table
    (``configs.use_tuning``, family ``gemv``), under ``override``."""
    override = {**tuned("gemv"), **override}
    block_m = max(16, triton.next_power_of_2(m))
    block_k = override.get("block_k", 64 if dtype == torch.float32 else 128)
    if storage_bytes == 1 and block_k > SCALE_BLOCK:
        raise ValueError(f"FP8 GEMV steps must stay inside one {SCALE_BLOCK}-wide scale block, got block_k={block_k}")
    block_n = override.get("block_n", 64 if block_m <= 32 else 32)
    n_blocks = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, block_k)
    split = 1
    while n_blocks * split < 4 * sms and steps // (split * 2) >= 4:
        split *= 2
    split = override.get("split", split)
    k_split = triton.cdiv(steps, split) * block_k
    return GemvConfig(block_m, block_n, block_k, k_split, override.get("num_warps", 4),
                      override.get("num_stages", 2 if dtype == torch.float32 else 4))


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, k_split, s_cols,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALE: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if SCALE == 4:  # MXFP4: decoded and scaled in registers
            w = mxfp4_tile(q_ptr, s_ptr, cols.to(tl.int64), offs_k, k_ok[:, None] & n_ok[None, :], K)
        else:
            w = tl.load(q_ptr + cols.to(tl.int64)[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :],
                        other=0.0)
        w = storage_to_dot(w, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        if SCALE == 1 or SCALE == 2:  # one scale per column in this K step (block_k <= 128)
            s = tl.load(s_ptr + (cols // 128) * s_cols + k0 // 128, mask=n_ok, other=0)
            if SCALE == 2:
                s = tl.exp2(s.to(tl.float32) - 127.0)
            acc += tl.dot(dot_operand(x, INTERPRETER_BF16), w, input_precision=PRECISION) * s[None, :]
        else:
            acc = tl.dot(dot_operand(x, INTERPRETER_BF16), w, acc, input_precision=PRECISION)
    if SCALE == 3:
        acc = acc * tl.load(s_ptr + cols, mask=n_ok, other=0.0)[None, :]
    y_ptrs = y_ptr + pid_k * M * N + offs_m[:, None] * N + cols[None, :]
    tl.store(y_ptrs, round_to(acc, y_ptr.dtype.element_ty, INTERPRETER_BF16), mask=m_ok[:, None] & n_ok[None, :])


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
    s = tl.load(s_ptr + rows[None, :] * (k_total // 32) + (k // 32)[:, None], mask=mask, other=127)
    return tl.where((nib & 8) != 0, -mag, mag) * tl.exp2(s.to(tl.float32) - 127.0)


@triton.jit
def storage_to_dot(w, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """A weight tile in its storage type (fp8, int8, bf16, ...) as a dot operand of ``dtype``
    (exact: every e4m3 and int8 value is a bf16 value); fp32 under the interpreter's bf16 bugs."""
    if INTERPRETER_BF16:
        return w.to(tl.float32)
    return w.to(dtype)


def gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor | None, format: str,
         **override: int) -> torch.Tensor | None:
    """``x @ dequant(w)ᵀ`` for x [M, K] (M <= MAX_ROWS), or None when this kernel does not apply."""
    mode = _MODES.get(format)
    m, k = x.shape
    n = qdata.shape[0]
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
    target = active_target()  # the artifact's target (the live device's when loaded elsewhere)
    cfg = gemv_config(m, n, k, x.dtype, target.compute_units, 1 if mode == MXFP4 else qdata.element_size(), **override)
    split = triton.cdiv(k, cfg.k_split)
    y = torch.empty((split, m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, qdata, scale, y, m, n, k, cfg.k_split, scale.shape[-1] if mode in (BLOCK_F32, BLOCK_UE8M0) else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SCALE=mode,
        PRECISION=dot_precision(x.dtype, target), INTERPRETER_BF16=interpreter_bf16(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y[0] if split == 1 else y.sum(0).to(x.dtype)


@register_kernel("linear.packed")
def linear_packed(x, *packed, format: str, shape: list[int]):
    """Launcher with ``linear.packed``'s reference signature; declines more than MAX_ROWS rows
    and formats without a kernel."""
    if format not in _MODES or len(shape) != 2 or not packed:
        return NotImplemented
    flat = x.reshape(-1, x.shape[-1])
    y = gemv(flat, packed[0], packed[1] if len(packed) > 1 else None, format)
    if y is None:
        return NotImplemented
    return y.view(*x.shape[:-1], shape[0])
