"""Weight storage formats: the one owner of each format's block layout, quantisation and dequantisation.

A format packs a weight ``w`` ([.., out, in], the input dimension last) into named tensors and
unpacks them back; ``packed_spec(shape)`` gives those tensors' shapes and dtypes without any data,
so the bytes of a model are exact from shapes alone. Every format:

- round-trips exactly on values it can represent (``unpack(pack(w)) == w``);
- keeps each element's error under ``error_bound(w)`` (tested against random and adversarial data).

Formats (the block layouts DeepSeek ships, DSV4_ARCHITECTURE.md §6):

- ``bf16``: a cast. Bound ``2^-8·|w|`` (round to nearest, 8 significant bits).
- ``fp8``: e4m3 with one UE8M0 (power-of-two) scale per ``FP8_BLOCK`` x ``FP8_BLOCK`` (128x128)
  block of each [out, in] matrix; ``fp8-f32scale``: the same with fp32 scales (amax / 448).
  ``w = q.float() * scale`` blockwise. Bound ``max(2^-4·|w|, 2^-10·scale)``: 3 mantissa bits,
  subnormal step 2^-9 below 2^-6; the scale keeps the block max <= 448.
- ``int8``: symmetric int8 with one fp32 scale per output channel (amax / 127). Bound ``scale / 2``.
- ``mxfp4``: OCP MX e2m1, two values per byte along the input dimension, the element with the
  lower index in the low nibble, one UE8M0 scale per ``MX_BLOCK`` (32) inputs;
  ``w = e2m1(q) * scale``. DeepSeek stores these bytes as int8 [out, in/2] with scales
  float8_e8m0fnu [out, in/32]; the nibble order is the one its ``inference/convert.py``
  (``cast_e2m1fn_to_e4m3fn``: ``stack([table[x & 0xF], table[x >> 4]], -1)``) decodes, and the
  OCP / ``torch.float4_e2m1fn_x2`` order. Bound ``max(|w|, scale) / 4`` (grid spacing is at most
  half the value above 1 and 0.5 below it; the scale keeps the block max <= 6).

Weight scales are the smallest power of two that keeps the block maximum representable (amax /
448 for e4m3, amax / 6 for e2m1), rounded up, as DeepSeek's converter does. UE8M0 scales are
stored as their exponent byte (``uint8``; value ``2^(b-127)``): safetensors writes
``float8_e8m0fnu`` but cannot read it back. A checkpoint's FP8 / MXFP4 tensors already are these
bytes (``checkpoint_packed``), so the loader hands them over unchanged.

The Triton kernels that read packed weights (ds4c.backends.triton.kernels) take the block sizes
from here; activation quantisation (ds4c.quant.activations) uses the same blocks and rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds4c.errors import ConfigError

Shape = tuple[int, ...]
PackedSpec = dict[str, tuple[Shape, torch.dtype]]
FP8_BLOCK = 128  # rows and inputs per FP8 scale
MX_BLOCK = 32  # inputs per MXFP4 scale
FP8_MAX = 448.0  # largest e4m3 value
FP4_MAX = 6.0  # largest e2m1 value
UE8M0_BIAS = 127  # a UE8M0 byte b is 2^(b - 127)
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
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


# -- the formats' math on one matrix (the checkpoint loader and writer use these directly) -------
def _pow2_scale(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= fmax, within UE8M0's range [2^-127, 2^127]
    (all-zero blocks get 2^-127)."""
    amax = amax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(amax / fmax)).clamp(-127, 127))


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    s = scale.float().repeat_interleave(block[0], dim=0)[: shape[0]]
    return s.repeat_interleave(block[1], dim=1)[:, : shape[1]]


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK, *,
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


def quant_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK, scale_fmt: str = "ue8m0"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
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


