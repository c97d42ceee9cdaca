"""``rms_norm``: x * rsqrt(mean(x², -1) + eps) [* weight], in fp32, cast back to x's dtype.

Two forms, exactly as DeepSeek-V4 (and transformers) compute them:

- weighted (``weight`` given): ``(weight * (x.float() * rsqrt(mean(x.float()²) + eps))).to(x.dtype)``
- unweighted: ``x * rsqrt(mean(x.float()²) + eps).to(x.dtype)`` (the scale is cast, then multiplied)

    %y = rms_norm(%x, %w, eps=1e-06) : f32[B,S,64]
    %q = rms_norm(%x, none, eps=1e-06) : f32[B,4,S,32]
"""

from __future__ import annotations

import torch

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype)


def check_norm_weight(op_name: str, x, w) -> None:
    """A norm weight, when there is one, is a [D] tensor for x of D channels."""
    if w is not None and (not isinstance(w.type, TensorType) or w.type.shape != x.type.shape[-1:]):
        raise VerificationError(f"{op_name}: weight {getattr(w, 'type', w)} must be [{x.type.shape[-1]}]")


@register_op
class RmsNorm(OpDef):
    name = "rms_norm"
    num_results = 1
    operands = (Operand("x"), Operand("weight", "weight"))
    traits = frozenset({"npu", "positionwise"})

    def reference(self, x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float) -> torch.Tensor:
        return rms_norm_reference(x, weight, eps)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 2 or set(op.kwargs) != {"eps"}:
            raise VerificationError("rms_norm takes (x, weight | none) and eps=")
        x, w = op.args
        if not isinstance(x.type, TensorType):
            raise VerificationError("rms_norm: x must be a tensor")
        check_norm_weight("rms_norm", x, w)
