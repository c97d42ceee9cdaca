"""``rms_norm``: one program per block of rows, fp32 statistics, the reference's exact casts.

- weighted: ``(weight * (x.float() * r)).to(x.dtype)`` — every product in fp32, one rounding;
- unweighted: ``x * r.to(x.dtype)`` — the scale is rounded to x's dtype first, then the product
  (exact in fp32 for bf16/fp16 operands) is rounded once more, as torch's bf16 multiply does.

A row of up to ``MAX_BLOCK_D`` channels is read once; wider rows take a second pass over x
(from L2) after the sum of squares.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.attention import interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import KernelContext, rms_norm_config
from ds4c.backends.triton.kernels.pdl import wait_for_producers

MAX_BLOCK_D = 8192


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, rows, dim, stride_x, eps,
                     HAS_WEIGHT: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    offs = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + r.to(tl.int64)[:, None] * stride_x
    out_rows = out_ptr + r.to(tl.int64)[:, None] * dim
    dtype = out_ptr.dtype.element_ty

    if ONE_PASS:  # the whole row in registers: one read
        mask = r_ok[:, None] & (offs[None, :] < dim)
        x = tl.load(x_rows + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, axis=1) / dim + eps)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + offs, mask=offs < dim, other=0.0).to(tl.float32)
            y = w[None, :] * (x * scale[:, None])
        else:
            y = x * round_to(scale, dtype, INTERPRETER_BF16).to(tl.float32)[:, None]
        tl.store(out_rows + offs[None, :], round_to(y, dtype, INTERPRETER_BF16), mask=mask)
    else:
        sq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            mask = r_ok[:, None] & ((d0 + offs)[None, :] < dim)
            x = tl.load(x_rows + (d0 + offs)[None, :], mask=mask, other=0.0).to(tl.float32)
            sq += x * x
        scale = tl.rsqrt(tl.sum(sq, axis=1) / dim + eps)
        rounded = round_to(scale, dtype, INTERPRETER_BF16).to(tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + offs
            mask = r_ok[:, None] & (cols[None, :] < dim)
            x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
                y = w[None, :] * (x * scale[:, None])
            else:
                y = x * rounded[:, None]
            tl.store(out_rows + cols[None, :], round_to(y, dtype, INTERPRETER_BF16), mask=mask)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@register_kernel("rms_norm")
def rms_norm(ctx: KernelContext, x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float) -> torch.Tensor:
    """Launcher with ``RmsNorm.reference``'s signature; declines dtypes other than fp32/bf16/fp16
    and a weight that is not a [D] vector of those dtypes on x's device."""
    if x.dtype not in _DTYPES or x.dim() == 0:
        return NotImplemented
    dim = x.shape[-1]
    if weight is not None and (weight.dtype not in _DTYPES or tuple(weight.shape) != (dim,)
                               or weight.device != x.device):
        return NotImplemented
    out = result_buffer(0, x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return out
    flat = x.reshape(-1, dim)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    block_r, block_d, launch = rms_norm_config(rows, dim, MAX_BLOCK_D)
    _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
        flat, weight.contiguous() if weight is not None else flat, out, rows, dim, flat.stride(0), float(eps),
        HAS_WEIGHT=weight is not None, ONE_PASS=block_d >= dim, BLOCK_R=block_r, BLOCK_D=block_d,
        INTERPRETER_BF16=interpreter_bf16(x.dtype), **launch.kwargs(ctx))
    return out
