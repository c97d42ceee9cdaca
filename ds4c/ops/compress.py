"""``compress`` and ``indexer.topk``: the compressed-KV side of CSA/HCA.

    %e = compress(%kv, %score, %norm_w, eps=1e-06) : f32[B,n,d]
        per channel, a softmax over the window's slots (dim -2, fp32) weights the slots' kv; the
        pooled vector is RMS-normalised (the compressor's kv_norm). kv/score [.., slots, d] hold the
        window's tokens (CSA: previous window's first half ++ this window's second half; HCA: m tokens).
    %i = indexer.topk(%q, %keys, %w, %future, k=512, softmax_scale=0.088, weights_scale=0.125) : i64[B,S,k]
        I[t,s] = Σ_h w[t,h]·weights_scale · ReLU(q[t,h]·keys[s])·softmax_scale; entries where
        ``future`` is true are -inf; the indices of the k largest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType
from ds4c.ops.norms import rms_norm_reference


def compress_reference(kv: torch.Tensor, score: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    pooled = (kv * score.softmax(dim=-2, dtype=torch.float32).to(kv.dtype)).sum(dim=-2)
    return rms_norm_reference(pooled, norm_w, eps)


def index_scores_reference(q, keys, w, softmax_scale: float, weights_scale: float) -> torch.Tensor:
    scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))
    scores = F.relu(scores) * softmax_scale
    weights = w.float() * weights_scale
    return (scores * weights.unsqueeze(-1)).sum(dim=2)


@register_op
class Compress(OpDef):
    name = "compress"
    num_results = 1
    operands = (Operand("kv"), Operand("score"), Operand("norm_w", "weight"))
    traits = frozenset({"npu"})

    def reference(self, kv, score, norm_w, *, eps: float):
        return compress_reference(kv, score, norm_w, eps)

    def infer_types(self, operand_types, kwargs):
        kv = self.tensor_operand(operand_types, 0, min_rank=2)  # [.., slots, d]: the slots are pooled
        return [TensorType(kv.dtype, (*kv.shape[:-2], kv.shape[-1]))]


@register_op
class IndexerTopk(OpDef):
    name = "indexer.topk"
    num_results = 1
    operands = (Operand("q"), Operand("keys"), Operand("w"), Operand("future", "index"))
    traits = frozenset({"topk"})

    def reference(self, q, keys, w, future, *, k: int, softmax_scale: float, weights_scale: float):
        s = index_scores_reference(q, keys, w, softmax_scale, weights_scale).masked_fill(future, float("-inf"))
        return s.topk(k, dim=-1).indices

    def infer_types(self, operand_types, kwargs):
        q = self.tensor_operand(operand_types, 0, min_rank=2)  # [.., heads, d]: scores summed over the heads
        k = kwargs.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VerificationError(f"indexer.topk: k must be a positive int, got {k!r}")
        return [TensorType(torch.int64, (*q.shape[:-2], k))]
