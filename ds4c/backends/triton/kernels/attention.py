"""Flash attention with one shared K=V head and per-head sinks: ``attention.sliding``, ``.csa``, ``.hca``
(and their ``.rows`` forms).

All H query heads read the same keys (MQA), so a tile's M axis holds (query, head) pairs,
``row = s * H + h``: a decode step (S=1, H=64) is one tensor-core GEMM per block of keys, and the
rows of one tile share their bias row. Softmax is online over blocks of T in fp32, in base 2;
the sink starts the running max and denominator (``m = sink``, ``l = 1``), so a row whose bias is
all -inf comes out 0, as in the reference. Keys serve as values: the P·V product reads the same
rows again, restricted to this program's slice of the output columns.

D=512 (DeepSeek-V4-Flash) is split two ways to fit a Hopper SM (227 KB shared memory per block,
64K registers): the Q·Kᵀ reduction runs over D in chunks of ``block_d``, and in decode the output
columns are split over programs in slices of ``block_dv`` (each recomputes Q·Kᵀ for its slice).
With S > 1 a tile whose bias is -inf for every row is skipped (exact: it would add p = 0).

Decode (S=1) has one tile of rows per sequence, so one program per output slice would leave most
SMs idle while it walks all T keys (flash-slice: 2 programs, 27 us per call on an H200). There the
keys are split over programs as well (flash-decoding): each program runs the online softmax over
its share of T from ``m = -inf, l = 0`` and stores its unnormalised ``acc`` with its ``(m, l)`` in
fp32; ``_merge_kernel`` then rescales the shares to the common max, adds the sink to the
denominator once, and divides.

``attention.*.rows`` (a serving step, one query per token: B tokens, S = 1) reads the keys where
they lie in the pools: key ``t`` of token ``b`` is row ``rows_a[b, t]`` of the first pool (its
window) for ``t < Ta``, then row ``rows_b[b, t - Ta]`` of the second (its compressed entries); a
row of -1 is a zero key, not loaded. The T loop runs once per pool (one indexed base per loop,
which Triton pipelines) and stops at the token's last key whose bias is not -inf.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ds4c.backends.triton.kernels import register_kernel, result_buffer
from ds4c.backends.triton.kernels.configs import (
    AttentionConfig,
    KernelContext,
    Launch,
    attention_config,
    dot_precision,
)
from ds4c.backends.triton.kernels.pdl import wait_for_producers
from ds4c.targets import Target

__all__ = ["AttentionConfig", "attention", "attention_config", "dot_operand", "interpreter_bf16", "round_to"]

LOG2E = 1.4426950408889634


def interpreter_bf16(dtype: torch.dtype) -> bool:
    """Whether bf16 needs the interpreter's workarounds: under ``TRITON_INTERPRET=1`` triton 3.9
    multiplies bf16 dot tiles as their raw uint16 bits (``create_dot``) and truncates fp32 to bf16
    (``_convert_float``). The kernels then feed dots fp32 copies, which hold bf16 products exactly
    as a tensor core does, and round to nearest even by hand, as the GPU's ``cvt.rn`` does."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def dot_operand(x, INTERPRETER_BF16: tl.constexpr):
    if INTERPRETER_BF16:
        x = x.to(tl.float32)
    return x


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (nearest even)."""
    if INTERPRETER_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _last_visible(bias_row, sb_t, t_lo, t_hi, BLOCK_T: tl.constexpr):
    """One past the last key in ``[t_lo, t_hi)`` whose bias (one query's row) is not -inf, rounded
    up to a block and at most ``t_hi`` (``t_lo`` when none): the keys after it add exactly nothing
    (p = 0), so the T loop stops there without a branch in it (a serving step's key lists run to
    the compiled capacity; a short sequence's tail is all -inf). Reads the bias row only."""
    offs_t = tl.arange(0, BLOCK_T)
    last = tl.zeros([], dtype=tl.int32) + t_lo - 1
    for t0 in range(t_lo, t_hi, BLOCK_T):
        t_idx = t0 + offs_t
        b = tl.load(bias_row + t_idx * sb_t, mask=t_idx < t_hi, other=float("-inf")).to(tl.float32)
        last = tl.maximum(last, tl.max(tl.where(b > float("-inf"), t_idx, t_lo - 1), 0))
    return tl.minimum(t_lo + tl.cdiv(last + 1 - t_lo, BLOCK_T) * BLOCK_T, t_hi)


@triton.jit
def _rows_segment(q_rows, row_ok, bias_rows, sb_t, keys, rows, sk_t, sk_d, t_from, t_to, t_base,
                  m_i, l_i, acc, offs_dv, dv_ok, sq_d, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """Keys ``t`` in ``[t_from, t_to)`` of a list whose key ``t`` is row ``rows[t - t_base]`` of
    ``keys`` (a pool [M, D] with row stride ``sk_t``; -1: a zero key, not loaded) into the running
    ``(m_i, l_i, acc)``. One pool per loop: each key load's address is one indexed row of one
    base, which Triton's pipeliner overlaps with the previous block's math (a ``where`` between two
    pools' pointers made it load each block in turn)."""
    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(t_from, t_to, BLOCK_T):
        t_idx = t0 + offs_t
        t_ok = t_idx < t_to
        bias = tl.load(bias_rows[:, None] + t_idx[None, :] * sb_t,
                       mask=row_ok[:, None] & t_ok[None, :], other=float("-inf")).to(tl.float32)
        row = tl.load(rows + (t_idx - t_base), mask=t_ok, other=-1).to(tl.int64)
        k_ptrs = keys + tl.maximum(row, 0) * sk_t
        k_ok = t_ok & (row >= 0)
        qk = _qk_chunked(q_rows, row_ok, k_ptrs, k_ok, sq_d, sk_d,
                         D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
        m_i, l_i, acc = _online_softmax_step(qk, bias, m_i, l_i, acc, k_ptrs, k_ok, offs_dv, dv_ok,
                                             sk_d, qk_scale, PRECISION, INTERPRETER_BF16)
    return m_i, l_i, acc


@triton.jit
def _qk_chunked(q_rows, row_ok, k_ptrs, k_ok, sq_d, sk_d,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """Q·Kᵀ [BLOCK_M, BLOCK_T] in fp32 for one block of keys (``k_ptrs``: each key's row, loaded
    where ``k_ok``), reduced over D in chunks of ``BLOCK_D``."""
    offs_d = tl.arange(0, BLOCK_D)
    qk = tl.zeros([BLOCK_M, BLOCK_T], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        q = tl.load(q_rows[:, None] + (d0 + offs_d)[None, :] * sq_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptrs[:, None] + (d0 + offs_d)[None, :] * sk_d,
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(dot_operand(q, INTERPRETER_BF16), tl.trans(dot_operand(k, INTERPRETER_BF16)), qk,
                    input_precision=PRECISION)
    return qk


@triton.jit
def _online_softmax_step(qk, bias, m_i, l_i, acc, k_ptrs, k_ok, offs_dv, dv_ok, sk_d, qk_scale,
                         PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    """One block of keys into the running max ``m_i``, denominator ``l_i`` and ``acc`` (base 2; the
    keys' columns ``offs_dv`` serve as values). Returns the updated ``(m_i, l_i, acc)``."""
    logits = qk * qk_scale + bias * 1.4426950408889634
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet (and sink -inf or absent)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(logits - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(k_ptrs[:, None] + offs_dv[None, :] * sk_d, mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
    acc = tl.dot(dot_operand(round_to(p, v.dtype, INTERPRETER_BF16), INTERPRETER_BF16),
                 dot_operand(v, INTERPRETER_BF16), acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, bias_ptr, acc_ptr, ml_ptr,
    rows_a_ptr, pool_b_ptr, rows_b_ptr, TA, sr_a, sr_b, spb,
    H, S, T, T_SPLIT, N_SPLIT, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_t, sk_d,
    sb_b, sb_s, sb_t,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program: rows ``pid_m``, output slice ``pid_dv``, keys ``[split * T_SPLIT, +T_SPLIT)``.
    Writes ``acc`` (unnormalised, fp32) to ``acc_ptr[b, split, row, :]`` and ``(m, l)`` (base 2)
    to ``ml_ptr[b, split, row, :]``; the sink is left to the merge."""
    wait_for_producers(PDL)
    split = tl.program_id(0)
    pid_dv = tl.program_id(1)
    n_m = tl.cdiv(S * H, BLOCK_M)
    b = (tl.program_id(2) // n_m).to(tl.int64)  # b * (keys of a batch row) may pass 2^31
    pid_m = tl.program_id(2) % n_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * H
    s_idx = rows // H
    h_idx = rows % H
    q_rows = q_ptr + b * sq_b + h_idx * sq_h + s_idx * sq_s
    bias_rows = bias_ptr + b * sb_b + s_idx * sb_s
    k_base = k_ptr + b * sk_b
    rows_a = rows_a_ptr + b * sr_a
    rows_b = rows_b_ptr + b * sr_b

    offs_t = tl.arange(0, BLOCK_T)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    t_lo = split * T_SPLIT
    t_hi = tl.minimum(T, t_lo + T_SPLIT)
    if ROWS:  # the first pool's rows, then the second's, up to the last visible key
        t_end = _last_visible(bias_ptr + b * sb_b, sb_t, t_lo, t_hi, BLOCK_T)
        m_i, l_i, acc = _rows_segment(q_rows, row_ok, bias_rows, sb_t, k_base, rows_a, sk_t, sk_d,
                                      t_lo, tl.minimum(t_end, TA), 0, m_i, l_i, acc, offs_dv, dv_ok, sq_d, qk_scale,
                                      D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
        m_i, l_i, acc = _rows_segment(q_rows, row_ok, bias_rows, sb_t, pool_b_ptr, rows_b, spb, sk_d,
                                      tl.maximum(t_lo, TA), t_end, TA, m_i, l_i, acc, offs_dv, dv_ok, sq_d, qk_scale,
                                      D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
    else:
        for t0 in range(t_lo, t_hi, BLOCK_T):
            t_idx = t0 + offs_t
            t_ok = t_idx < t_hi
            bias = tl.load(bias_rows[:, None] + t_idx[None, :] * sb_t,
                           mask=row_ok[:, None] & t_ok[None, :], other=float("-inf")).to(tl.float32)
            k_ptrs = k_base + t_idx * sk_t
            qk = _qk_chunked(q_rows, row_ok, k_ptrs, t_ok, sq_d, sk_d,
                             D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
            m_i, l_i, acc = _online_softmax_step(qk, bias, m_i, l_i, acc, k_ptrs, t_ok, offs_dv, dv_ok,
                                                 sk_d, qk_scale, PRECISION, INTERPRETER_BF16)

    part = (b * N_SPLIT + split) * (S * H) + rows  # [BLOCK_M] partial-row index
    tl.store(acc_ptr + part[:, None] * D + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
    if pid_dv == 0:
        tl.store(ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_kernel(
    acc_ptr, ml_ptr, sinks_ptr, out_ptr,
    H, S, N_SPLIT,
    so_b, so_h, so_s, so_d,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRETER_BF16: tl.constexpr,
    PDL: tl.constexpr,
):
    """``out = (sum_i 2^(m_i - M) acc_i) / (2^(sink - M) + sum_i 2^(m_i - M) l_i)``, ``M`` the max of
    the sink and every share's ``m_i``: the single-program result, regrouped."""
    wait_for_producers(PDL)
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    R = S * H
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < D
    sink = tl.load(sinks_ptr + rows % H, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    big = sink
    for i in range(N_SPLIT):
        big = tl.maximum(big, tl.load(ml_ptr + ((b * N_SPLIT + i) * R + rows) * 2, mask=row_ok, other=0.0))
    big = tl.where(big == float("-inf"), 0.0, big)
    l_all = tl.exp2(sink - big)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for i in range(N_SPLIT):
        part = (b * N_SPLIT + i) * R + rows
        w = tl.exp2(tl.load(ml_ptr + part * 2, mask=row_ok, other=float("-inf")) - big)
        l_all += w * tl.load(ml_ptr + part * 2 + 1, mask=row_ok, other=0.0)
        a = tl.load(acc_ptr + part[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w[:, None] * a
    out = acc / l_all[:, None]
    s_idx = rows // H
    h_idx = rows % H
    out_ptrs = out_ptr + b * so_b + (h_idx * so_h + s_idx * so_s)[:, None] + cols[None, :] * so_d
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty, INTERPRETER_BF16), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, bias_ptr, sinks_ptr, out_ptr,
    rows_a_ptr, pool_b_ptr, rows_b_ptr, TA, sr_a, sr_b, spb,
    H, S, T, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_t, sk_d,
    sb_b, sb_s, sb_t,
    so_b, so_h, so_s, so_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, SKIP_MASKED: tl.constexpr, ROWS: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_producers(PDL)
    pid_m = tl.program_id(0)
    pid_dv = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * (keys of a batch row) may pass 2^31 (a serving step's copies)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S * H
    s_idx = rows // H
    h_idx = rows % H
    q_rows = q_ptr + b * sq_b + h_idx * sq_h + s_idx * sq_s  # [BLOCK_M] pointers
    bias_rows = bias_ptr + b * sb_b + s_idx * sb_s
    k_base = k_ptr + b * sk_b
    rows_a = rows_a_ptr + b * sr_a
    rows_b = rows_b_ptr + b * sr_b

    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < D

    sink = tl.load(sinks_ptr + h_idx, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    m_i = sink
    l_i = tl.where(sink == float("-inf"), 0.0, 1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if D <= BLOCK_D:  # one chunk: Q stays loaded across the T loop
        q_whole = tl.load(q_rows[:, None] + offs_d[None, :] * sq_d,
                          mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    if ROWS:  # the first pool's rows, then the second's, up to the last visible key (S = 1)
        t_end = _last_visible(bias_ptr + b * sb_b, sb_t, 0, T, BLOCK_T)
        m_i, l_i, acc = _rows_segment(q_rows, row_ok, bias_rows, sb_t, k_base, rows_a, sk_t, sk_d,
                                      0, tl.minimum(t_end, TA), 0, m_i, l_i, acc, offs_dv, dv_ok, sq_d, qk_scale,
                                      D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
        m_i, l_i, acc = _rows_segment(q_rows, row_ok, bias_rows, sb_t, pool_b_ptr, rows_b, spb, sk_d,
                                      TA, t_end, TA, m_i, l_i, acc, offs_dv, dv_ok, sq_d, qk_scale,
                                      D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
    else:
        for t0 in range(0, T, BLOCK_T):
            t_idx = t0 + offs_t
            t_ok = t_idx < T
            bias = tl.load(bias_rows[:, None] + t_idx[None, :] * sb_t,
                           mask=row_ok[:, None] & t_ok[None, :], other=float("-inf")).to(tl.float32)
            live = True
            if SKIP_MASKED:  # a block masked for every row adds exactly nothing: skip its GEMMs
                live = tl.max(tl.max(bias, axis=1), axis=0) > float("-inf")
            if live:
                k_ptrs = k_base + t_idx * sk_t
                if D <= BLOCK_D:
                    k = tl.load(k_ptrs[:, None] + offs_d[None, :] * sk_d,
                                mask=t_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                    qk = tl.dot(dot_operand(q_whole, INTERPRETER_BF16), tl.trans(dot_operand(k, INTERPRETER_BF16)), input_precision=PRECISION)
                else:
                    qk = _qk_chunked(q_rows, row_ok, k_ptrs, t_ok, sq_d, sk_d,
                                     D, BLOCK_M, BLOCK_T, BLOCK_D, PRECISION, INTERPRETER_BF16)
                m_i, l_i, acc = _online_softmax_step(qk, bias, m_i, l_i, acc, k_ptrs, t_ok, offs_dv, dv_ok,
                                                     sk_d, qk_scale, PRECISION, INTERPRETER_BF16)

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + b * so_b + (h_idx * so_h + s_idx * so_s)[:, None] + offs_dv[None, :] * so_d
    tl.store(out_ptrs, round_to(out, out_ptr.dtype.element_ty, INTERPRETER_BF16), mask=row_ok[:, None] & dv_ok[None, :])


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attention(ctx: KernelContext, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor, *,
              scale: float) -> torch.Tensor:
    """Launcher with ``attention_reference``'s signature; declines GQA (keys with more than one
    head), dtypes other than fp32/bf16/fp16, and q/keys of different dtypes."""
    if q.dim() != 4 or keys.dim() != 4 or keys.shape[1] != 1 or bias.dim() != 4:
        return NotImplemented
    if q.dtype not in _DTYPES or keys.dtype != q.dtype or not q.device == keys.device == bias.device:
        return NotImplemented
    b, h, s, d = q.shape
    t = keys.shape[2]
    if keys.shape[3] != d or keys.shape[0] not in (1, b) or sinks.numel() != h:
        return NotImplemented
    keys = keys.expand(b, 1, t, d)
    return _launch(ctx, q, keys, (keys.stride(0), keys.stride(2), keys.stride(3)), t, None, bias, sinks, scale)


def attention_rows(ctx: KernelContext, q: torch.Tensor, pool_a: torch.Tensor, rows_a: torch.Tensor,
                   pool_b: torch.Tensor | None, rows_b: torch.Tensor | None, bias: torch.Tensor, sinks: torch.Tensor, *,
                   scale: float) -> torch.Tensor:
    """Launcher with ``AttentionRows.reference``'s signature: the kernels read key ``t`` of query
    ``b`` from its pool row (``rows_a[b, t]``, then ``rows_b[b, t - Ta]``; -1 a zero key) instead of
    a gathered copy, and stop at each query's last key whose bias is not -inf (its list's tail,
    past its sequence's entries, adds nothing). Declines q with more than one query per batch row
    (the serving form has one: B tokens, S = 1), pools that are not [M, D] of q's dtype with unit
    channel stride and rows that are not contiguous int64 [B, T] on q's device."""
    if q.dim() != 4 or q.shape[2] != 1 or bias.dim() != 4 or q.dtype not in _DTYPES or not q.device == bias.device:
        return NotImplemented
    b, h, s, d = q.shape
    pairs = [(pool_a, rows_a)] + ([(pool_b, rows_b)] if pool_b is not None or rows_b is not None else [])
    for pool, rows in pairs:
        if pool is None or rows is None or pool.dim() != 2 or pool.shape[1] != d or pool.dtype != q.dtype \
                or pool.stride(1) != 1 or pool.device != q.device or rows.dim() != 2 or rows.shape[0] != b \
                or rows.dtype != torch.int64 or not rows.is_contiguous() or rows.device != q.device:
            return NotImplemented
    if sinks.numel() != h:
        return NotImplemented
    ta = rows_a.shape[1]
    pool_b, rows_b = pairs[-1]
    t = ta + (rows_b.shape[1] if len(pairs) == 2 else 0)
    rows = (rows_a, pool_b, rows_b, ta, rows_a.stride(0), rows_b.stride(0), pool_b.stride(0))
    return _launch(ctx, q, pool_a, (0, pool_a.stride(0), 1), t, rows, bias, sinks, scale)


def _launch(ctx: KernelContext, q, keys, key_strides, t: int, rows, bias, sinks, scale: float) -> torch.Tensor:
    """One attention call: ``keys`` with (batch, key, channel) strides, or a pool read at ``rows``
    ((rows_a, pool_b, rows_b, Ta, rows_a's and rows_b's batch strides, pool_b's row stride))."""
    b, h, s, d = q.shape
    bias = bias.expand(b, 1, s, t)  # stride 0 where the bias broadcasts (batch 1, shared rows)
    out = result_buffer(0, (b, h, s, d), q.dtype, q.device)
    if out.numel() == 0:
        return out
    # skip blocks masked for every row: with S > 1 (causal prefill), and for keys read at rows (a
    # serving step's lists run to the compiled capacity; a short sequence's tail is all -inf)
    skip_masked = s > 1
    target = ctx.target
    cfg = attention_config(d, q.dtype, skip_masked, target)
    n_split, t_split = key_splits(b, h, s, t, d, cfg, target)
    row_args = rows if rows is not None else (keys, keys, keys, t, 0, 0, 0)
    if n_split > 1:
        _split_launch(ctx, q, keys, key_strides, row_args, rows is not None, t, bias, sinks, out,
                      float(scale) * LOG2E, n_split, t_split, cfg)
        return out
    grid = (triton.cdiv(s * h, cfg.block_m), triton.cdiv(d, cfg.block_dv), b)
    _attention_kernel[grid](
        q, keys, bias, sinks, out, *row_args,
        h, s, t, float(scale) * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        *key_strides,
        bias.stride(0), bias.stride(2), bias.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        D=d, BLOCK_M=cfg.block_m, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_DV=cfg.block_dv,
        SKIP_MASKED=skip_masked, ROWS=rows is not None, PRECISION=dot_precision(q.dtype, target),
        INTERPRETER_BF16=interpreter_bf16(q.dtype), **cfg.launch.kwargs(ctx),
    )
    return out


def key_splits(b: int, h: int, s: int, t: int, d: int, cfg: AttentionConfig, target: Target) -> tuple[int, int]:
    """``(programs over T, keys per program)`` for a launch: decode (S=1) splits T into multiples of
    ``block_t`` until the launch has about one program per SM; prefill keeps T whole (its S*H rows
    already fill the device)."""
    if s != 1:
        return 1, t
    blocks = triton.cdiv(t, cfg.block_t)
    tiles = triton.cdiv(s * h, cfg.block_m) * triton.cdiv(d, cfg.block_dv) * b
    n_split = max(1, min(blocks, target.compute_units // max(1, tiles)))
    t_split = triton.cdiv(blocks, n_split) * cfg.block_t
    return triton.cdiv(t, t_split), t_split


MERGE_BLOCK = (16, 64)  # (rows, columns) per merge program: 32 programs for H=64, D=512


def _split_launch(ctx: KernelContext, q, keys, key_strides, row_args, rows: bool, t: int, bias, sinks, out,
                  qk_scale: float, n_split: int, t_split: int, cfg: AttentionConfig) -> None:
    b, h, s, d = q.shape
    n_rows = s * h
    acc = torch.empty((b, n_split, n_rows, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((b, n_split, n_rows, 2), dtype=torch.float32, device=q.device)
    grid = (n_split, triton.cdiv(d, cfg.block_dv), b * triton.cdiv(n_rows, cfg.block_m))
    _split_kernel[grid](
        q, keys, bias, acc, ml, *row_args,
        h, s, t, t_split, n_split, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        *key_strides,
        bias.stride(0), bias.stride(2), bias.stride(3),
        D=d, BLOCK_M=cfg.block_m, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d, BLOCK_DV=cfg.block_dv, ROWS=rows,
        PRECISION=dot_precision(q.dtype, ctx.target), INTERPRETER_BF16=interpreter_bf16(q.dtype),
        **cfg.launch.kwargs(ctx),
    )
    block_r, block_c = MERGE_BLOCK
    _merge_kernel[(triton.cdiv(n_rows, block_r), triton.cdiv(d, block_c), b)](
        acc, ml, sinks, out, h, s, n_split,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        D=d, BLOCK_R=block_r, BLOCK_C=block_c, INTERPRETER_BF16=interpreter_bf16(q.dtype),
        **Launch(4).kwargs(ctx),
    )

for _name in ("attention.sliding", "attention.csa", "attention.hca"):
    register_kernel(_name)(attention)
    register_kernel(_name + ".rows")(attention_rows)