def e2m1_codes(packed: torch.Tensor) -> torch.Tensor:
    """[.., n/2] bytes (uint8, int8 or float4_e2m1fn_x2) -> [.., n] int64 nibble codes, low nibble
    first (``%`` and ``//``: operations every exporter knows)."""
    if packed.dtype == getattr(torch, "float4_e2m1fn_x2", None) or packed.dtype == torch.int8:
        packed = packed.view(torch.uint8)
    b = packed.to(torch.int64)
    return torch.stack([b % 16, b // 16], dim=-1).flatten(-2)


def unpack_fp4_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[.., n/2] bytes -> [.., n] fp32 e2m1 values (low nibble = even index)."""
    return E2M1_VALUES.to(packed.device)[e2m1_codes(packed)]


def pack_fp4_e2m1(values: torch.Tensor) -> torch.Tensor:
    """fp32 values already on the e2m1 grid [.., n] -> uint8 [.., n/2]."""
    grid = E2M1_VALUES[:8].to(values.device)
    mag = values.abs()
    code = (mag.unsqueeze(-1) - grid).abs().argmin(-1)
    code = code + 8 * (torch.signbit(values) & (code > 0)).to(code.dtype)
    code = code.to(torch.uint8).view(*values.shape[:-1], -1, 2)
    return (code[..., 0] | (code[..., 1] << 4)).contiguous()


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` rounded to the nearest e2m1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives),
    ties to the even code, saturating at 6: the grid's step is 0.5 below 2, 1 below 4 and 2 up to
    6, so each range is one ``round`` (half to even: the even code) at its step (exportable ops)."""
    a = v.abs().clamp_max(FP4_MAX)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.where(v < 0, -q, q)


def ue8m0_scales(scale: torch.Tensor) -> torch.Tensor:
    """UE8M0 scales as fp32: ``float8_e8m0fnu`` values, or exponent bytes (``uint8``) read as
    ``2^(b-127)`` with exportable ops (ONNX and torch-mlir have no float8_e8m0)."""
    if scale.dtype == torch.uint8:
        return torch.pow(2.0, scale.to(torch.float32) - float(UE8M0_BIAS))
    return scale.float()


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, block: int = MX_BLOCK, *,
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


def dequant_mxfp4_portable(qdata: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...],
                           dtype: torch.dtype) -> torch.Tensor:
    """``dequant_mxfp4`` of uint8 bytes and UE8M0 exponent bytes in one traceable expression (no
    float8_e8m0 view, no loop): the form exporters (ds4c.export) trace."""
    values = E2M1_VALUES.to(qdata.device)[e2m1_codes(qdata)]
    scales = ue8m0_scales(scale).repeat_interleave(MX_BLOCK, dim=-1)
    return (values * scales[..., : values.shape[-1]]).reshape(shape).to(dtype)


def quant_mxfp4(w: torch.Tensor, block: int = MX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] (in divisible by 32) -> (uint8 [out, in/2], float8_e8m0fnu [out, in/32])."""
    out_f, in_f = w.shape
    if in_f % block:
        raise ValueError(f"MXFP4 needs the input dimension ({in_f}) divisible by {block}")
    blocks = w.float().view(out_f, in_f // block, block)
    scale = _pow2_scale(blocks.abs().amax(-1), FP4_MAX)
    q = round_to_e2m1(blocks / scale.unsqueeze(-1)).view(out_f, in_f)
    return pack_fp4_e2m1(q), scale.to(torch.float8_e8m0fnu)


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

    def unpack_portable(self, packed: dict[str, torch.Tensor], shape: Shape, dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
        """``unpack`` as one traceable expression of ops every exporter has (no float8_e8m0 view,
        no gather or select on FP8 data, no loop): what ds4c.export traces. Same values."""
        shape = tuple(shape)
        if self.name == "mxfp4":
            return dequant_mxfp4_portable(packed["qdata"], packed["scale"], shape, dtype)
        if self.name in ("fp8", "fp8-f32scale"):
            scale = _expand_fp8_scale(ue8m0_scales(packed["scale"]), shape)
            return (packed["qdata"].to(torch.float32) * scale).to(dtype)
        return self.unpack(packed, shape, dtype)

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


def packed_format(parts: dict[str, tuple[Shape, torch.dtype]]) -> tuple[str, Shape] | None:
    """``(format, weight shape)`` whose packed tensors are exactly ``parts`` (part -> (shape, dtype)),
    or None: how a loader asked for packed tensors knows what to give."""
    qdata = parts.get("qdata")
    if qdata is None or not qdata[0]:
        return None
    q = tuple(int(d) for d in qdata[0])
    want = {k: (tuple(int(d) for d in s), dt) for k, (s, dt) in parts.items()}
    for shape in (q, (*q[:-1], 2 * q[-1])):
        for fmt in FORMATS.values():
            if fmt.name != "bf16" and fmt.holds(shape) and fmt.packed_spec(shape) == want:
                return fmt.name, shape
    return None


def from_checkpoint(format: str, qdata: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A checkpoint's quantised tensor and its scale as ``format``'s packed tensors, with the same
    bytes: FP8 values as they are, MXFP4 pairs (int8 / float4_e2m1fn_x2) and UE8M0 scales
    (float8_e8m0fnu) viewed as ``uint8``. The one conversion: ``fp8-f32scale`` scales stored as
    bf16 / fp16 become fp32 (exact)."""
    if format == "fp8":
        if qdata.dtype != torch.float8_e4m3fn or scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
            raise FormatError(f"fp8 takes float8_e4m3fn values and UE8M0 scales, got {qdata.dtype} and {scale.dtype}")
        return {"qdata": qdata, "scale": scale.view(torch.uint8)}
    if format == "fp8-f32scale":
        if qdata.dtype != torch.float8_e4m3fn or not scale.is_floating_point() or scale.element_size() < 2:
            raise FormatError(f"fp8-f32scale takes float8_e4m3fn values and float scales, got {qdata.dtype} and "
                              f"{scale.dtype}")
        return {"qdata": qdata, "scale": scale.float()}
    if format == "mxfp4":
        if qdata.element_size() != 1 or scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
            raise FormatError(f"mxfp4 takes e2m1 byte pairs and UE8M0 scales, got {qdata.dtype} and {scale.dtype}")
        return {"qdata": qdata.view(torch.uint8), "scale": scale.view(torch.uint8)}
    raise FormatError(f"no checkpoint ships weights as '{format}'; fp8, fp8-f32scale and mxfp4 are kept packed")


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise FormatError(f"unknown weight format '{name}'; known formats: {', '.join(FORMATS)}") from None


__all__ = ["E2M1_VALUES", "FORMATS", "FP4_MAX", "FP8_BLOCK", "FP8_MAX", "MX_BLOCK", "UE8M0_BIAS", "Format",
           "FormatError", "dequant_fp8_block", "dequant_mxfp4", "dequant_mxfp4_portable", "e2m1_codes", "get_format",
           "pack_fp4_e2m1", "quant_fp8_block", "quant_mxfp4", "round_to_e2m1", "ue8m0_bits", "ue8m0_scales",
           "ue8m0_value", "unpack_fp4_e2m1", "from_checkpoint", "packed_format"]
