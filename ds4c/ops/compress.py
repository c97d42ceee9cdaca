"""``compress`` and ``indexer.topk``: the compressed-KV side of CSA/HCA.

    %e = compress(%kv, %score, %norm_w, eps=1e-06) : f32[B,n,d]
        per channel, a softmax over the window's slots (dim -2, fp32) weights the slots' kv; the
        pooled vector is RMS-normalised (the compressor's kv_norm). kv/score [.., slots, d] hold the
        window's tokens (CSA: previous window's first half ++ this window's second half; HCA: m tokens).
    %i = indexer.topk(%q, %keys, %w, %future, k=512, softmax_scale=0.088, weights_scale=0.125) : i64[B,S,k]
        I[t,s] = Σ_h w[t,h]·weights_scale · ReLU(q[t,h]·keys[s])·softmax_scale; entries where
        ``future`` is true are -inf; the indices of the k largest.
    %i = indexer.topk.rows(%q, %pool, %rows, %w, %future, k=512, ...) : i64[N,1,k]
        ``indexer.topk`` whose keys are rows of a pool [M, d], keys[b, c] = pool[rows[b, c]] (a zero
        row where rows is -1): a serving step's keys read through its page tables, as the lowering
        pass ``fuse_paged_reads`` makes it of ``indexer.topk(q, paged.gather(pool, rows), ..)``.
    %r = compress.rows(%kv, %gate, %position_bias, %positions) : bf16[N,2048]
        a serving step's compressor rows: kv ++ (gate + position_bias[positions % m]) per token, as
        its ring stores them (one launch instead of remainder, index_select, add and cat). The model
        calls it as ``torch.ops.ds4c.compressor_rows``; the importer names it (``TORCH_OPS``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType
from ds4c.ops.norms import rms_norm_reference
from ds4c.ops.paged import gather_reference, rows_reference

COMPRESS_ROWS = "compress.rows"
TORCH_OPS = {"ds4c::compressor_rows": COMPRESS_ROWS}


def compressor_rows_reference(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor,
                              positions: torch.Tensor) -> torch.Tensor:
    """[N, 2w]: ``kv`` [N, w] ++ (``gate`` [N, w] + ``position_bias[positions % m]``), m its rows."""
    m = position_bias.shape[0]
    return torch.cat([kv, gate + position_bias.index_select(0, positions % m)], dim=-1)


@torch.library.custom_op("ds4c::compressor_rows", mutates_args=())
def _compressor_rows(kv: torch.Tensor, gate: torch.Tensor, position_bias: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    return compressor_rows_reference(kv, gate, position_bias, positions)


@_compressor_rows.register_fake
def _(kv, gate, position_bias, positions):
    dtype = torch.promote_types(kv.dtype, torch.promote_types(gate.dtype, position_bias.dtype))
    return kv.new_empty((kv.shape[0], kv.shape[1] + gate.shape[1]), dtype=dtype)


@register_op
class CompressorRows(OpDef):
    name = COMPRESS_ROWS
    num_results = 1
    operands = (Operand("kv"), Operand("gate"), Operand("position_bias", "weight"), Operand("positions", "index"))

    def reference(self, kv, gate, position_bias, positions):
        return compressor_rows_reference(kv, gate, position_bias, positions)

    def infer_types(self, operand_types, kwargs):
        kv = self.tensor_operand(operand_types, 0, min_rank=2)
        gate = self.tensor_operand(operand_types, 1, min_rank=2)
        bias = self.tensor_operand(operand_types, 2, min_rank=2)
        positions = self.tensor_operand(operand_types, 3, min_rank=1)
        if kv.rank != 2 or gate.rank != 2 or bias.rank != 2 or positions.rank != 1 or kv.shape != gate.shape \
                or bias.shape[1] != gate.shape[1] or kv.shape[0] != positions.shape[0] \
                or positions.dtype not in (torch.int32, torch.int64) or not isinstance(kv.shape[1], int):
            raise VerificationError(f"{COMPRESS_ROWS}: takes kv [N, w], gate [N, w], position_bias [m, w] and "
                                    f"positions [N] (integers); got {kv}, {gate}, {bias}, {positions}")
        dtype = torch.promote_types(kv.dtype, torch.promote_types(gate.dtype, bias.dtype))
        return [TensorType(dtype, (kv.shape[0], 2 * kv.shape[1]))]


def compress_reference(kv: torch.Tensor, score: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    pooled = (kv * score.softmax(dim=-2, dtype=torch.float32).to(kv.dtype)).sum(dim=-2)
    return rms_norm_reference(pooled, norm_w, eps)


def indexer_topk_reference(q, keys, w, future, k: int, softmax_scale: float, weights_scale: float) -> torch.Tensor:
    """The k highest index scores' entries, ``future`` entries at -inf (every ``indexer.topk`` form)."""
    s = index_scores_reference(q, keys, w, softmax_scale, weights_scale).masked_fill(future, float("-inf"))
    return s.topk(k, dim=-1).indices


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
        return indexer_topk_reference(q, keys, w, future, k, softmax_scale, weights_scale)

    def infer_types(self, operand_types, kwargs):
        q = self.tensor_operand(operand_types, 0, min_rank=2)  # [.., heads, d]: scores summed over the heads
        k = kwargs.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VerificationError(f"indexer.topk: k must be a positive int, got {k!r}")
        return [TensorType(torch.int64, (*q.shape[:-2], k))]


