"""``moe`` for few tokens (decode): expert GEMVs that read only the picked experts' weights.

For ``P = tokens x top_k`` (token, pick) pairs, two kernels:

1. ``gate_up``: program (p, n-block) reads rows ``n`` of expert ``e_p``'s gate and up halves
   once, dots them with the token's hidden vector (fp32), and writes
   ``silu(min(g, L)) * clamp(u, -L, L)`` — the clamped SwiGLU fused in the epilogue;
2. ``down``: program (p, n-block) dots rows of ``down[e_p]`` with that activation and scales by
   the routing weight.

No host synchronisation, so a decode step stays capturable as a CUDA graph. Routing (router GEMM,
score, top-k or hash table, normalisation) and the shared expert stay in torch (cuBLAS).

Above ``MAX_PAIRS`` pairs (prefill) grouping tokens by expert pays: pairs are sorted by expert on
the device and both expert GEMMs run as one grouped GEMM each (``torch._grouped_mm``, CUTLASS on
sm_90; bf16), again without host synchronisation; fp32 prefill declines to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.cuda.kernels import register_kernel
from ds4c.ops.moe import _route, _shared

MAX_PAIRS = 256
BLOCK_N = 16
BLOCK_K = 256


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, sel_ptr, h_ptr, top_k, inter, hidden, limit,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(sel_ptr + p).to(tl.int64)
    t = p // top_k
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < inter
    w_base = w_ptr + e * (2 * inter) * hidden
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < hidden
        xv = tl.load(x_ptr + t * hidden + cols, mask=cmask, other=0.0).to(tl.float32)
        m2 = rmask[:, None] & cmask[None, :]
        wg = tl.load(w_base + rows[:, None].to(tl.int64) * hidden + cols[None, :], mask=m2, other=0.0)
        wu = tl.load(w_base + (rows[:, None] + inter).to(tl.int64) * hidden + cols[None, :], mask=m2, other=0.0)
        acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
        acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
    g = tl.minimum(acc_g, limit)
    u = tl.minimum(tl.maximum(acc_u, -limit), limit)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + p * inter + rows, h.to(h_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _down_kernel(h_ptr, w_ptr, sel_ptr, rw_ptr, out_ptr, inter, hidden,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(sel_ptr + p).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < hidden
    w_base = w_ptr + e * hidden * inter
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < inter
        hv = tl.load(h_ptr + p * inter + cols, mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(w_base + rows[:, None].to(tl.int64) * inter + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * hv[None, :], axis=1)
    scale = tl.load(rw_ptr + p).to(tl.float32)
    tl.store(out_ptr + p * hidden + rows, acc * scale, mask=rmask)


@register_kernel("moe")
def moe(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int, route_scale: float,
        swiglu_limit: float, routing: str, score: str):
    d = x.shape[-1]
    pairs = x.numel() // d * top_k
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16) or gate_up.dim() != 3 or down.dim() != 3:
        return NotImplemented
    if pairs > MAX_PAIRS:
        if gate_up.dtype != torch.bfloat16 or x.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
            return NotImplemented
        return _moe_grouped(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, top_k=top_k,
                            route_scale=route_scale, swiglu_limit=swiglu_limit, routing=routing, score=score)
    experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    if hidden != d or tuple(down.shape) != (experts, d, inter):
        return NotImplemented
    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    sel = idx.reshape(-1).contiguous()
    flat = flat.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    h = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(pairs, triton.cdiv(inter, BLOCK_N))](flat, gate_up, sel, h, top_k, inter, d,
                                                          float(swiglu_limit), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    out = torch.empty((pairs, d), dtype=torch.float32, device=x.device)
    rw = w.reshape(-1).to(torch.float32).contiguous()
    _down_kernel[(pairs, triton.cdiv(d, BLOCK_N))](h, down, sel, rw, out, inter, d, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    routed = out.view(-1, top_k, d).sum(dim=1).to(x.dtype).view(x.shape)
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit)


def _moe_grouped(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int, route_scale: float,
                 swiglu_limit: float, routing: str, score: str) -> torch.Tensor:
    """Many tokens: pairs sorted by expert, two grouped GEMMs, weighted scatter-add (all on device)."""
    d = x.shape[-1]
    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    sel = idx.reshape(-1)
    order = torch.argsort(sel, stable=True)
    token_of = order // top_k
    offs = torch.cumsum(torch.bincount(sel, minlength=gate_up.shape[0]), 0).to(torch.int32)
    xs = flat[token_of]
    gu = torch._grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    h = torch.nn.functional.silu(g.clamp(max=swiglu_limit)) * u.clamp(min=-swiglu_limit, max=swiglu_limit)
    y = torch._grouped_mm(h, down.transpose(-2, -1), offs=offs)
    y = y * w.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros((flat.shape[0], d), dtype=torch.float32, device=x.device).index_add_(0, token_of, y.float())
    routed = out.to(x.dtype).view(x.shape)
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit)
