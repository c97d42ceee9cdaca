"""``rope``: DeepSeek-V4's interleaved, partial rotary embedding on the trailing ``rope_dim`` channels.

    %y = rope(%x, %cos, %sin, rope_dim=64, inverse=false) : f32[B,H,S,512]

``cos``/``sin`` are the per-channel tables already broadcastable to ``x[..., -rope_dim:]`` (each
pair's angle repeated twice). Pairs (0,1), (2,3)... rotate as complex numbers; the leading
``D - rope_dim`` channels pass through. ``inverse=true`` rotates by the negative angle (the
conjugate rotation V4 applies to the attention output). Math in fp32, cast back to x's dtype.
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, register_op
from ds4c.ir.types import TensorType


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int,
                   inverse: bool = False) -> torch.Tensor:
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    s = -sin if inverse else sin
    rotated = ((rot.float() * cos) + (rotate_pairs(rot).float() * s)).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


@register_op
class Rope(OpDef):
    name = "rope"
    num_results = 1

    def reference(self, x, cos, sin, *, rope_dim: int, inverse: bool = False):
        return rope_reference(x, cos, sin, rope_dim, inverse)

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 3 or set(op.kwargs) != {"rope_dim", "inverse"}:
            raise VerificationError("rope takes (x, cos, sin) and rope_dim=, inverse=")
        x = op.args[0]
        if not isinstance(x.type, TensorType):
            raise VerificationError("rope: x must be a tensor")
        r = op.kwargs["rope_dim"]
        d = x.type.shape[-1]
        if not isinstance(r, int) or r <= 0 or r % 2 or (isinstance(d, int) and r > d):
            raise VerificationError(f"rope: rope_dim={r} must be a positive even number <= {d}")
