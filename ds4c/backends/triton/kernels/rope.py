"""``rope``: interleaved rotary embedding on the trailing ``rope_dim`` channels, copy of the rest;
``rms_norm.rope``: the same after an RMS normalisation of the row, in the same launch.

A program owns ``BLOCK_R`` rows of x (all leading dims flattened) and writes whole output rows:
the ``D - rope_dim`` leading channels unchanged, then each pair ``(a, b) = (x[2i], x[2i+1])`` as
``(a*cos[2i] - b*s[2i], b*cos[2i+1] + a*s[2i+1])`` in fp32 with ``s = ±sin``, rounded once.
cos/sin are read through the strides of their broadcast to ``x[..., -rope_dim:]`` (0 on the
broadcast dims: one [S, rope_dim] table serves every batch and head without a copy); x may be
strided too. Up to 4 leading dims.

With ``NORM`` the program first sums the squares of each of its rows (the rotary pairs it holds,
the other channels in ``BLOCK_NOPE`` chunks), then writes ``rms_norm``'s values rounded to x's
dtype (weighted: ``w * (x * r)`` in fp32; unweighted: ``x * r`` with r rounded first), and rotates
the rounded pairs: exactly ``rope(rms_norm(x))``, one launch and one write instead of two.

``rope.table``: a program owns ``BLOCK_R`` positions x ``BLOCK_F`` frequencies and writes each
``cos(p * f) * scaling`` / ``sin(..)`` (fp32, rounded once to the table's dtype) to both channels
of its pair: the seven ATen kernels of the tables (mul, cos, sin, scale, casts, repeats) in one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.attention import interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import KernelContext, elementwise_launch, rope_config
from ds4c.backends.triton.kernels.pdl import wait_for_producers

MAX_LEAD = 4


@triton.jit
def _row_offset(r, n1, n2, n3, s0, s1, s2, s3):
    """Offset of flat row ``r`` of a [n0, n1, n2, n3] grid with strides s0..s3 (int64)."""
    i3 = r % n3
    r = r // n3
    i2 = r % n2
    r = r // n2
    i1 = r % n1
    i0 = r // n1
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def _normed(x, scale, rounded, w_ptr, cols, w_mask, HAS_WEIGHT: tl.constexpr, dtype: tl.constexpr,
            INTERPRETER_BF16: tl.constexpr):
    """``rms_norm``'s output for channels ``cols`` of the rows (fp32 values of the rounded result)."""
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=w_mask, other=0.0).to(tl.float32)
        y = w[None, :] * (x * scale[:, None])
    else:
        y = x * rounded[:, None]
    return round_to(y, dtype, INTERPRETER_BF16).to(tl.float32)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, w_ptr, out_ptr, rows, dim, rope_dim, eps,
                 n1, n2, n3,
                 sx0, sx1, sx2, sx3, sx_d,
                 sc0, sc1, sc2, sc3, sc_d,
                 ss0, ss1, ss2, ss3, ss_d,
                 INVERSE: tl.constexpr, NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_P: tl.constexpr,
                 INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    r64 = r.to(tl.int64)
    x_rows = x_ptr + _row_offset(r64, n1, n2, n3, sx0, sx1, sx2, sx3)
    c_rows = cos_ptr + _row_offset(r64, n1, n2, n3, sc0, sc1, sc2, sc3)
    s_rows = sin_ptr + _row_offset(r64, n1, n2, n3, ss0, ss1, ss2, ss3)
    out_rows = out_ptr + r64 * dim
    dtype = out_ptr.dtype.element_ty
    nope = dim - rope_dim
    offs = tl.arange(0, BLOCK_NOPE)

    p = tl.arange(0, BLOCK_P)
    ev = 2 * p
    od = ev + 1
    p_ok = p < rope_dim // 2
    mask = r_ok[:, None] & p_ok[None, :]
    a = tl.load(x_rows[:, None] + (nope + ev)[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_rows[:, None] + (nope + od)[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)

    if NORM:  # rms_norm first (fp32 statistics over the whole row), rounded as the op rounds it
        sq = tl.sum(a * a + b * b, axis=1)
        for c0 in range(0, nope, BLOCK_NOPE):
            c = c0 + offs
            m = r_ok[:, None] & (c[None, :] < nope)
            xn = tl.load(x_rows[:, None] + c[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
            sq += tl.sum(xn * xn, axis=1)
        scale = tl.rsqrt(sq / dim + eps)
        rounded = round_to(scale, dtype, INTERPRETER_BF16).to(tl.float32)
        for c0 in range(0, nope, BLOCK_NOPE):
            c = c0 + offs
            c_ok = c < nope
            m = r_ok[:, None] & c_ok[None, :]
            xn = tl.load(x_rows[:, None] + c[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
            yn = _normed(xn, scale, rounded, w_ptr, c, c_ok, HAS_WEIGHT, dtype, INTERPRETER_BF16)
            tl.store(out_rows[:, None] + c[None, :], round_to(yn, dtype, INTERPRETER_BF16), mask=m)
        a = _normed(a, scale, rounded, w_ptr, nope + ev, p_ok, HAS_WEIGHT, dtype, INTERPRETER_BF16)
        b = _normed(b, scale, rounded, w_ptr, nope + od, p_ok, HAS_WEIGHT, dtype, INTERPRETER_BF16)
    else:
        for c0 in range(0, nope, BLOCK_NOPE):
            c = c0 + offs
            m = r_ok[:, None] & (c[None, :] < nope)
            tl.store(out_rows[:, None] + c[None, :], tl.load(x_rows[:, None] + c[None, :] * sx_d, mask=m), mask=m)

    c_ev = tl.load(c_rows[:, None] + ev[None, :] * sc_d, mask=mask, other=0.0).to(tl.float32)
    c_od = tl.load(c_rows[:, None] + od[None, :] * sc_d, mask=mask, other=0.0).to(tl.float32)
    s_ev = tl.load(s_rows[:, None] + ev[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)
    s_od = tl.load(s_rows[:, None] + od[None, :] * ss_d, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s_ev = -s_ev
        s_od = -s_od
    y_ev = a * c_ev + (-b) * s_ev
    y_od = b * c_od + a * s_od
    tl.store(out_rows[:, None] + (nope + ev)[None, :], round_to(y_ev, dtype, INTERPRETER_BF16), mask=mask)
    tl.store(out_rows[:, None] + (nope + od)[None, :], round_to(y_od, dtype, INTERPRETER_BF16), mask=mask)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _lead_strides(t: torch.Tensor) -> list[int]:
    """Strides of t's leading dims, left-padded with zeros to MAX_LEAD."""
    lead = list(t.stride()[:-1])
    return [0] * (MAX_LEAD - len(lead)) + lead


def _launch(ctx: KernelContext, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor | None, *,
            rope_dim: int, inverse: bool, eps: float | None):
    """Both ops' launcher: ``eps`` None rotates ``x`` (``rope``), else normalises it first
    (``rms_norm.rope``). NotImplemented for what the kernel does not take (see ``rope``)."""
    if x.dtype not in _DTYPES or cos.dtype not in _DTYPES or sin.dtype not in _DTYPES:
        return NotImplemented
    if x.dim() < 1 or x.dim() - 1 > MAX_LEAD or rope_dim <= 0 or rope_dim % 2 or rope_dim > x.shape[-1]:
        return NotImplemented
    if not (x.device == cos.device == sin.device):
        return NotImplemented
    if weight is not None and (weight.dtype not in _DTYPES or tuple(weight.shape) != (x.shape[-1],)
                               or weight.device != x.device):
        return NotImplemented
    target = (*x.shape[:-1], rope_dim)
    try:
        cos_b, sin_b = cos.expand(target), sin.expand(target)
    except RuntimeError:
        return NotImplemented
    out = result_buffer(0, x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return out
    dim = x.shape[-1]
    lead = [1] * (MAX_LEAD - (x.dim() - 1)) + list(x.shape[:-1])
    rows = out.numel() // dim
    block_r, block_nope, block_p, launch = rope_config(dim, rope_dim)
    norm = eps is not None
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x, cos_b, sin_b, weight.contiguous() if weight is not None else x, out, rows, dim, rope_dim,
        float(eps) if norm else 0.0, lead[1], lead[2], lead[3],
        *_lead_strides(x), x.stride(-1), *_lead_strides(cos_b), cos_b.stride(-1), *_lead_strides(sin_b),
        sin_b.stride(-1),
        INVERSE=bool(inverse), NORM=norm, HAS_WEIGHT=weight is not None,
        BLOCK_R=block_r, BLOCK_NOPE=block_nope, BLOCK_P=block_p,
        INTERPRETER_BF16=interpreter_bf16(x.dtype), **launch.kwargs(ctx))
    return out


@register_kernel("rope")
def rope(ctx: KernelContext, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rope_dim: int, inverse: bool = False):
    """Launcher with ``Rope.reference``'s signature; declines more than 4 leading dims, dtypes
    other than fp32/bf16/fp16, tables of fp64, an odd or oversized rope_dim, and cos/sin that
    do not broadcast to ``x[..., -rope_dim:]``."""
    return _launch(ctx, x, cos, sin, None, rope_dim=rope_dim, inverse=inverse, eps=None)


@register_kernel("rms_norm.rope")
def rms_norm_rope(ctx: KernelContext, x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *,
                  eps: float, rope_dim: int):
    """Launcher with ``RmsNormRope.reference``'s signature; declines what ``rope`` declines and a
    weight that is not a [D] vector of fp32/bf16/fp16 on x's device."""
    return _launch(ctx, x, cos, sin, weight, rope_dim=rope_dim, inverse=False, eps=eps)


@triton.jit
def _table_kernel(pos_ptr, freq_ptr, cos_ptr, sin_ptr, n, n1, sp0, sp1, half, scaling, BLOCK_R: tl.constexpr,
                  BLOCK_F: tl.constexpr, INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.arange(0, BLOCK_F)
    r_ok, f_ok = r < n, f < half
    p = tl.load(pos_ptr + (r // n1) * sp0 + (r % n1) * sp1, mask=r_ok, other=0).to(tl.float32)
    angle = p[:, None] * tl.load(freq_ptr + f, mask=f_ok, other=0.0)[None, :]
    dtype = cos_ptr.dtype.element_ty
    c = round_to(tl.cos(angle) * scaling, dtype, INTERPRETER_BF16)
    s = round_to(tl.sin(angle) * scaling, dtype, INTERPRETER_BF16)
    mask = r_ok[:, None] & f_ok[None, :]
    at = r.to(tl.int64)[:, None] * (2 * half) + 2 * f[None, :]
    for pair in tl.static_range(2):
        tl.store(cos_ptr + at + pair, c, mask=mask)
        tl.store(sin_ptr + at + pair, s, mask=mask)


@register_kernel("rope.table")
def rope_table(ctx: KernelContext, positions: torch.Tensor, inv_freq: torch.Tensor, *, scaling: float,
               dtype: torch.dtype):
    """Launcher with ``RopeTable.reference``'s signature; positions of up to 2 dims with any strides
    (a batch's positions are one row broadcast), more dims contiguous. Declines non-integer
    positions (the model's are int64), frequencies that are not a contiguous fp32 vector on their
    device, and table dtypes other than fp32/bf16/fp16."""
    if positions.dtype not in (torch.int32, torch.int64) or (positions.dim() > 2 and not positions.is_contiguous()) \
            or inv_freq.dim() != 1 or inv_freq.dtype != torch.float32 or inv_freq.stride(0) != 1 \
            or inv_freq.device != positions.device or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return NotImplemented
    half = inv_freq.shape[0]
    shape = (*positions.shape, 2 * half)
    cos = result_buffer(0, shape, dtype, positions.device)
    sin = result_buffer(1, shape, dtype, positions.device)
    n = positions.numel()
    if n == 0 or half == 0:
        return cos, sin
    if positions.dim() == 2:
        n1, sp0, sp1 = positions.shape[1], positions.stride(0), positions.stride(1)
    else:  # one row: 1-D (any stride), 0-D, or contiguous
        n1, sp0, sp1 = n, 0, positions.stride(0) if positions.dim() == 1 else 1
    block_f = triton.next_power_of_2(half)
    block_r = max(1, min(64, 2048 // block_f, triton.next_power_of_2(n)))
    _table_kernel[(triton.cdiv(n, block_r),)](
        positions, inv_freq, cos, sin, n, max(n1, 1), sp0, sp1, half, float(scaling), BLOCK_R=block_r, BLOCK_F=block_f,
        INTERPRETER_BF16=interpreter_bf16(dtype), **elementwise_launch(4).kwargs(ctx))
    return cos, sin
