"""DeepSeek-V4 attention: one joint softmax over window and compressed entries, per-head sinks, K = V.

    %o = attention.sliding(%q, %keys, %bias, %sinks, scale=0.0442) : f32[B,H,S,D]
    %o = attention.csa(%q, %keys, %bias, %sinks, scale=0.0442)      (keys: window ++ selected compressed)
    %o = attention.hca(%q, %keys, %bias, %sinks, scale=0.0442)      (keys: window ++ all compressed)

``q`` [B, H, S, D]; ``keys`` [B, 1, T, D] is the single shared K=V head; ``bias`` [B|1, 1, S, T] is
additive (0 or -inf: sliding window, causality, indexer selection); ``sinks`` [H] enter only the
softmax denominator. The three ops share one reference; the name records which entries the
keys hold, so backends can choose structured kernels (and read the selection from the bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.shapes import floordiv_dim
from ds4c.ir.types import TensorType


def attention_reference(q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                        scale: float) -> torch.Tensor:
    b, h, s, d = q.shape
    t = keys.shape[2]
    kv = keys[:, :, None].expand(b, keys.shape[1], h // keys.shape[1], t, d).reshape(b, h, t, d)
    logits = torch.matmul(q, kv.transpose(2, 3)) * scale + bias
    sink = sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
    return torch.matmul(probs[..., :-1].to(kv.dtype), kv)


class _Attention(OpDef):
    num_results = 1
    operands = (Operand("q"), Operand("keys"), Operand("bias"), Operand("sinks", "weight"))
    traits = frozenset({"npu"})

    def reference(self, q, keys, bias, sinks, *, scale: float):
        return attention_reference(q, keys, bias, sinks, scale)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]  # q's: K = V has q's head size

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 4 or set(op.kwargs) != {"scale"}:
            raise VerificationError(f"{self.name} takes (q, keys, bias, sinks) and scale=")
        q, keys = op.args[0], op.args[1]
        if not (isinstance(q.type, TensorType) and isinstance(keys.type, TensorType)):
            raise VerificationError(f"{self.name}: q and keys must be tensors")
        if q.type.rank != 4 or keys.type.rank != 4 or keys.type.shape[1] != 1:
            raise VerificationError(f"{self.name}: q must be [B,H,S,D] and keys [B,1,T,D]; got {q.type}, {keys.type}")


@register_op
class AttentionSliding(_Attention):
    name = "attention.sliding"


@register_op
class AttentionCsa(_Attention):
    name = "attention.csa"


@register_op
class AttentionHca(_Attention):
    name = "attention.hca"


@register_op
class LinearGrouped(OpDef):
    """``y[.., g, :] = x[.., g, :] @ w[g*O:(g+1)*O, :]ᵀ``: the grouped output projection (``wo_a``).

        %y = linear.grouped(%x, %w, groups=8) : bf16[B,S,8,1024]
    """

    name = "linear.grouped"
    num_results = 1
    operands = (Operand("x"), Operand("w", "weight", unit="grouped_linear"))
    traits = frozenset({"npu", "positionwise"})
    packed_variant = "linear.grouped.packed"

    def reference(self, x, w, *, groups: int):
        lead = x.shape[:-2]
        hidden = x.shape[-1]
        wt = w.view(groups, -1, hidden).transpose(1, 2)
        xt = x.reshape(-1, groups, hidden).transpose(0, 1)
        return torch.bmm(xt, wt).transpose(0, 1).reshape(*lead, groups, -1)

    def infer_types(self, operand_types, kwargs):
        x = self.tensor_operand(operand_types, 0, min_rank=2)
        w = self.tensor_operand(operand_types, 1, min_rank=2)
        return [grouped_linear_type(self.name, x, w.shape[0], kwargs.get("groups"))]


def grouped_linear_type(op_name: str, x: TensorType, rows, groups) -> TensorType:
    """The result of a grouped linear with ``rows`` weight rows: [.., groups, rows // groups] in x's dtype."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise VerificationError(f"{op_name}: groups must be a positive int, got {groups!r}")
    return TensorType(x.dtype, (*x.shape[:-2], groups, floordiv_dim(rows, groups)))