INDEXER_TOPK_ROWS, INDEXER_TOPK_TABLE = "indexer.topk.rows", "indexer.topk.table"


@register_op
class IndexerTopkRows(OpDef):
    """``indexer.topk`` over keys gathered from ``pool`` [M, d] at ``rows`` [B, C] (-1: a zero row):
    the same scores and selection, without the [B, C, d] copy of the keys (a serving step's indexer
    reads every entry each token may see: at a 2048-token step and a 65536-token context, 8.6 GB
    gathered per CSA layer)."""

    name = INDEXER_TOPK_ROWS
    num_results = 1
    operands = (Operand("q"), Operand("pool"), Operand("rows", "index"), Operand("w"), Operand("future", "index"))
    traits = frozenset({"topk"})

    def reference(self, q, pool, rows, w, future, *, k: int, softmax_scale: float, weights_scale: float):
        return indexer_topk_reference(q, gather_reference(pool, rows), w, future, k, softmax_scale, weights_scale)

    def infer_types(self, operand_types, kwargs):
        q = self.tensor_operand(operand_types, 0, min_rank=2)
        pool = self.tensor_operand(operand_types, 1, min_rank=2)
        rows = self.tensor_operand(operand_types, 2, min_rank=1)
        if pool.rank != 2 or rows.rank != 2 or rows.dtype not in (torch.int32, torch.int64) \
                or pool.shape[1] != q.shape[-1]:
            raise VerificationError(f"{INDEXER_TOPK_ROWS}: takes q [.., heads, d], a pool [M, d] and rows [B, C] "
                                    f"(integers); got {q}, {pool}, {rows}")
        return IndexerTopk.infer_types(self, operand_types, kwargs)


@register_op
class IndexerTopkTable(OpDef):
    """``indexer.topk.rows`` whose rows are those of ``paged.rows(table, seq, none, limit,
    count=, page=)``: entry ``c < limit[b]`` of query ``b`` is row ``table[seq[b], c // page] * page
    + c % page`` of ``pool`` [M, d], the others zero keys; the kernel finds each key's row through
    the page table, so nothing of size [B, C] is made but the scores."""

    name = INDEXER_TOPK_TABLE
    num_results = 1
    operands = (Operand("q"), Operand("pool"), Operand("table", "index"), Operand("seq", "index"),
                Operand("limit", "index"), Operand("w"), Operand("future", "index"))
    traits = frozenset({"topk"})

    def reference(self, q, pool, table, seq, limit, w, future, *, k: int, count: int, page: int, softmax_scale: float,
                  weights_scale: float):
        keys = gather_reference(pool, rows_reference(table, seq, None, limit, count=count, page=page))
        return indexer_topk_reference(q, keys, w, future, k, softmax_scale, weights_scale)

    def infer_types(self, operand_types, kwargs):
        q = self.tensor_operand(operand_types, 0, min_rank=2)
        pool = self.tensor_operand(operand_types, 1, min_rank=2)
        table = self.tensor_operand(operand_types, 2, min_rank=2)
        count, page = kwargs.get("count"), kwargs.get("page")
        if pool.rank != 2 or table.rank != 2 or pool.shape[1] != q.shape[-1] or not isinstance(count, int) \
                or not isinstance(page, int) or count < 1 or page < 1:
            raise VerificationError(f"{INDEXER_TOPK_TABLE}: takes q [.., heads, d], a pool [M, d], a table [R, S], "
                                    f"count= and page= (positive); got {q}, {pool}, {table}, {count}, {page}")
        return IndexerTopk.infer_types(self, operand_types, kwargs)
