"""DeepSeek-V4 attention: one joint softmax over window and compressed entries, per-head sinks, K = V.

    %o = attention.sliding(%q, %keys, %bias, %sinks, scale=0.0442) : f32[B,H,S,D]
    %o = attention.csa(%q, %keys, %bias, %sinks, scale=0.0442)      (keys: window ++ selected compressed)
    %o = attention.hca(%q, %keys, %bias, %sinks, scale=0.0442)      (keys: window ++ all compressed)

``q`` [B, H, S, D]; ``keys`` [B, 1, T, D] is the single shared K=V head; ``bias`` [B|1, 1, S, T] is
additive (0 or -inf: sliding window, causality, indexer selection); ``sinks`` [H] enter only the
softmax denominator. The three ops share one reference; the name records which entries the
keys hold, so backends can choose structured kernels (and read the selection from the bias).

    %o = attention.csa.rows(%q, %window_pool, %window_rows, %comp_pool, %comp_rows, %bias, %sinks, scale=..)

The ``.rows`` forms (``attention.sliding.rows``, ``.csa.rows``, ``.hca.rows``) take the keys as
rows of pools [M, D] instead: key ``t`` of query ``b`` is ``pool_a[rows_a[b, t]]`` for ``t < Ta``,
then ``pool_b[rows_b[b, t - Ta]]`` (no second pool: none, none); a row of -1 is a zero key. A
serving step's keys are its tokens' page-table rows: the lowering pass ``fuse_paged_reads`` makes
these of ``attention.*(q, unsqueeze(cat(paged.gather(..), ..)))`` so that the kernels read each
key where it lives, without a per-token copy of every key (a 2048-token HCA step at a 262144-token
context: 4.3 GB gathered and 4.6 GB concatenated, per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.shapes import floordiv_dim
from ds4c.ir.types import TensorType
from ds4c.ops.paged import gather_reference


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


class _AttentionRows(OpDef):
    num_results = 1
    operands = (Operand("q"), Operand("pool_a"), Operand("rows_a", "index"), Operand("pool_b"),
                Operand("rows_b", "index"), Operand("bias"), Operand("sinks", "weight"))

    def reference(self, q, pool_a, rows_a, pool_b, rows_b, bias, sinks, *, scale: float):
        keys = gather_reference(pool_a, rows_a)
        if pool_b is not None:
            keys = torch.cat([keys, gather_reference(pool_b, rows_b)], dim=1)
        return attention_reference(q, keys.unsqueeze(1), bias, sinks, scale)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 7 or set(op.kwargs) != {"scale"}:
            raise VerificationError(f"{self.name} takes (q, pool_a, rows_a, pool_b, rows_b, bias, sinks) and scale=")
        q, pool_a, rows_a, pool_b, rows_b = op.args[:5]
        pairs = [(pool_a, rows_a)] + ([(pool_b, rows_b)] if pool_b is not None or rows_b is not None else [])
        ok = isinstance(q.type, TensorType) and q.type.rank == 4
        for pool, rows in pairs:
            ok = ok and pool is not None and rows is not None and isinstance(pool.type, TensorType) \
                and isinstance(rows.type, TensorType) and pool.type.rank == 2 and rows.type.rank == 2 \
                and pool.type.shape[1] == q.type.shape[3] and rows.type.shape[0] == q.type.shape[0]
        if not ok:
            raise VerificationError(f"{self.name}: q must be [B,H,S,D], pools [M,D] and rows [B,T] (a second pool "
                                    f"and rows both or neither); got {[getattr(a, 'type', a) for a in op.args[:5]]}")


@register_op
class AttentionSlidingRows(_AttentionRows):
    name = "attention.sliding.rows"


@register_op
class AttentionCsaRows(_AttentionRows):
    name = "attention.csa.rows"


@register_op
class AttentionHcaRows(_AttentionRows):
    name = "attention.hca.rows"


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
