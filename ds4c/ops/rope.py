"""``rope``: DeepSeek-V4's interleaved, partial rotary embedding on the trailing ``rope_dim`` channels.

    %y = rope(%x, %cos, %sin, rope_dim=64, inverse=false) : f32[B,H,S,512]

``cos``/``sin`` are the per-channel tables already broadcastable to ``x[..., -rope_dim:]`` (each
pair's angle repeated twice). Pairs (0,1), (2,3)... rotate as complex numbers; the leading
``D - rope_dim`` channels pass through. ``inverse=true`` rotates by the negative angle (the
conjugate rotation V4 applies to the attention output). Math in fp32, cast back to x's dtype.

``rope.table`` computes those tables from positions, in one op rather than seven ATen kernels:

    %cos, %sin = rope.table(%positions, %inv_freq, scaling=1.0, dtype=dtype(bf16)) : bf16[1,N,64], bf16[1,N,64]

``cos = (cos(p * inv_freq) * scaling).to(dtype)`` (angles in fp32), each pair's value repeated
twice (``[.., r/2]`` angles -> ``[.., r]`` channels), the same for ``sin``: transformers'
``DeepseekV4RotaryEmbedding`` and ``repeat_interleave`` as the model writes them. The model calls it
as ``torch.ops.ds4c.rope_table``; the importer names it ``rope.table`` (``TORCH_OPS``).
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType
from ds4c.ops.norms import check_norm_weight, rms_norm_reference


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int,
                   inverse: bool = False) -> torch.Tensor:
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    s = -sin if inverse else sin
    rotated = ((rot.float() * cos) + (rotate_pairs(rot).float() * s)).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


ROPE_TABLE = "rope.table"
TORCH_OPS = {"ds4c::rope_table": ROPE_TABLE}


def rope_table_reference(positions: torch.Tensor, inv_freq: torch.Tensor, *, scaling: float,
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [*positions.shape, 2 * len(inv_freq)] in ``dtype``: see the module docstring."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    cos = (freqs.cos() * scaling).to(dtype).repeat_interleave(2, dim=-1)
    sin = (freqs.sin() * scaling).to(dtype).repeat_interleave(2, dim=-1)
    return cos, sin


@torch.library.custom_op("ds4c::rope_table", mutates_args=())
def _rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, *, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_table_reference(positions, inv_freq, scaling=scaling, dtype=dtype)


@_rope_table.register_fake
def _(positions, inv_freq, *, scaling, dtype):
    shape = (*positions.shape, 2 * inv_freq.shape[0])
    return positions.new_empty(shape, dtype=dtype), positions.new_empty(shape, dtype=dtype)


def check_rope_dim(op_name: str, r, d) -> None:
    """``rope_dim`` is a positive even number of at most the ``d`` channels."""
    if not isinstance(r, int) or r <= 0 or r % 2 or (isinstance(d, int) and r > d):
        raise VerificationError(f"{op_name}: rope_dim={r} must be a positive even number <= {d}")


@register_op
class Rope(OpDef):
    name = "rope"
    num_results = 1
    operands = (Operand("x"), Operand("cos"), Operand("sin"))
    traits = frozenset({"npu"})

    def reference(self, x, cos, sin, *, rope_dim: int, inverse: bool = False):
        return rope_reference(x, cos, sin, rope_dim, inverse)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 3 or set(op.kwargs) != {"rope_dim", "inverse"}:
            raise VerificationError("rope takes (x, cos, sin) and rope_dim=, inverse=")
        x = op.args[0]
        if not isinstance(x.type, TensorType):
            raise VerificationError("rope: x must be a tensor")
        check_rope_dim("rope", op.kwargs["rope_dim"], x.type.shape[-1])


@register_op
class RopeTable(OpDef):
    name = ROPE_TABLE
    num_results = 2
    operands = (Operand("positions", "index"), Operand("inv_freq"))
    traits = frozenset({"npu"})

    def reference(self, positions, inv_freq, *, scaling: float, dtype: torch.dtype):
        return rope_table_reference(positions, inv_freq, scaling=scaling, dtype=dtype)

    def infer_types(self, operand_types, kwargs):
        positions = self.tensor_operand(operand_types, 0, min_rank=1)
        inv_freq = self.tensor_operand(operand_types, 1, min_rank=1)
        dtype, scaling = kwargs.get("dtype"), kwargs.get("scaling")
        if inv_freq.rank != 1 or not isinstance(inv_freq.shape[0], int) or not isinstance(dtype, torch.dtype) \
                or not dtype.is_floating_point or not isinstance(scaling, int | float) or isinstance(scaling, bool):
            raise VerificationError(f"{ROPE_TABLE}: takes positions, inv_freq [r/2] and scaling=<float>, "
                                    f"dtype=<float dtype>; got {positions}, {inv_freq}, scaling={scaling!r}, "
                                    f"dtype={dtype!r}")
        table = TensorType(dtype, (*positions.shape, 2 * inv_freq.shape[0]))
        return [table, table]


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                            eps: float, rope_dim: int) -> torch.Tensor:
    return rope_reference(rms_norm_reference(x, weight, eps), cos, sin, rope_dim)


@register_op
class RmsNormRope(OpDef):
    """``rope(rms_norm(x, weight, eps), cos, sin, rope_dim)`` as one op, with both ops' roundings
    (the normalised row is rounded to x's dtype before it rotates). The GPU lowering forms it
    (``ds4c.passes.fuse_norm_rope``) so a query or key is normalised and rotated in one launch.

        %q = rms_norm.rope(%x, none, %cos, %sin, eps=1e-06, rope_dim=64) : bf16[B,64,1,512]
    """

    name = "rms_norm.rope"
    num_results = 1
    operands = (Operand("x"), Operand("weight", "weight"), Operand("cos"), Operand("sin"))

    def reference(self, x, weight, cos, sin, *, eps: float, rope_dim: int):
        return rms_norm_rope_reference(x, weight, cos, sin, eps, rope_dim)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 4 or set(op.kwargs) != {"eps", "rope_dim"}:
            raise VerificationError("rms_norm.rope takes (x, weight | none, cos, sin) and eps=, rope_dim=")
        x, w = op.args[:2]
        if not isinstance(x.type, TensorType):
            raise VerificationError("rms_norm.rope: x must be a tensor")
        check_norm_weight("rms_norm.rope", x, w)
        check_rope_dim("rms_norm.rope", op.kwargs["rope_dim"], x.type.shape[-1])
