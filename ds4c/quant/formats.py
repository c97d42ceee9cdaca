"""Weight storage formats: one record per format, with exact packing and its dequantisation reference.

A format packs a weight ``w`` ([.., out, in], the input dimension last) into named tensors and
unpacks them back; ``packed_spec(shape)`` gives those tensors' shapes and dtypes without any data,
so the bytes of a model are exact from shapes alone. Every format:

- round-trips exactly on values it can represent (``unpack(pack(w)) == w``);
- keeps each element's error under ``error_bound(w)`` (tested against random and adversarial data).

Formats (the block layouts DeepSeek ships; the math is the checkpoint loader's, ds4c.frontend.formats):

- ``bf16``: a cast. Bound ``2^-8·|w|`` (round to nearest, 8 significant bits).
- ``fp8``: e4m3 with one UE8M0 (power-of-two) scale per 128x128 block of each [out, in] matrix;
  ``fp8-f32scale``: the same with fp32 scales (amax / 448). Bound ``max(2^-4·|w|, 2^-10·scale)``:
  3 mantissa bits, subnormal step 2^-9 below 2^-6; the scale keeps the block max <= 448.
- ``int8``: symmetric int8 with one fp32 scale per output channel (amax / 127). Bound ``scale / 2``.
- ``mxfp4``: OCP MX e2m1, two values per byte along the input dimension (low nibble first), one
  UE8M0 scale per 32 inputs. Bound ``max(|w|, scale) / 4`` (grid spacing is at most half the value
  above 1 and 0.5 below it; the scale keeps the block max <= 6).

UE8M0 scales are stored as their exponent byte (``uint8``; value ``2^(b-127)``): safetensors
writes ``float8_e8m0fnu`` but cannot read it back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds4c.errors import ConfigError
from ds4c.frontend.formats import dequant_mxfp4, quant_fp8_block, quant_mxfp4

Shape = tuple[int, ...]
PackedSpec = dict[str, tuple[Shape, torch.dtype]]
FP8_BLOCK = 128
MX_BLOCK = 32
_SLACK = 1 + 2**-20  # fp32 rounding of w / scale and q * scale


class FormatError(ConfigError):
    """Unknown format, or a weight a format cannot hold."""


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


def ue8m0_bits(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales (fp32 or float8_e8m0fnu) -> their UE8M0 exponent bytes (uint8)."""
    return scale.to(torch.float8_e8m0fnu).view(torch.uint8)


def ue8m0_value(bits: torch.Tensor) -> torch.Tensor:
    """UE8M0 exponent bytes -> fp32 scales."""
    return bits.view(torch.float8_e8m0fnu).float()


_ROW_CHUNK_ELEMS = 1 << 22


