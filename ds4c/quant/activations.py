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
roundings in registers (ds4c.backends.cuda.kernels.linear).
"""

from __future__ import annotations

import torch

ACT_BLOCK = 128  # input channels per activation scale (one FP8 weight block wide)
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
ACTIVATION_FORMATS = ("fp8",)
# activation format -> the weight formats a GEMM multiplies natively in it (e4m3 x e4m3)
WEIGHT_FORMATS = {"fp8": frozenset({"fp8", "fp8-f32scale"})}


def fp8_scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """int32 ``k`` per entry: the smallest ``k`` with ``max(amax, 1e-4) <= 448 * 2^k``. Exact, from
    ops every exporter knows: ``E = floor(log2 a)`` corrected across powers of two by comparing
    with ``2^E`` (exact), then ``k = E - 8 + (a > 1.75 * 2^E)``."""
    a = amax.float().clamp_min(AMAX_FLOOR)
    e = torch.floor(torch.log2(a))
    e = e - (torch.exp2(e) > a).float()
    e = e + (torch.exp2(e + 1) <= a).float()
    return (e - 8 + (a > 1.75 * torch.exp2(e)).float()).to(torch.int32)


def fp8_roundtrip(x: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """``x`` (any shape, last dim the GEMM's input channels) quantised to e4m3 per token and
    ``block`` channels with power-of-two scales, then multiplied back, in ``x.dtype``."""
    k = x.shape[-1]
    pad = (-k) % block
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.unflatten(-1, (-1, block))
    scale = torch.exp2(fp8_scale_exponents(blocks.abs().amax(-1, keepdim=True)).float())  # exact powers of two
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = (q.float() * scale).flatten(-2)
    return out[..., :k].to(x.dtype)


def roundtrip(x: torch.Tensor, format: str, block: int = ACT_BLOCK) -> torch.Tensor:
    """``x`` through activation format ``format`` (one of ACTIVATION_FORMATS)."""
    if format == "fp8":
        return fp8_roundtrip(x, block)
    raise ValueError(f"activation format '{format}' is not one of {', '.join(ACTIVATION_FORMATS)}")
