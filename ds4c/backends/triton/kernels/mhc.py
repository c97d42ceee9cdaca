"""mHC: ``mhc.pre``, ``mhc.post`` and ``mhc.head`` (N = hc_mult residual streams of D channels).

``pre``/``head`` run two kernels:

1. ``mix``: ``x·fnᵀ`` and ``Σx²`` over the flattened row ``x = H[t].flatten()`` (K = N·D = 16384
   for V4-Flash) for a block of ``BLOCK_T`` tokens, one fp32 GEMM (tf32x3: fp32 accuracy on tensor
   cores) with the K axis split over ``splits`` programs: a decode step (1 token) spreads the
   1.5 MB of fn over many SMs instead of one, and prefill reads fn once per 16 tokens, not once
   per token. Partial sums go to an fp32 scratch.
2. ``finish``: a program per (token, block of ``BLOCK_D_COLLAPSE`` channels) sums the partials,
   applies the RMS scale (``mix = r·(x·fnᵀ)``, the reference's ``(r·x)·fnᵀ`` up to rounding), the
   sigmoids and, for ``pre``, softmax and Sinkhorn on the N×N tile (each program of a token
   recomputes them: a few hundred flops); then collapses ``Σ_i pre_i·H_i`` over its channels. A
   decode step's token thus spreads over D/512 programs instead of one warp walking all of D
   (7.5 us per call on an H200).

``post`` is elementwise over [N, D] per token: ``post_i·f + Σ_j comb[j, i]·H_j``, with the
reference's roundings to H's dtype (each product, the N-term matmul, the sum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.attention import interpreter_bf16, round_to
from ds4c.backends.triton.kernels.configs import (
    MHC_BLOCK_K,
    MHC_BLOCK_T,
    KernelContext,
    Launch,
    mhc_mix_launch,
    mhc_mix_programs,
)
from ds4c.backends.triton.kernels.pdl import wait_for_producers

BLOCK_T = MHC_BLOCK_T  # tokens per mix program (tl.dot's minimum M)
BLOCK_K = MHC_BLOCK_K  # K step of the mix GEMM
BLOCK_D_COLLAPSE = 512


@triton.jit
def _mix_kernel(h_ptr, fn_ptr, part_ptr, sq_ptr, tokens, k_total, k_per_split, n_mix, stride_h,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MIX_PAD: tl.constexpr, PRECISION: tl.constexpr,
                PDL: tl.constexpr):
    wait_for_producers(PDL)
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < tokens
    j = tl.arange(0, MIX_PAD)
    j_ok = j < n_mix
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_total)
    acc = tl.zeros([BLOCK_T, MIX_PAD], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < k_hi
        x = tl.load(h_ptr + t.to(tl.int64)[:, None] * stride_h + k[None, :],
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        fn = tl.load(fn_ptr + j[None, :] * k_total + k[:, None], mask=k_ok[:, None] & j_ok[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(x, fn, acc, input_precision=PRECISION)
        sq += x * x
    out = (split * tokens + t.to(tl.int64))
    tl.store(part_ptr + out[:, None] * MIX_PAD + j[None, :], acc, mask=t_ok[:, None])
    tl.store(sq_ptr + out, tl.sum(sq, axis=1), mask=t_ok)


@triton.jit
def _mix_of_token(part_ptr, sq_ptr, t, tokens, splits, k_total, eps,
                  MIX_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr):
    """Token t's ``rms(x)·fnᵀ`` [MIX_PAD]: the split partials summed in one tile load."""
    s = tl.arange(0, SPLIT_PAD)
    s_ok = s < splits
    row = s * tokens + t
    m = tl.arange(0, MIX_PAD)
    part = tl.load(part_ptr + row[:, None] * MIX_PAD + m[None, :], mask=s_ok[:, None], other=0.0)
    sq = tl.sum(tl.load(sq_ptr + row, mask=s_ok, other=0.0), axis=0)
    return tl.sum(part, axis=0) * tl.rsqrt(sq / k_total + eps)


@triton.jit
def _pick(mix, idx, MIX_PAD: tl.constexpr):
    """mix[idx] for a [NP] index vector (a register gather as a masked sum)."""
    m = tl.arange(0, MIX_PAD)
    return tl.sum(tl.where(idx[:, None] == m[None, :], mix[None, :], 0.0), axis=1)