def _by_rows(w: torch.Tensor, fn: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Apply a row-wise packer to [.., in] a slab of rows at a time (bounded fp32 temporaries)."""
    flat = w.reshape(-1, w.shape[-1])
    step = max(1, _ROW_CHUNK_ELEMS // max(1, flat.shape[1]))
    parts = [fn(flat[r:r + step]) for r in range(0, flat.shape[0], step)]
    return {k: torch.cat([p[k] for p in parts]).view(*w.shape[:-1], -1) for k in parts[0]}


def _as_matrices(w: torch.Tensor) -> torch.Tensor:
    if w.dim() < 2:
        raise FormatError(f"quantised weights are [.., out, in] matrices; got shape {list(w.shape)}")
    return w.reshape(-1, *w.shape[-2:])


# -- bf16 ---------------------------------------------------------------------------------------
def _bf16_pack(w):
    return {"qdata": w.to(torch.bfloat16)}


def _bf16_unpack(p, shape, dtype):
    return p["qdata"].to(dtype)


def _bf16_spec(shape):
    return {"qdata": (shape, torch.bfloat16)}


def _bf16_bound(w):
    return w.float().abs() * 2**-8 * _SLACK


# -- fp8 e4m3, 128x128 blocks -------------------------------------------------------------------
def _fp8_pack(scale_fmt: str):
    def pack(w):
        mats = _as_matrices(w)
        qs, ss = zip(*(quant_fp8_block(m, FP8_BLOCK, scale_fmt) for m in mats), strict=True)
        q = torch.stack(qs).view(w.shape)
        s = torch.stack(ss).view(*w.shape[:-2], *ss[0].shape)
        return {"qdata": q, "scale": ue8m0_bits(s) if scale_fmt == "ue8m0" else s.float()}
    return pack


def _fp8_scale(p) -> torch.Tensor:
    s = p["scale"]
    return ue8m0_value(s) if s.dtype == torch.uint8 else s.float()


def _expand_fp8_scale(scale: torch.Tensor, shape: Shape) -> torch.Tensor:
    s = scale.repeat_interleave(FP8_BLOCK, dim=-2)[..., : shape[-2], :]
    return s.repeat_interleave(FP8_BLOCK, dim=-1)[..., : shape[-1]]


def _fp8_unpack(p, shape, dtype):
    q = p["qdata"]
    out = torch.empty(shape, dtype=dtype, device=q.device)
    scale = _fp8_scale(p)
    mats_q, mats_s, mats_o = _as_matrices(q), scale.reshape(-1, *scale.shape[-2:]), out.view(-1, *shape[-2:])
    for i in range(mats_q.shape[0]):  # one matrix at a time: fp32 temporaries stay small
        mats_o[i] = mats_q[i].float() * _expand_fp8_scale(mats_s[i], tuple(shape[-2:]))
    return out


def _fp8_spec(scale_dtype: torch.dtype):
    def spec(shape):
        return {"qdata": (shape, torch.float8_e4m3fn),
                "scale": ((*shape[:-2], _blocks(shape[-2], FP8_BLOCK), _blocks(shape[-1], FP8_BLOCK)), scale_dtype)}
    return spec


def _fp8_bound_for(scale_fmt: str):
    def bound(w):
        scale = _fp8_scale(_fp8_pack(scale_fmt)(w))
        s = _expand_fp8_scale(scale, tuple(w.shape))
        return torch.maximum(w.float().abs() * 2**-4, s * 2**-10) * _SLACK
    return bound


# -- int8, one scale per output channel --------------------------------------------------------
def _int8_rows(w):
    wf = w.float()
    scale = (wf.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(wf / scale).clamp(-127, 127).to(torch.int8)
    return {"qdata": q, "scale": scale}


def _int8_pack(w):
    return _by_rows(w, _int8_rows)


def _int8_unpack(p, shape, dtype):
    return (p["qdata"].float() * p["scale"]).to(dtype)


def _int8_spec(shape):
    return {"qdata": (shape, torch.int8), "scale": ((*shape[:-1], 1), torch.float32)}


def _int8_bound(w):
    return (_int8_pack(w)["scale"] / 2).expand(w.shape) * _SLACK + w.float().abs() * 2**-22


# -- mxfp4 --------------------------------------------------------------------------------------
def _mxfp4_rows(w):
    q, s = quant_mxfp4(w, MX_BLOCK)
    return {"qdata": q, "scale": ue8m0_bits(s)}


def _mxfp4_pack(w):
    _mxfp4_spec(tuple(w.shape))
    return _by_rows(w, _mxfp4_rows)


def _mxfp4_unpack(p, shape, dtype):
    return dequant_mxfp4(p["qdata"], p["scale"].view(torch.float8_e8m0fnu), MX_BLOCK, out_dtype=dtype).view(shape)


def _mxfp4_spec(shape):
    if shape[-1] % MX_BLOCK:
        raise FormatError(f"mxfp4 needs the input dimension ({shape[-1]}) divisible by {MX_BLOCK}")
    return {"qdata": ((*shape[:-1], shape[-1] // 2), torch.uint8),
            "scale": ((*shape[:-1], shape[-1] // MX_BLOCK), torch.uint8)}


def _mxfp4_bound(w):
    s = ue8m0_value(_mxfp4_pack(w)["scale"]).repeat_interleave(MX_BLOCK, dim=-1)
    return torch.maximum(w.float().abs(), s) / 4 * _SLACK


# -- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    """A weight storage format. ``pack``/``unpack`` are exact PyTorch references."""

    name: str
    bits: float  # storage bits per weight element, scales included (large matrices)
    description: str
    pack: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    unpack_fn: Callable[[dict[str, torch.Tensor], Shape, torch.dtype], torch.Tensor]
    spec_fn: Callable[[Shape], PackedSpec]
    error_bound: Callable[[torch.Tensor], torch.Tensor]  # elementwise |unpack(pack(w)) - w| <= bound
    matrix_format: str  # what the target's matrix unit must take to run it natively (targets.DTYPES)
    min_rank: int = 2

    def unpack(self, packed: dict[str, torch.Tensor], shape: Shape, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        return self.unpack_fn(packed, tuple(shape), dtype)

    def packed_spec(self, shape: Shape) -> PackedSpec:
        return self.spec_fn(tuple(int(s) for s in shape))

    def nbytes(self, shape: Shape) -> int:
        """Exact bytes of the packed tensors of a weight of ``shape``."""
        total = 0
        for s, dt in self.packed_spec(shape).values():
            n = 1
            for d in s:
                n *= d
            total += n * dt.itemsize
        return total

    def holds(self, shape: Shape) -> bool:
        """Whether a weight of ``shape`` can be stored in this format."""
        if len(shape) < self.min_rank:
            return False
        try:
            self.packed_spec(shape)
        except FormatError:
            return False
        return True

    @property
    def parts(self) -> tuple[str, ...]:
        """Names of the packed tensors, in operand order of ``quant.dequant``."""
        return tuple(self.spec_fn((FP8_BLOCK, FP8_BLOCK)))

    def roundtrip(self, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.unpack(self.pack(w), tuple(w.shape), dtype)

    def support(self, target) -> str | None:
        """``native`` (the matrix unit takes it), ``dequant`` (cheap to expand in the kernel) or None."""
        if target.backend == "reference":
            return None
        if self.name == "bf16":
            return "native"
        if self.matrix_format in target.peak_flops and target.peak(self.matrix_format) >= target.peak("bf16"):
            return "native"
        if self.name == "int8":
            return "dequant"  # per-output-channel scale folds into the GEMM epilogue
        return None


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", 16, "bfloat16", _bf16_pack, _bf16_unpack, _bf16_spec, _bf16_bound, "bf16", min_rank=0),
    Format("fp8", 8 + 8 / FP8_BLOCK**2, "e4m3, UE8M0 scale per 128x128 block", _fp8_pack("ue8m0"), _fp8_unpack,
           _fp8_spec(torch.uint8), _fp8_bound_for("ue8m0"), "fp8"),
    Format("fp8-f32scale", 8 + 32 / FP8_BLOCK**2, "e4m3, fp32 scale per 128x128 block", _fp8_pack("fp32"),
           _fp8_unpack, _fp8_spec(torch.float32), _fp8_bound_for("fp32"), "fp8"),
    Format("int8", 8, "int8, fp32 scale per output channel", _int8_pack, _int8_unpack, _int8_spec, _int8_bound,
           "int8"),
    Format("mxfp4", 4 + 8 / MX_BLOCK, "OCP MXFP4: e2m1 pairs per byte, UE8M0 scale per 32 inputs", _mxfp4_pack,
           _mxfp4_unpack, _mxfp4_spec, _mxfp4_bound, "fp4"),
)}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown weight format '{name}'; known formats: {', '.join(FORMATS)}") from None


__all__ = ["FORMATS", "Format", "FormatError", "get_format", "ue8m0_bits", "ue8m0_value"]
