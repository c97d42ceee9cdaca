"""``moe``: routed experts as two grouped GEMMs over (token, pick) pairs sorted by expert.

Routing (router GEMM, score, top-k or hash table, normalisation) and the shared expert stay in
torch. The ``P = tokens x top_k`` pairs are sorted by expert on the device (``torch.sort`` and
``torch.searchsorted``: no ``bincount``, whose CUDA version reads the maximum back to the host),
giving ``segments[e]:segments[e+1]``, the sorted rows of expert ``e``. Then:

1. ``gate_up``: a program owns ``block_m`` sorted rows of one expert and ``block_n`` columns of
   each half of ``gate_up[e]`` (rows ``[gate; up]``); it gathers the tokens' hidden rows, runs both
   GEMMs against the same A tile and writes ``silu(min(g, L)) * clamp(u, -L, L)`` (x's dtype);
2. ``down``: the same row blocks times ``down[e]ᵀ``; the epilogue scales by the routing weight
   and writes the fp32 row of the pair at its original index ``t * top_k + j``. The sum over
   the k picks is then one deterministic torch reduction (the reference's order, no atomics).

A program learns its expert from the segments alone: with ``blocks_e = ceil(rows_e / block_m)``,
M-block ``b`` belongs to the expert whose cumulative block range holds it. The grid is the
static worst case, ``floor((P - m) / block_m) + m`` M-blocks with ``m = min(P, experts)``, and
programs past the last block return at once — so each expert's weight tile is read once per
M-block (once per expert in decode, where an expert holds a few tokens), only experts with
tokens are read, and nothing synchronises with the host: a decode step can be captured whole
in a CUDA graph.

``moe.packed`` (the kernel backends' form of ``moe`` over packed weights, see
``ds4c.backends.cuda.executor.unpack_weights_once``) runs the same kernels on FP8 or INT8 expert
weights as stored: a tile is loaded in its storage type and converted in registers, each K step's
partial product is scaled by its 128x128 block's scale (FP8; K tiles never straddle a block), or
the accumulator by the row scales (INT8). The shared expert goes through ``linear.packed``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.cuda.kernels import register_kernel
from ds4c.backends.cuda.kernels.attention import dot_operand, interpreter_bf16, round_to
from ds4c.backends.cuda.kernels.configs import MoeConfig, active_target, dot_precision, moe_config
from ds4c.backends.cuda.kernels.linear import _MODES, BLOCK_F32, BLOCK_UE8M0, linear_packed, storage_to_dot
from ds4c.ir.registry import get_op
from ds4c.ops.moe import _route, _shared
from ds4c.ops.quant import packed_operand_count

__all__ = ["MoeConfig", "moe", "moe_config"]


@triton.jit
def _expert_rows(seg_ptr, n_experts, pid_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row, live) of M-block ``pid_m`` from the segment offsets."""
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < n_experts
    lo = tl.load(seg_ptr + e_idx, mask=e_ok, other=0)
    hi = tl.load(seg_ptr + e_idx + 1, mask=e_ok, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    total = tl.sum(blocks, 0)
    # experts whose blocks all come before pid_m; padded lanes end at `total` > pid_m when live
    expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
    mine = e_idx == expert
    first_block = tl.sum(tl.where(mine, ends - blocks, 0), 0)
    row0 = tl.sum(tl.where(mine, lo, 0), 0) + (pid_m - first_block) * BLOCK_M
    row_end = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row0, row_end, pid_m < total


@triton.jit
def _block_scale(s_ptr, expert, rows, cols_total, out_rows, k0, row_ok, SCALE: tl.constexpr):
    """The 128x128-block scales of weight rows ``out_rows`` at input ``k0`` of one expert's
    [rows, cols_total] matrix (fp32, or UE8M0 exponent bytes when SCALE == 2)."""
    s_cols = (cols_total + 127) // 128
    base = s_ptr + expert.to(tl.int64) * ((rows + 127) // 128) * s_cols
    s = tl.load(base + (out_rows // 128) * s_cols + k0 // 128, mask=row_ok, other=0)
    if SCALE == 2:
        s = tl.exp2(s.to(tl.float32) - 127.0)
    return s


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, order_ptr, seg_ptr, h_ptr,
                    n_experts, top_k, inter, hidden, limit,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                    EVEN_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                    INTERPRETER_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end, live = _expert_rows(seg_ptr, n_experts, pid_m, BLOCK_M, BLOCK_E)
    if not live:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    token = tl.load(order_ptr + rows, mask=row_ok, other=0) // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = x_ptr + token.to(tl.int64)[:, None] * hidden + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * (2 * inter) * hidden
    # [BLOCK_K, BLOCK_N] views of the gate rows `cols` and the up rows `inter + cols`
    g_ptrs = w_base + cols.to(tl.int64)[None, :] * hidden + offs_k[:, None]
    u_ptrs = g_ptrs + inter * hidden
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < hidden
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = dot_operand(a, INTERPRETER_BF16)
        wg = storage_to_dot(wg, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        wu = storage_to_dot(wu, x_ptr.dtype.element_ty, INTERPRETER_BF16)
        if SCALE == 1 or SCALE == 2:  # one scale per 128x128 block: scale each K step's partials
            sg = _block_scale(s_ptr, expert, 2 * inter, hidden, cols, k0, col_ok, SCALE)
            su = _block_scale(s_ptr, expert, 2 * inter, hidden, inter + cols, k0, col_ok, SCALE)
            acc_g += tl.dot(a, wg, input_precision=PRECISION) * sg[None, :]
            acc_u += tl.dot(a, wu, input_precision=PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K

    if SCALE == 3:  # one scale per output row
        s_base = s_ptr + expert.to(tl.int64) * (2 * inter)
        acc_g = acc_g * tl.load(s_base + cols, mask=col_ok, other=0.0)[None, :]
        acc_u = acc_u * tl.load(s_base + inter + cols, mask=col_ok, other=0.0)[None, :]
    g = tl.minimum(acc_g, limit)
    u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(h_ptrs, round_to(h, h_ptr.dtype.element_ty, INTERPRETER_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, order_ptr, seg_ptr, weight_ptr, y_ptr,
                 n_experts, inter, hidden,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                 EVEN_K: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                 INTERPRETER_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row0, row_end, live = _expert_rows(seg_ptr, n_experts, pid_m, BLOCK_M, BLOCK_E)
    if not live:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * inter + offs_k[None, :]
    w_ptrs = w_ptr + expert.to(tl.int64) * hidden * inter + cols.to(tl.int64)[None, :] * inter + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < inter
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a = dot_operand(a, INTERPRETER_BF16)
        w = storage_to_dot(w, h_ptr.dtype.element_ty, INTERPRETER_BF16)
        if SCALE == 1 or SCALE == 2:
            sw = _block_scale(s_ptr, expert, hidden, inter, cols, k0, col_ok, SCALE)
            acc += tl.dot(a, w, input_precision=PRECISION) * sw[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SCALE == 3:
        acc = acc * tl.load(s_ptr + expert.to(tl.int64) * hidden + cols, mask=col_ok, other=0.0)[None, :]
    pair = tl.load(order_ptr + rows, mask=row_ok, other=0)
    scale = tl.load(weight_ptr + pair, mask=row_ok, other=0.0)
    y_ptrs = y_ptr + pair.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(y_ptrs, acc * scale[:, None], mask=row_ok[:, None] & col_ok[None, :])


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@register_kernel("moe")
def moe(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int, route_scale: float,
        swiglu_limit: float, routing: str, score: str):
    """Launcher with ``moe_reference``'s signature; declines dtypes other than fp32/bf16/fp16,
    expert weights of another dtype than x, and shapes that do not form [E, 2I, D] / [E, D, I]."""
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        return NotImplemented
    routed = _routed(x, ids, router, selector, (gate_up, None, 0), (down, None, 0), top_k=top_k,
                     route_scale=route_scale, swiglu_limit=swiglu_limit, routing=routing, score=score)
    if routed is NotImplemented:
        return NotImplemented
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit)


@register_kernel("moe.packed")
def moe_packed(x, ids, router, selector, *packed, formats: list[str], shapes: list[list[int]], top_k: int,
               route_scale: float, swiglu_limit: float, routing: str, score: str):
    """``moe.packed``: the routed experts' GEMMs read FP8 (128x128 block scales) or INT8 (row
    scales) expert weights as stored; the shared expert's linears go through ``linear.packed``'s
    GEMV (its reference, dequantise + cuBLAS, for many tokens). Declines other formats."""
    if any(f not in _MODES and f != "none" for f in formats):
        return NotImplemented
    weights, i = [], 0
    for fmt, shape in zip(formats, shapes, strict=True):  # (tensors, scale mode, format, shape) per weight
        n = packed_operand_count([fmt], [shape])
        weights.append((packed[i:i + n], _MODES.get(fmt, 0), fmt, shape))
        i += n
    (gu, gu_mode, _, _), (dn, dn_mode, _, _) = weights[:2]
    if gu_mode == 0 and gu[0].dtype != x.dtype or dn_mode == 0 and dn[0].dtype != x.dtype:
        return NotImplemented
    routed = _routed(x, ids, router, selector, (gu[0], gu[1] if len(gu) > 1 else None, gu_mode),
                     (dn[0], dn[1] if len(dn) > 1 else None, dn_mode), top_k=top_k, route_scale=route_scale,
                     swiglu_limit=swiglu_limit, routing=routing, score=score)
    if routed is NotImplemented:
        return NotImplemented

    def linear(h, w):  # the shared expert's weights: linear.packed's kernel, else its reference
        tensors, _, fmt, shape = w
        if fmt == "none":
            return torch.nn.functional.linear(h, tensors[0])
        y = linear_packed(h, *tensors, format=fmt, shape=shape)
        return get_op("linear.packed").reference(h, *tensors, format=fmt, shape=shape) if y is NotImplemented else y

    return routed + _shared(x, *weights[2:], swiglu_limit, linear=linear)


def _routed(x, ids, router, selector, gate_up, down, *, top_k: int, route_scale: float, swiglu_limit: float,
            routing: str, score: str):
    """The routed experts' sum (x's dtype, x's shape); ``gate_up`` / ``down`` are (weight in its
    storage type, scale or None, scale mode of ``linear.SCALE``)."""
    (gate_up, gu_scale, gu_mode), (down, dn_scale, dn_mode) = gate_up, down
    if x.dtype not in _DTYPES:
        return NotImplemented
    if gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[1] % 2:
        return NotImplemented
    experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    if hidden != x.shape[-1] or tuple(down.shape) != (experts, hidden, inter) or not 0 < top_k <= experts:
        return NotImplemented
    if not (x.device == gate_up.device == down.device):
        return NotImplemented

    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    if idx.shape[-1] != top_k:  # a hash table of another width than top_k
        return NotImplemented
    target = active_target()
    cfg = moe_config(flat.shape[0] * top_k, experts, x.dtype, target)
    if (gu_mode in (BLOCK_F32, BLOCK_UE8M0) or dn_mode in (BLOCK_F32, BLOCK_UE8M0)) and 128 % cfg.block_k:
        return NotImplemented
    tokens = flat.shape[0]
    pairs = tokens * top_k
    routed = torch.zeros((tokens, hidden), dtype=torch.float32, device=x.device)
    if pairs > 0:
        flat = flat.contiguous()
        gate_up, down = gate_up.contiguous(), down.contiguous()
        gu_scale = gate_up if gu_scale is None else gu_scale.contiguous()
        dn_scale = down if dn_scale is None else dn_scale.contiguous()
        sorted_experts, order = torch.sort(idx.reshape(-1), stable=True)
        segments = torch.searchsorted(sorted_experts, torch.arange(experts + 1, device=x.device,
                                                                   dtype=sorted_experts.dtype))
        weights = w.reshape(-1).to(torch.float32).contiguous()

        m = min(pairs, experts)
        m_blocks = (pairs - m) // cfg.block_m + m
        common = dict(BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, BLOCK_E=triton.next_power_of_2(experts),
                      PRECISION=dot_precision(x.dtype, target), INTERPRETER_BF16=interpreter_bf16(x.dtype),
                      **cfg.launch.kwargs(target))
        h = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
        _gate_up_kernel[(m_blocks, triton.cdiv(inter, cfg.block_n_up))](
            flat, gate_up, gu_scale, order, segments, h, experts, top_k, inter, hidden, float(swiglu_limit),
            BLOCK_N=cfg.block_n_up, EVEN_K=hidden % cfg.block_k == 0, SCALE=gu_mode, **common)
        y = torch.empty((pairs, hidden), dtype=torch.float32, device=x.device)
        _down_kernel[(m_blocks, triton.cdiv(hidden, cfg.block_n_down))](
            h, down, dn_scale, order, segments, weights, y, experts, inter, hidden,
            BLOCK_N=cfg.block_n_down, EVEN_K=inter % cfg.block_k == 0, SCALE=dn_mode, **common)
        routed = y.view(tokens, top_k, hidden).sum(dim=1)
    return routed.to(x.dtype).view(x.shape)