@triton.jit
def _pick2(mix, idx, MIX_PAD: tl.constexpr):
    """mix[idx] for an [NP, NP] index tile."""
    m = tl.arange(0, MIX_PAD)
    return tl.sum(tl.where(idx[:, :, None] == m[None, None, :], mix[None, None, :], 0.0), axis=2)


@triton.jit
def _collapse(h_ptr, out_ptr, t, dim, stride_h, weights, i, i_ok,
              BLOCK_D: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """out[t, block] = Σ_i weights_i · H[t, i, block] in fp32, rounded to out's dtype; ``block``: this
    program's ``BLOCK_D`` channels (grid axis 1)."""
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    hv = tl.load(h_ptr + t * stride_h + i[:, None] * dim + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
    y = tl.sum(weights[:, None] * hv.to(tl.float32), axis=0)
    tl.store(out_ptr + t * dim + d, round_to(y, out_ptr.dtype.element_ty, INTERPRETER_BF16), mask=d_ok)


@triton.jit
def _pre_finish_kernel(part_ptr, sq_ptr, base_ptr, scale_ptr, h_ptr, out_ptr, post_ptr, comb_ptr,
                       tokens, splits, k_total, dim, stride_h, norm_eps, hc_eps, iters,
                       N: tl.constexpr, NP: tl.constexpr, MIX_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr,
                       BLOCK_D: tl.constexpr,
                       INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    i_ok = i < N
    j = tl.arange(0, NP)
    ij = i[:, None] * N + j[None, :]
    ij_ok = i_ok[:, None] & (j < N)[None, :]
    mix = _mix_of_token(part_ptr, sq_ptr, t, tokens, splits, k_total, norm_eps, MIX_PAD, SPLIT_PAD)
    pre_w = _pick(mix, i, MIX_PAD)
    post_w = _pick(mix, N + i, MIX_PAD)
    comb_w = _pick2(mix, 2 * N + ij, MIX_PAD)
    s_pre = tl.load(scale_ptr).to(tl.float32)
    s_post = tl.load(scale_ptr + 1).to(tl.float32)
    s_comb = tl.load(scale_ptr + 2).to(tl.float32)
    pre = tl.sigmoid(pre_w * s_pre + tl.load(base_ptr + i, mask=i_ok, other=0.0).to(tl.float32)) + hc_eps
    post = 2 * tl.sigmoid(post_w * s_post + tl.load(base_ptr + N + i, mask=i_ok, other=0.0).to(tl.float32))

    logits = comb_w * s_comb + tl.load(base_ptr + 2 * N + ij, mask=ij_ok, other=0.0).to(tl.float32)
    logits = tl.where(ij_ok, logits, float("-inf"))
    row_max = tl.where(i_ok, tl.max(logits, axis=1), 0.0)  # padded rows (N < NP) stay finite
    e = tl.where(ij_ok, tl.exp(logits - row_max[:, None]), 0.0)
    denominator = tl.where(i_ok, tl.sum(e, axis=1), 1.0)
    comb = tl.where(ij_ok, e / denominator[:, None] + hc_eps, 0.0)
    comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)  # Sinkhorn: columns first
    for _ in range(1, iters):
        comb = comb / (tl.sum(comb, axis=1)[:, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)

    if tl.program_id(1) == 0:
        tl.store(post_ptr + t * N + i, post, mask=i_ok)
        tl.store(comb_ptr + t * N * N + ij, comb, mask=ij_ok)
    _collapse(h_ptr, out_ptr, t, dim, stride_h, tl.where(i_ok, pre, 0.0), i, i_ok, BLOCK_D, INTERPRETER_BF16)


@triton.jit
def _head_finish_kernel(part_ptr, sq_ptr, base_ptr, scale_ptr, h_ptr, out_ptr,
                        tokens, splits, k_total, dim, stride_h, scale_stride, norm_eps, hc_eps,
                        N: tl.constexpr, NP: tl.constexpr, MIX_PAD: tl.constexpr, SPLIT_PAD: tl.constexpr,
                       BLOCK_D: tl.constexpr,
                        INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, NP)
    i_ok = i < N
    mix = _pick(_mix_of_token(part_ptr, sq_ptr, t, tokens, splits, k_total, norm_eps, MIX_PAD, SPLIT_PAD), i, MIX_PAD)
    scale = tl.load(scale_ptr + i * scale_stride, mask=i_ok, other=0.0).to(tl.float32)
    pre = tl.sigmoid(mix * scale + tl.load(base_ptr + i, mask=i_ok, other=0.0).to(tl.float32)) + hc_eps
    _collapse(h_ptr, out_ptr, t, dim, stride_h, tl.where(i_ok, pre, 0.0), i, i_ok, BLOCK_D, INTERPRETER_BF16)


@triton.jit
def _post_kernel(f_ptr, h_ptr, post_ptr, comb_ptr, out_ptr, dim,
                 N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
                 PDL: tl.constexpr):
    wait_for_producers(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    i = tl.arange(0, NP)
    i_ok = i < N
    dtype = out_ptr.dtype.element_ty
    post = round_to(tl.load(post_ptr + t * N + i, mask=i_ok, other=0.0).to(tl.float32), dtype, INTERPRETER_BF16)
    f = tl.load(f_ptr + t * dim + d, mask=d_ok, other=0.0).to(tl.float32)
    spread = round_to(post.to(tl.float32)[:, None] * f[None, :], dtype, INTERPRETER_BF16)
    mixed = tl.zeros([NP, BLOCK_D], dtype=tl.float32)
    h_row = h_ptr + t * N * dim
    for jj in tl.static_range(N):  # (combᵀ·H)[i] = Σ_j comb[j, i] · H[j]
        c = tl.load(comb_ptr + t * N * N + jj * N + i, mask=i_ok, other=0.0).to(tl.float32)
        c = round_to(c, dtype, INTERPRETER_BF16).to(tl.float32)
        hj = tl.load(h_row + jj * dim + d, mask=d_ok, other=0.0).to(tl.float32)
        mixed += c[:, None] * hj[None, :]
    mixed = round_to(mixed, dtype, INTERPRETER_BF16)
    y = spread.to(tl.float32) + mixed.to(tl.float32)
    tl.store(out_ptr + t * N * dim + i[:, None] * dim + d[None, :], round_to(y, dtype, INTERPRETER_BF16),
             mask=i_ok[:, None] & d_ok[None, :])


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _rows(h: torch.Tensor) -> torch.Tensor:
    """H as [tokens, N*D] with unit stride inside a token (a copy only when H is not)."""
    flat = h.reshape(-1, h.shape[-2] * h.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _mix_partials(ctx: KernelContext, flat: torch.Tensor, fn: torch.Tensor):
    """(partials [splits, T, MIX_PAD], Σx² [splits, T], splits, MIX_PAD) of the mix GEMM."""
    tokens, k_total = flat.shape
    n_mix = fn.shape[0]
    mix_pad = max(16, triton.next_power_of_2(n_mix))
    target = ctx.target
    precision, launch = mhc_mix_launch(target)
    token_blocks = triton.cdiv(tokens, BLOCK_T)
    wanted = max(1, min(mhc_mix_programs(target) // token_blocks, triton.cdiv(k_total, 2 * BLOCK_K)))
    k_per_split = triton.cdiv(triton.cdiv(k_total, wanted), BLOCK_K) * BLOCK_K
    splits = triton.cdiv(k_total, k_per_split)
    part = torch.empty((splits, tokens, mix_pad), dtype=torch.float32, device=flat.device)
    sq = torch.empty((splits, tokens), dtype=torch.float32, device=flat.device)
    _mix_kernel[(token_blocks, splits)](flat, fn, part, sq, tokens, k_total, k_per_split, n_mix, flat.stride(0),
                                       BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, MIX_PAD=mix_pad, PRECISION=precision,
                                       **launch.kwargs(ctx))
    return part, sq, splits, mix_pad


def _collapse_grid(tokens: int, d: int) -> tuple[tuple[int, int], int]:
    """(grid, BLOCK_D) of a finish kernel: a program per token and block of collapsed channels."""
    block_d = min(BLOCK_D_COLLAPSE, triton.next_power_of_2(d))
    return (tokens, triton.cdiv(d, block_d)), block_d


def _fits(h, fn, base, n_mix: int) -> bool:
    if h.dtype not in _DTYPES or fn.dtype not in _DTYPES or base.dtype not in _DTYPES or h.dim() < 2:
        return False
    n, d = h.shape[-2:]
    return (tuple(fn.shape) == (n_mix, n * d) and base.numel() == n_mix and h.device == fn.device == base.device
            and n * d > 0)


@register_kernel("mhc.pre")
def mhc_pre(ctx: KernelContext, h, fn, base, scale, *, norm_eps, hc_eps, sinkhorn_iters):
    """Launcher with ``MhcPre.reference``'s signature; declines dtypes other than fp32/bf16/fp16,
    fn not [N(N+2), N·D], base not N(N+2) values, scale not 3, sinkhorn_iters < 1."""
    n, d = h.shape[-2:] if h.dim() >= 2 else (0, 0)
    if not _fits(h, fn, base, n * (n + 2)) or scale.numel() != 3 or int(sinkhorn_iters) < 1:
        return NotImplemented
    lead = h.shape[:-2]
    out = result_buffer(0, (*lead, d), h.dtype, h.device)
    post = result_buffer(1, (*lead, n), torch.float32, h.device)
    comb = result_buffer(2, (*lead, n, n), torch.float32, h.device)
    flat = _rows(h)
    tokens = flat.shape[0]
    if tokens == 0:
        return out, post, comb
    part, sq, splits, mix_pad = _mix_partials(ctx, flat, fn.contiguous())
    grid, block_d = _collapse_grid(tokens, d)
    _pre_finish_kernel[grid](part, sq, base.contiguous(), scale.contiguous(), flat, out, post, comb,
                                  tokens, splits, n * d, d, flat.stride(0), float(norm_eps), float(hc_eps),
                                  int(sinkhorn_iters), N=n, NP=triton.next_power_of_2(n), MIX_PAD=mix_pad,
                                  SPLIT_PAD=triton.next_power_of_2(splits),
                                  BLOCK_D=block_d, INTERPRETER_BF16=interpreter_bf16(h.dtype),
                                  **Launch(2).kwargs(ctx))
    return out, post, comb


@register_kernel("mhc.head")
def mhc_head(ctx: KernelContext, h, fn, base, scale, *, norm_eps, hc_eps):
    """Launcher with ``MhcHead.reference``'s signature; declines dtypes other than fp32/bf16/fp16,
    fn not [N, N·D], base not N values, scale not 1 or N values."""
    n, d = h.shape[-2:] if h.dim() >= 2 else (0, 0)
    if not _fits(h, fn, base, n) or scale.numel() not in (1, n) or scale.device != h.device:
        return NotImplemented
    out = result_buffer(0, (*h.shape[:-2], d), h.dtype, h.device)
    flat = _rows(h)
    tokens = flat.shape[0]
    if tokens == 0:
        return out
    part, sq, splits, mix_pad = _mix_partials(ctx, flat, fn.contiguous())
    scale = scale.contiguous()
    grid, block_d = _collapse_grid(tokens, d)
    _head_finish_kernel[grid](part, sq, base.contiguous(), scale, flat, out, tokens, splits, n * d, d,
                                   flat.stride(0), 0 if scale.numel() == 1 else 1, float(norm_eps), float(hc_eps),
                                   N=n, NP=triton.next_power_of_2(n), MIX_PAD=mix_pad,
                                  SPLIT_PAD=triton.next_power_of_2(splits),
                                   BLOCK_D=block_d, INTERPRETER_BF16=interpreter_bf16(h.dtype),
                                   **Launch(2).kwargs(ctx))
    return out


@register_kernel("mhc.post")
def mhc_post(ctx: KernelContext, f, h, post, comb):
    """Launcher with ``MhcPost.reference``'s signature; declines f of another dtype than H, dtypes
    other than fp32/bf16/fp16, and shapes that are not f [.., D], H [.., N, D], post [.., N],
    comb [.., N, N] with the same leading dims."""
    if h.dtype not in _DTYPES or f.dtype != h.dtype or post.dtype not in _DTYPES or comb.dtype not in _DTYPES:
        return NotImplemented
    if h.dim() < 2:
        return NotImplemented
    n, d = h.shape[-2:]
    lead = tuple(h.shape[:-2])
    if tuple(f.shape) != (*lead, d) or tuple(post.shape) != (*lead, n) or tuple(comb.shape) != (*lead, n, n):
        return NotImplemented
    if not (f.device == h.device == post.device == comb.device):
        return NotImplemented
    out = result_buffer(0, h.shape, h.dtype, h.device)
    tokens = out.numel() // max(n * d, 1)
    if out.numel() == 0:
        return out
    block_d = min(1024, triton.next_power_of_2(d))
    _post_kernel[(tokens, triton.cdiv(d, block_d))](f.contiguous(), h.contiguous(), post.contiguous(),
                                                    comb.contiguous(), out, d, N=n, NP=triton.next_power_of_2(n),
                                                    BLOCK_D=block_d, INTERPRETER_BF16=interpreter_bf16(h.dtype),
                                                    **Launch(4).kwargs(ctx))
    return out
