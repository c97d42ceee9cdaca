"""FP8 activation quantisation in registers: ``quant.activation`` and the helpers the FP8 GEMMs share.

One power-of-two scale per token and 128 input channels, e4m3 values rounded to nearest even
(ds4c.quant.activations is the reference and explains the exponent). Both steps are integer and
exact fp32 arithmetic, identical on a GPU and under Triton's interpreter (whose fp32 -> fp8
conversion does not round: it is only given values already on the e4m3 grid here):

- the scale exponent comes from the bits of the block's amax (no division, no logarithm);
- rounding to the e4m3 grid adds and subtracts ``1.5 * 2^23`` quanta (fp32 then rounds to a
  multiple of the quantum, ties to even), the quantum being ``2^(e - 3)`` for a value in
  ``[2^e, 2^(e+1))``, ``2^-9`` below 2^-6 (subnormals).

``quantize_rows`` turns a [rows, 128] tile into e4m3 operands and one fp32 scale per row: the GEMV
(``linear.packed`` with ``act="fp8"``) calls it on its activation tile; ``act_quant`` writes a whole
[M, K] input as e4m3 + scales for the FP8 GEMM of prefill, or (``quant.activation`` on its own)
the quantised values times their scales in the input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.attention import interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import KernelContext, Launch
from ds4c.backends.triton.kernels.pdl import wait_for_producers
from ds4c.quant.activations import ACT_BLOCK
from ds4c.quant.formats import FP8_BLOCK, MX_BLOCK, UE8M0_BIAS

# The weight formats' blocks (ds4c.quant.formats) as Triton constants (jit code reads only constexpr
# globals): the kernels that read packed weights index scales with these, never with literals.
FP8_SCALE_BLOCK = tl.constexpr(FP8_BLOCK)  # weight rows and inputs per FP8 scale (= ACT_BLOCK)
MX_SCALE_BLOCK = tl.constexpr(MX_BLOCK)  # inputs per MXFP4 (UE8M0) scale
E8M0_BIAS = tl.constexpr(UE8M0_BIAS)  # a UE8M0 byte b is 2^(b - E8M0_BIAS); b = E8M0_BIAS is 1.0


@triton.jit
def pow2(k):
    """2^k as fp32, for int32 ``k`` in [-126, 127] (built from the exponent bits: exact)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_exponent(amax, SHIFT: tl.constexpr, MANTISSA: tl.constexpr):
    """int32 ``k``: the smallest with ``max(amax, 1e-4) <= 1.m * 2^SHIFT * 2^k`` where ``1.m`` has
    mantissa bits ``MANTISSA``: from amax's bits (``E - SHIFT``, plus one above the mantissa)."""
    bits = tl.maximum(amax, 1e-4).to(tl.int32, bitcast=True)  # AMAX_FLOOR
    return ((bits >> 23) & 255) - 127 - SHIFT + ((bits & 0x7FFFFF) > MANTISSA).to(tl.int32)


@triton.jit
def scale_exponent(amax):
    """int32 ``k``: the smallest with ``max(amax, 1e-4) <= 448 * 2^k`` (448 = 1.75 * 2^8; FP8)."""
    return pow2_exponent(amax, 8, 0x600000)


@triton.jit
def e4m3_round(v):
    """fp32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even, as fp32."""
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6)
    magic = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^23 quanta of 2^(e-3)
    r = (a + magic) - magic
    return tl.where(v < 0, -r, r)


@triton.jit
def mx_scale_exponent(amax):
    """int32 ``k``: the smallest with ``max(amax, 1e-4) <= 6 * 2^k`` (6 = 1.5 * 2^2; MXFP4)."""
    return pow2_exponent(amax, 2, 0x400000)


@triton.jit
def e2m1_round(v):
    """fp32 ``v`` rounded to the nearest e2m1 value (saturating at 6), ties to the even code, as
    fp32: the quantum is 2^(max(e, 0) - 1) for |v| in [2^e, 2^(e+1)) (0.5 below 2, 1 below 4, 2
    up to 6), rounded to by adding and subtracting 1.5 * 2^23 quanta."""
    a = tl.minimum(tl.abs(v), 6.0)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 255) - 127, 0)
    magic = (((e + 149) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    return tl.where(v < 0, -r, r)


@triton.jit
def mx_fake_quant(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """fp32 tile [ROWS, COLS] (COLS a multiple of 32, each 32 columns one scale block) quantised to
    MXFP4 and multiplied back (fp32, exact): what the FP4 tensor cores multiply."""
    xb = tl.reshape(x, [ROWS, COLS // MX_SCALE_BLOCK, MX_SCALE_BLOCK])
    k = mx_scale_exponent(tl.max(tl.abs(xb), axis=2))
    q = e2m1_round(xb * pow2(-k)[:, :, None]) * pow2(k)[:, :, None]
    return tl.reshape(q, [ROWS, COLS])


@triton.jit
def quantize_rows(x):
    """fp32 tile [R, 128] (one scale block per row) -> (e4m3 tile, fp32 scale [R])."""
    k = scale_exponent(tl.max(tl.abs(x), axis=1))
    q = e4m3_round(x * pow2(-k)[:, None]).to(tl.float8e4nv)
    return q, pow2(k)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                      DEQUANT: tl.constexpr, INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q, s = quantize_rows(x)
    if DEQUANT:  # quant.activation: the quantised values in x's dtype (exact)
        tl.store(q_ptr + offs, round_to(q.to(tl.float32) * s[:, None], q_ptr.dtype.element_ty, INTERPRETER_BF16),
                 mask=mask)
    else:
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + rows * tl.cdiv(K, BLOCK) + tl.program_id(1), s, mask=rows < M)


def act_quant(ctx: KernelContext, x: torch.Tensor, *, dequant: bool = False, result: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` [M, K] as (e4m3 [M, K], fp32 scales [M, ceil(K/128)]), or with ``dequant`` the
    quantised values in x's dtype (and None); ``result``: those are the launched op's result
    (``result_buffer``), not a GEMM's scratch."""
    x = x.contiguous()
    m, k = x.shape
    blocks = triton.cdiv(k, ACT_BLOCK)
    if dequant:
        q, s = (result_buffer(0, x.shape, x.dtype, x.device) if result else torch.empty_like(x)), None
    else:
        q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty((m, blocks), dtype=torch.float32, device=x.device)
    block_m = 16
    _act_quant_kernel[(triton.cdiv(m, block_m), blocks)](
        x, q, q if s is None else s, m, k, BLOCK_M=block_m, BLOCK=ACT_BLOCK, DEQUANT=dequant,
        INTERPRETER_BF16=interpreter_bf16(x.dtype), **Launch(4).kwargs(ctx))
    return q, s


@register_kernel("quant.activation")
def activation(ctx: KernelContext, x: torch.Tensor, *, format: str, block: int):
    """``quant.activation`` where no GEMM folded it in; declines formats and blocks it does not run."""
    if format != "fp8" or block != ACT_BLOCK or x.dtype not in (torch.float32, torch.bfloat16) or x.numel() == 0:
        return NotImplemented
    q, _ = act_quant(ctx, x.reshape(-1, x.shape[-1]), dequant=True, result=True)
    return q.view(x.shape)
