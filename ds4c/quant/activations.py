"""Activation quantisation: what a GEMM that multiplies in FP8 does to its input, as a reference.

Where the target's tensor cores take FP8 operands (sm_90a, sm_100a) and a linear's weight is FP8,
the input is quantised at run time the way DeepSeek's inference code does (``act_quant``): e4m3,
one power-of-two scale per token and ``ACT_BLOCK`` consecutive input channels, the smallest
``2^k`` with ``amax <= 448 * 2^k`` (amax floored at 1e-4), values rounded to nearest even.

The exponent comes from the bits of ``amax`` (no division, no logarithm): with
``amax = M * 2^E`` (1 <= M < 2) the smallest such ``k`` is ``E - 8``, plus one where ``M > 1.75``
(448 = 1.75 * 2^8). DeepSeek computes ``ceil(log2(amax / 448))`` in fp32; the two differ only where
the fp32 division rounds ``amax / 448`` onto a power of two, which the exact form does not.

``fp8_roundtrip`` returns the quantised values times their scales in the input's dtype (exact in
bf16 and fp32: an e4m3 value has 4 significant bits): a GEMM over these and the dequantised weight
equals the native FP8 GEMM up to accumulation order. The CUDA kernels compute the same scales and
roundings in registers (ds4c.backends.triton.kernels.linear).

Where the tensor cores also take FP4 (sm_100a) and the weight is MXFP4, the input is quantised to
MXFP4 the way the weights are (OCP MX, ds4c.quant.formats): e2m1, one UE8M0 (power-of-two) scale
per token and ``MX_ACT_BLOCK`` = 32 channels, the smallest ``2^k`` with ``amax <= 6 * 2^k``
(``k = E - 2``, plus one where ``M > 1.5``; amax floored at 1e-4), values rounded to the nearest
e2m1 value, ties to the even code (``mxfp4_roundtrip``; exportable ops only, like the FP8 form).
"""

from __future__ import annotations

import torch

from ds4c.quant.formats import FP8_BLOCK, FP8_MAX, MX_BLOCK, round_to_e2m1

ACT_BLOCK = FP8_BLOCK  # input channels per FP8 activation scale (one FP8 weight block wide)
MX_ACT_BLOCK = MX_BLOCK  # input channels per MXFP4 activation scale (one MXFP4 weight block wide)
AMAX_FLOOR = 1e-4
ACTIVATION_FORMATS = ("fp8", "mxfp4")
ACTIVATION_BLOCKS = {"fp8": ACT_BLOCK, "mxfp4": MX_ACT_BLOCK}
# activation format -> the weight formats a GEMM multiplies natively in it (e4m3 x e4m3, e2m1 x e2m1)
WEIGHT_FORMATS = {"fp8": frozenset({"fp8", "fp8-f32scale"}), "mxfp4": frozenset({"mxfp4"})}


def _exponent(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, E): amax floored at 1e-4 in fp32, and ``E = floor(log2 a)`` exactly (float), from ops
    every exporter knows: log2's rounding corrected across powers of two by comparing with ``2^E``."""
    a = amax.float().clamp_min(AMAX_FLOOR)
    e = torch.floor(torch.log2(a))
    e = e - (torch.exp2(e) > a).float()
    e = e + (torch.exp2(e + 1) <= a).float()
    return a, e


def fp8_scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``k`` per entry: the smallest ``k`` with ``max(amax, 1e-4) <= 448 * 2^k``:
    ``k = E - 8 + (a > 1.75 * 2^E)`` (448 = 1.75 * 2^8)."""
    a, e = _exponent(amax)
    return (e - 8 + (a > 1.75 * torch.exp2(e)).float()).to(torch.int32)


def mxfp4_scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``k`` per entry: the smallest ``k`` with ``max(amax, 1e-4) <= 6 * 2^k``:
    ``k = E - 2 + (a > 1.5 * 2^E)`` (6 = 1.5 * 2^2)."""
    a, e = _exponent(amax)
    return (e - 2 + (a > 1.5 * torch.exp2(e)).float()).to(torch.int32)


def _blockwise(x: torch.Tensor, block: int, quantize) -> torch.Tensor:
    """``x`` (last dim: the GEMM's input channels) in blocks of ``block`` channels per token (the
    last zero-padded), each block through ``quantize(block values fp32, amax)`` -> values times
    their scale, back in ``x.dtype``."""
    k = x.shape[-1]
    pad = (-k) % block
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.unflatten(-1, (-1, block))
    return quantize(blocks, blocks.abs().amax(-1, keepdim=True)).flatten(-2)[..., :k].to(x.dtype)


def mxfp4_roundtrip(x: torch.Tensor, block: int = MX_ACT_BLOCK) -> torch.Tensor:
    """``x`` (any shape, last dim the GEMM's input channels) quantised to e2m1 per token and
    ``block`` channels with power-of-two scales, then multiplied back, in ``x.dtype`` (exact in
    bf16: an e2m1 value has 2 significant bits)."""
    def quantize(blocks, amax):
        scale = torch.exp2(mxfp4_scale_exponents(amax).float())  # exact powers of two
        return round_to_e2m1(blocks / scale) * scale  # the weight packer's rounding
    return _blockwise(x, block, quantize)


def fp8_roundtrip(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """``x`` (any shape, last dim the GEMM's input channels) quantised to e4m3 per token and
    ``block`` channels with power-of-two scales, then multiplied back, in ``x.dtype``."""
    def quantize(blocks, amax):
        scale = torch.exp2(fp8_scale_exponents(amax).float())  # exact powers of two
        return (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return _blockwise(x, block, quantize)


def roundtrip(x: torch.Tensor, format: str, block: int | None = None) -> torch.Tensor:
    """``x`` through activation format ``format`` (one of ACTIVATION_FORMATS), in blocks of ``block``
    channels (default: the format's, ACTIVATION_BLOCKS)."""
    if format == "fp8":
        return fp8_roundtrip(x, block or ACT_BLOCK)
    if format == "mxfp4":
        return mxfp4_roundtrip(x, block or MX_ACT_BLOCK)
    raise ValueError(f"activation format '{format}' is not one of {', '.join(ACTIVATION_FORMATS)}")
