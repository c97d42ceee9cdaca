"""Weight formats DeepSeek ships, as exact PyTorch math (quantise and dequantise).

- FP8 e4m3 with one scale per 128x128 block; scales are UE8M0 (powers of two, ``float8_e8m0fnu``)
  or fp32. ``w = q.float() * scale`` blockwise.
- MXFP4 (OCP microscaling): e2m1 values packed two per byte along the input dimension, the
  element with the lower index in the low nibble, one UE8M0 scale per 32 consecutive values;
  ``w = e2m1(q) * scale``. DeepSeek stores these bytes as int8 [out, in/2] with scales
  float8_e8m0fnu [out, in/32]; the nibble order is the one its ``inference/convert.py``
  (``cast_e2m1fn_to_e4m3fn``: ``stack([table[x & 0xF], table[x >> 4]], -1)``) decodes, and the
  OCP / ``torch.float4_e2m1fn_x2`` order.
Scales are chosen as the smallest power of two that keeps the block maximum representable
(amax / 448 for e4m3, amax / 6 for e2m1), rounded up, as DeepSeek's converter does.
"""

from __future__ import annotations

import torch

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FP8_MAX = 448.0
FP4_MAX = 6.0


def _pow2_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= fmax, within UE8M0's range [2^-127, 2^127]
    (all-zero blocks get 2^-127)."""
    amax = amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(amax / fmax)).clamp(-127, 127))


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    s = scale.float().repeat_interleave(block[0], dim=0)[: shape[0]]
    return s.repeat_interleave(block[1], dim=1)[:, : shape[1]]


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = 128, *,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 e4m3 [out, in] with scales [ceil(out/b), ceil(in/b)] (UE8M0 or fp32) -> ``out_dtype``.

    Computed one block row at a time in fp32, so the only full-size tensor is the result."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    if tuple(scale.shape) != (rows, cols):
        raise ValueError(f"FP8 weight {list(w.shape)} needs {block}x{block} block scales of shape {[rows, cols]}, "
                         f"got {list(scale.shape)}")
    out = torch.empty((out_f, in_f), dtype=out_dtype, device=w.device)
    s = scale.float().repeat_interleave(block, dim=1)[:, :in_f]
    for r in range(rows):
        sl = slice(r * block, min((r + 1) * block, out_f))
        out[sl] = w[sl].float() * s[r]
    return out


def quant_fp8_block(w: torch.Tensor, block: int = 128, scale_fmt: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32/bf16 [out, in] -> (float8_e4m3fn [out, in], scales [ceil(out/b), ceil(in/b)])."""
    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))
    if scale_fmt == "ue8m0":
        scale = _pow2_scale(amax, FP8_MAX)
    else:
        scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w.float() / _expand_blocks(scale, (out_f, in_f), (block, block))).clamp(-FP8_MAX, FP8_MAX)
    q = q.to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu) if scale_fmt == "ue8m0" else scale


def unpack_fp4_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[.., n/2] bytes -> [.., n] fp32 e2m1 values (low nibble = even index)."""
    if packed.dtype == getattr(torch, "float4_e2m1fn_x2", None):
        packed = packed.view(torch.uint8)
    b = packed.view(torch.uint8).to(torch.int64)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    codes = torch.stack([lo, hi], dim=-1).flatten(-2)
    return E2M1_VALUES.to(packed.device)[codes]


def pack_fp4_e2m1(values: torch.Tensor) -> torch.Tensor:
    """fp32 values already on the e2m1 grid [.., n] -> uint8 [.., n/2]."""
    grid = E2M1_VALUES[:8].to(values.device)
    mag = values.abs()
    code = (mag.unsqueeze(-1) - grid).abs().argmin(-1)
    code = code + 8 * (torch.signbit(values) & (code > 0)).to(code.dtype)
    code = code.to(torch.uint8).view(*values.shape[:-1], -1, 2)
    return (code[..., 0] | (code[..., 1] << 4)).contiguous()


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value (ties to the even mantissa), saturating at ±6."""
    grid = E2M1_VALUES[:8].to(x.device)
    mag = x.abs().clamp(max=FP4_MAX)
    # candidate below/above; ties go to the value with an even code (even mantissa bit)
    idx = torch.searchsorted(grid, mag.contiguous())
    idx = idx.clamp(1, 7)
    lo, hi = grid[idx - 1], grid[idx]
    d_lo, d_hi = mag - lo, hi - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (idx % 2 == 0))
    out = torch.where(pick_hi, hi, lo)
    return torch.where(x < 0, -out, out)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, block: int = 32, *,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 [out, in/2] bytes + UE8M0 scales [out, ceil(in/32)] -> ``out_dtype`` [out, in]."""
    n = packed.shape[-1] * 2
    if tuple(scale.shape) != (*packed.shape[:-1], -(-n // block)):
        raise ValueError(f"MXFP4 weight of {n} inputs per row ({list(packed.shape)} bytes) needs one scale per "
                         f"{block} values, shape {[*packed.shape[:-1], -(-n // block)]}, got {list(scale.shape)}")
    rows = max(1, (1 << 22) // max(1, n))  # bounded fp32 temporaries
    flat_p, flat_s = packed.reshape(-1, packed.shape[-1]), scale.reshape(-1, scale.shape[-1])
    out = torch.empty((flat_p.shape[0], n), dtype=out_dtype, device=packed.device)
    for r in range(0, flat_p.shape[0], rows):
        v = unpack_fp4_e2m1(flat_p[r:r + rows])
        out[r:r + rows] = v * flat_s[r:r + rows].float().repeat_interleave(block, dim=-1)[:, :n]
    return out.view(*packed.shape[:-1], n)


def quant_mxfp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] (in divisible by 32) -> (uint8 [out, in/2], float8_e8m0fnu [out, in/32])."""
    out_f, in_f = w.shape
    if in_f % block:
        raise ValueError(f"MXFP4 needs the input dimension ({in_f}) divisible by {block}")
    blocks = w.float().view(out_f, in_f // block, block)
    scale = _pow2_scale(blocks.abs().amax(-1), FP4_MAX)
    q = round_to_e2m1(blocks / scale.unsqueeze(-1)).view(out_f, in_f)
    return pack_fp4_e2m1(q), scale.to(torch.float8_e8m0fnu)
