"""DeepSeek-V4, written for ahead-of-time compilation: explicit state, static shapes, two entry points.

Numerically this is transformers' ``DeepseekV4ForCausalLM`` (same parameter names, same formulas,
same casts): prefill == its full forward, prefill + decode == its cached generation. What differs
is the shape of the computation:

- the model state is a flat list of tensors (``state_specs``) that the caller owns: the sliding
  window ring buffer, compressed KV (CSA 1/m, HCA 1/m'), indexer keys, compressor tails and the
  CSA overlap halves;
- compressed KV lives in buffers of static capacity ``ceil(max_context / m)``; visibility is a
  mask (entry ``w`` is visible to query ``t`` iff ``w < (t + 1) // m``), so the indexer's top-k uses
  a static ``k`` and picks that violate causality are dropped, as transformers does;
- decode writes state with ``torch.where`` on one-hot slot masks: no data-dependent shapes, no
  ``.item()``, no ``nonzero``; a compressed entry is written only when its window closes;
- decode's CSA attention reads the window and the indexer's k picks, gathered (a static
  ``k = min(index_topk, capacity)``, invalid picks at -inf); prefill keeps the mask over every entry;
- routed experts use the gather ("batched_mm") formulation, which exports cleanly.

Formulas follow shared/DSV4_ARCHITECTURE.md; where transformers' code is the judge it is mirrored
line for line (RMSNorm casts, softmax with the sink column and max subtraction, rope in fp32).
Where transformers differs from DeepSeek's reference code we follow transformers:

- no FP8/FP4 quantisation simulation of KV / indexer entries and no Hadamard rotation of the
  indexer's queries and keys;
- the indexer's top-k takes ``k = min(index_topk, entries emitted so far)`` and marks causality
  violating picks invalid; over our static capacity (invisible entries at -inf) the selected set
  is the same except where scores tie exactly at the k-th place;
- routing weights are always normalised (``norm_topk_prob`` is not read) and there is exactly one
  shared expert (``n_shared_experts`` is not read): ModelConfig refuses other values;
- the mHC ``comb`` matrix mixes the residual streams transposed (``comb^T @ streams``);
- compressor tails are kept with the position bias already added (the reference's
  ``score_state``); transformers keeps raw gates and adds the bias when a window closes: the
  same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import ds4c.ops.compress  # noqa: F401 - registers torch.ops.ds4c.compressor_rows
import ds4c.ops.rope  # noqa: F401 - registers torch.ops.ds4c.rope_table
from ds4c.errors import InputError
from ds4c.models.deepseek_v4.config import ModelConfig
from ds4c.models.deepseek_v4.paged import PageLayout, StepIndex, gather_rows, gather_window

# Exported parameter names are transformers' names: the entry wrappers add no prefix (see _Entry).
ENTRY_PARAM_PREFIX = ""
NEG_INF = float("-inf")


@dataclass(frozen=True)
class StateSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float


# -- small building blocks (transformers' formulas) ------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(dtype)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> torch.Tensor:
    """Interleaved RoPE on the trailing rope slice; ``cos``/``sin`` [.., S, r] repeat each pair's value
    (``Rotary``)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    r = cos.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:]
    rotated = ((rope.float() * cos) + (rotate_half(rope).float() * sin)).to(x.dtype)
    return torch.cat([nope, rotated], dim=-1)


class Rotary(nn.Module):
    """cos/sin for positions, per rope type ("main": θ=10000; "compress": compress θ, YaRN if configured)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        # transformers computes the inverse frequencies (incl. YaRN): reuse it so they are identical.
        with torch.device("cpu"):
            ref = DeepseekV4RotaryEmbedding(config.hf)
        self.scaling = {}
        for kind in ("main", "compress"):
            self.register_buffer(f"{kind}_inv_freq", getattr(ref, f"{kind}_inv_freq").detach().clone().cpu(),
                                 persistent=False)
            self.scaling[kind] = float(getattr(ref, f"{kind}_attention_scaling"))

    def forward(self, positions: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [*positions.shape, r] in ``dtype``, each pair's value twice (``rope.table``)."""
        inv_freq = getattr(self, f"{kind}_inv_freq").to(device=positions.device, dtype=torch.float)
        return torch.ops.ds4c.rope_table(positions, inv_freq, scaling=self.scaling[kind], dtype=dtype)


class GroupedLinear(nn.Module):
    """Per-group projection of the attention output (transformers' DeepseekV4GroupedLinear)."""

    def __init__(self, in_per_group: int, out_features: int, groups: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_per_group))
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape[:-2]
        hidden = x.shape[-1]
        w = self.weight.view(self.groups, -1, hidden).transpose(1, 2)
        x = x.reshape(-1, self.groups, hidden).transpose(0, 1)
        y = torch.bmm(x, w).transpose(0, 1)
        return y.reshape(*input_shape, self.groups, -1)


# -- mHC ---------------------------------------------------------------------------------------------

class HyperConnection(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.n, self.iters, self.hc_eps, self.norm_eps = n, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s = streams.shape[:2]
        n = self.n
        flat = unweighted_rms(streams.view(b, s, -1).float(), self.norm_eps)
        mix = F.linear(flat, self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        comb_w = comb_w.view(*comb_w.shape[:-1], n, n)
        comb_b = comb_b.view(n, n)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w * comb_s + comb_b, dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return post, comb, collapsed


def hc_post(out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    dtype = streams.dtype
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


class HyperHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Collapse the streams of ``x`` [B, S, n, D]; ``rows``: only those positions (axis 1)."""
        if rows is not None:  # here, not before the call: the head's ops, row pick included, are model.hc_head's
            x = x.index_select(1, rows)
        flat = unweighted_rms(x.flatten(2).float(), self.norm_eps)
        mixes = F.linear(flat, self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


# -- compressors ---------------------------------------------------------------------------------------

class Compressor(nn.Module):
    """Gated per-channel softmax pooling of ``ratio`` tokens into one entry (overlap: 2·ratio slots)."""

    def __init__(self, config: ModelConfig, ratio: int, head_dim: int, overlap: bool):
        super().__init__()
        c = 2 if overlap else 1
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        self.kv_proj = nn.Linear(config.hidden_size, c * head_dim, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, c * head_dim, bias=False)
        self.position_bias = nn.Parameter(torch.empty(ratio, c * head_dim))
        self.kv_norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, mode: str, *args):
        # Entry through __call__ so traced ops carry this module's path (ds4c inspect groups by it).
        if mode not in ("prefill", "decode", "step", "select", "select_entries", "select_rows"):
            raise ValueError(f"unknown mode {mode!r}")
        return getattr(self, mode)(*args)

    def _pool(self, kv: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """kv/gate [.., slots, d] -> normalised entry [.., d] (softmax over slots in fp32)."""
        return self.kv_norm((kv * gate.softmax(dim=-2, dtype=torch.float32).to(kv.dtype)).sum(dim=-2))

    def state_specs(self, prefix: str, batch: int, dtype: torch.dtype) -> list[StateSpec]:
        c = 2 if self.overlap else 1
        specs = [StateSpec(f"{prefix}kv_state", (batch, self.ratio, c * self.head_dim), dtype, 0.0),
                 StateSpec(f"{prefix}score_state", (batch, self.ratio, c * self.head_dim), dtype, NEG_INF)]
        if self.overlap:
            specs += [StateSpec(f"{prefix}prev_kv", (batch, self.ratio, self.head_dim), dtype, 0.0),
                      StateSpec(f"{prefix}prev_score", (batch, self.ratio, self.head_dim), dtype, NEG_INF)]
        return specs

    def prefill(self, x: torch.Tensor, capacity: int, rotary: Rotary) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Entries for every full window of ``x`` (zeros beyond them, ``capacity`` rows) and the state after it.

        The tokens are laid out over ``capacity + 1`` static windows (missing tokens: kv 0, score
        -inf), so every shape is static except the sequence itself: windows that are not complete
        are masked out, the first incomplete one becomes the state.
        """
        b, s, _ = x.shape
        m, d = self.ratio, self.head_dim
        kv, gate = self.kv_proj(x), self.gate_proj(x)
        slots = (capacity + 1) * m
        t = torch.arange(slots, device=x.device)
        present = (t < s).view(1, -1, 1)
        src = t.clamp(max=s - 1).view(1, -1, 1)
        kv = torch.where(present, torch.gather(kv, 1, src.expand(b, -1, kv.shape[-1])), 0.0)
        gate = torch.where(present, torch.gather(gate, 1, src.expand(b, -1, gate.shape[-1])), NEG_INF)
        chunk_kv = kv.view(b, capacity + 1, m, kv.shape[-1])
        chunk_gate = gate.view(b, capacity + 1, m, gate.shape[-1]) + self.position_bias
        if self.overlap:
            init_kv = chunk_kv.new_zeros((b, 1, m, d))
            init_gate = chunk_gate.new_full((b, 1, m, d), NEG_INF)
            prev_kv_all = torch.cat([init_kv, chunk_kv[..., :d]], dim=1)  # index w: window w's previous Ca
            prev_gate_all = torch.cat([init_gate, chunk_gate[..., :d]], dim=1)
            pool_kv = torch.cat([prev_kv_all[:, :capacity], chunk_kv[:, :capacity, :, d:]], dim=2)
            pool_gate = torch.cat([prev_gate_all[:, :capacity], chunk_gate[:, :capacity, :, d:]], dim=2)
        else:
            pool_kv, pool_gate = chunk_kv[:, :capacity], chunk_gate[:, :capacity]
        n = s // m
        window = torch.arange(capacity, device=x.device)
        complete = (window < n).view(1, -1, 1)
        entries = self._pool(pool_kv, pool_gate)  # [B, capacity, d]
        positions = (window * m).unsqueeze(0).expand(b, -1)
        cos, sin = rotary(positions, "compress", entries.dtype)
        entries = apply_rope(entries.unsqueeze(1), cos, sin).squeeze(1)
        comp = torch.where(complete, entries, 0.0)
        # The unfinished window's tokens wait in the state (scores with their position bias added).
        state = [chunk_kv[:, n], chunk_gate[:, n]]
        if self.overlap:
            state += [prev_kv_all[:, n], prev_gate_all[:, n]]
        return comp, state

    def decode(self, x: torch.Tensor, position: torch.Tensor, comp: torch.Tensor, state: list[torch.Tensor],
               rotary: Rotary) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Add the token at ``position`` to its window; when the window closes, write its entry into ``comp``."""
        m, d = self.ratio, self.head_dim
        kv = self.kv_proj(x)[:, 0]  # [B, c*d]
        slot = torch.remainder(position, m)
        gate = self.gate_proj(x)[:, 0] + self.position_bias.index_select(0, slot.reshape(1))[0]
        hit = (torch.arange(m, device=x.device) == slot).view(1, m, 1)
        kv_state = torch.where(hit, kv.unsqueeze(1), state[0])
        score_state = torch.where(hit, gate.unsqueeze(1), state[1])
        if self.overlap:
            prev_kv, prev_gate = state[2], state[3]
            pool_kv = torch.cat([prev_kv, kv_state[..., d:]], dim=1)
            pool_gate = torch.cat([prev_gate, score_state[..., d:]], dim=1)
        else:
            pool_kv, pool_gate = kv_state, score_state
        entry = self._pool(pool_kv, pool_gate)  # [B, d]
        window = torch.div(position, m, rounding_mode="floor")
        cos, sin = rotary((window * m).view(1, 1), "compress", entry.dtype)
        entry = apply_rope(entry.view(entry.shape[0], 1, 1, d), cos, sin).view(entry.shape[0], 1, d)
        emit = torch.remainder(position + 1, m) == 0
        write = (torch.arange(comp.shape[1], device=x.device) == window).view(1, -1, 1) & emit
        comp = torch.where(write, entry, comp)
        new_state = [kv_state, score_state]
        if self.overlap:
            new_state += [torch.where(emit, kv_state[..., :d], prev_kv), torch.where(emit, score_state[..., :d], prev_gate)]
        return comp, new_state

    def ring_width(self, extra: int = 0) -> tuple[int, int]:
        """(rows, width) of this compressor's ring per slot: c*m positions of kv ++ gate (c*d each),
        and ``extra`` rows more (``PageLayout.draft_tokens``: a rejected draft's rows then never
        overwrite rows a later step reads)."""
        c = 2 if self.overlap else 1
        return c * self.ratio + extra, 2 * c * self.head_dim

    def step(self, x: torch.Tensor, index: StepIndex, emit: torch.Tensor, comp: torch.Tensor, ring: torch.Tensor,
             rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Paged form over packed tokens ``x`` [1, N, hidden]: the entries of the windows closed by the
        candidate rows ``emit`` [E] go into ``comp`` [pages, Pt/m, d], then the tokens' kv ++ gate rows
        into ``ring`` [slots, c*m, 2*c*d] (paged.py). Returns the new ``comp`` and ``ring``.

        A window's ``c*m`` rows are read from this step's tokens where its sequence's chunk holds
        them and from the ring (written by earlier steps) before that; rows before position 0 are
        kv 0, gate -inf, as the dense model's empty state."""
        m, d = self.ratio, self.head_dim
        span, width = self.ring_width()
        rows_per_slot = ring.shape[1]  # span, plus the layout's draft_tokens
        positions = index.positions
        # [N, 2*c*d]: kv ++ gate + its position bias (compress.rows)
        rows = torch.ops.ds4c.compressor_rows(self.kv_proj(x)[0], self.gate_proj(x)[0], self.position_bias, positions)
        flat_ring = ring.reshape(-1, width)
        per_page = comp.shape[1]
        sources, entry_pos, at = index.window_index(emit, m, span, rows_per_slot, per_page)
        # overlapping: the previous window's first halves, then this window's second halves
        win_kv, win_gate = gather_window(rows, flat_ring, sources, m if self.overlap else 0).split(d, dim=-1)
        entries = self._pool(win_kv, win_gate)  # [E, d]
        cos, sin = rotary(entry_pos.unsqueeze(0), "compress", entries.dtype)
        entries = apply_rope(entries.view(1, 1, -1, d), cos, sin).view(-1, d)
        comp = torch.index_put(comp.reshape(-1, d), (at,), entries).view(comp.shape)
        ring = torch.index_put(flat_ring, (index.ring_writes(rows_per_slot),), rows).view(ring.shape)
        return comp, ring


class _Scorer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weights_proj = nn.Linear(config.hidden_size, config.index_n_heads, bias=False)


class Indexer(Compressor):
    """Lightning indexer: its own overlap compressor (keys), then a ReLU-weighted head sum of q·K, top-k."""

    def __init__(self, config: ModelConfig):
        super().__init__(config, config.compress_rate_csa, config.index_head_dim, overlap=True)
        self.heads, self.topk = config.index_n_heads, config.index_topk
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.heads * self.head_dim, bias=False)
        self.scorer = _Scorer(config)
        self.softmax_scale = self.head_dim ** -0.5
        self.weights_scaling = self.heads ** -0.5

    def _index_scores(self, x: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
        """Index scores [B, S, C] of queries ``x``/``qr`` [B, S, ..] against ``keys`` [B, C, Di]."""
        b, s, _ = x.shape
        q = self.q_b_proj(qr).view(b, s, -1, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin).transpose(1, 2)
        scores = torch.matmul(q.float(), keys.transpose(-1, -2).float().unsqueeze(1))  # [B, S, H, C]
        scores = F.relu(scores) * self.softmax_scale
        weights = self.scorer.weights_proj(x).float() * self.weights_scaling
        return (scores * weights.unsqueeze(-1)).sum(dim=2)

    def select(self, x: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Additive bias [B, 1, S, C] over compressed entries: 0 for the selected, -inf elsewhere.

        Top-k runs over the static capacity with not-yet-visible entries at -inf; transformers runs
        it over the entries emitted so far. The selected sets agree except where index scores tie
        exactly at the k-th place (ReLU zeros), where any two top-k implementations may differ.
        """
        b, s, _ = x.shape
        cap = keys.shape[1]
        top, threshold = self._top_entries(x, qr, keys, positions, cos, sin)
        valid = top < threshold.view(1, -1, 1)
        safe = torch.where(valid, top, torch.full_like(top, cap))
        bias = keys.new_full((b, 1, s, cap + 1), NEG_INF)
        bias = bias.scatter(-1, safe.unsqueeze(1), 0.0)
        return bias[..., :cap]

    def _top_entries(self, x: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the k highest-scoring entries of each query [B, S, k], over the static capacity with
        not-yet-visible entries at -inf; each query's visible count [S]) for queries at ``positions``
        [S] (or one position, 0-d: S = 1)."""
        cap = keys.shape[1]
        index_scores = self._index_scores(x, qr, keys, cos, sin)
        threshold = torch.div(positions + 1, self.ratio, rounding_mode="floor")  # [S]
        future = torch.arange(cap, device=x.device).view(1, 1, -1) >= threshold.view(1, -1, 1)
        index_scores = index_scores.masked_fill(future, NEG_INF)
        return index_scores.topk(min(self.topk, cap), dim=-1).indices, threshold

    def select_entries(self, x: torch.Tensor, qr: torch.Tensor, keys: torch.Tensor, position: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Decode form of ``select`` (one query per sequence, ``x`` [B, 1, ..]): the selected
        entries' rows of the flattened keys [B * C] (``b * C + entry``), -1 for invalid picks, [B, k].
        The step then reads k entries instead of attending over the whole capacity under a mask:
        its cost does not grow with the context (the same set; an invalid pick weighs 0 either way)."""
        b, cap = x.shape[0], keys.shape[1]
        top, threshold = self._top_entries(x, qr, keys, position, cos, sin)
        top = top[:, 0]  # [B, k]
        rows = top + torch.arange(b, device=x.device).view(-1, 1) * cap
        return torch.where(top < threshold, rows, torch.full_like(rows, -1))

    def select_rows(self, x: torch.Tensor, qr: torch.Tensor, key_pool: torch.Tensor, rows: torch.Tensor,
                    visible: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Paged form of ``select``, one query per packed token: ``x``/``qr`` [N, 1, ..], ``rows``
        [N, C] the pool rows of every entry each token may see (-1 for the others), ``visible`` [N]
        their count. Returns the rows of the selected entries [N, k], -1 for invalid picks."""
        cap = rows.shape[1]
        keys = gather_rows(key_pool.reshape(-1, key_pool.shape[-1]), rows)  # [N, C, Di]
        index_scores = self._index_scores(x, qr, keys, cos, sin)  # [N, 1, C]: the dense select's form, fused alike
        future = torch.arange(cap, device=x.device).view(1, 1, -1) >= visible.view(-1, 1, 1)
        index_scores = index_scores.masked_fill(future, NEG_INF)
        top = index_scores.topk(min(self.topk, cap), dim=-1).indices[:, 0]  # [N, k]
        picked = torch.gather(rows, 1, top)
        return torch.where(top < visible.view(-1, 1), picked, torch.full_like(picked, -1))


# -- attention ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, max_context: int, layer_type: str | None = None):
        super().__init__()
        self.layer_type = layer_type or config.layer_types[layer]
        self.rope_kind = "main" if self.layer_type == "sliding_attention" else "compress"
        self.heads, self.head_dim, self.window = config.num_attention_heads, config.head_dim, config.sliding_window
        self.groups = config.o_groups
        self.eps = config.rms_norm_eps
        self.scaling = self.head_dim ** -0.5
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_a_proj = GroupedLinear(self.heads * self.head_dim // self.groups, self.groups * config.o_lora_rank,
                                      self.groups)
        self.o_b_proj = nn.Linear(self.groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(self.heads))
        self.ratio = config.rate_of(self.layer_type)
        self.capacity = math.ceil(max_context / self.ratio) if self.ratio else 0
        if self.layer_type == "compressed_sparse_attention":
            self.compressor = Compressor(config, self.ratio, self.head_dim, overlap=True)
            self.compressor.indexer = Indexer(config)
        elif self.layer_type == "heavily_compressed_attention":
            self.compressor = Compressor(config, self.ratio, self.head_dim, overlap=False)
        else:
            self.compressor = None

    # state layout: window ring, then (if compressed) entries, compressor state, indexer keys + state
    def state_specs(self, prefix: str, batch: int, dtype: torch.dtype) -> list[StateSpec]:
        specs = [StateSpec(f"{prefix}window_kv", (batch, self.window, self.head_dim), dtype, 0.0)]
        if self.compressor is not None:
            specs.append(StateSpec(f"{prefix}compressed_kv", (batch, self.capacity, self.head_dim), dtype, 0.0))
            specs += self.compressor.state_specs(f"{prefix}compressor_", batch, dtype)
            if self.layer_type == "compressed_sparse_attention":
                idx = self.compressor.indexer
                specs.append(StateSpec(f"{prefix}indexer_keys", (batch, self.capacity, idx.head_dim), dtype, 0.0))
                specs += Compressor.state_specs(idx, f"{prefix}indexer_compressor_", batch, dtype)
        return specs

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, s, _ = x.shape
        qr = self.q_a_norm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(b, s, -1, self.head_dim).transpose(1, 2)
        q = unweighted_rms(q, self.eps)
        q = apply_rope(q, cos, sin)
        kv = self.kv_norm(self.kv_proj(x)).view(b, s, -1, self.head_dim).transpose(1, 2)
        kv = apply_rope(kv, cos, sin)  # [B, 1, S, D]
        return qr, q, kv

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """One joint softmax over ``keys`` [B, 1, T, D] (K = V) with per-head sinks; inverse RoPE; output projection."""
        b, h, s, d = q.shape
        t = keys.shape[2]
        kv = keys[:, :, None].expand(b, 1, h, t, d).reshape(b, h, t, d)
        logits = torch.matmul(q, kv.transpose(2, 3)) * self.scaling + bias
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
        combined = torch.cat([logits, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        out = torch.matmul(probs[..., :-1].to(kv.dtype), kv)  # [B, H, S, D]
        out = apply_rope(out, cos, -sin)
        grouped = out.transpose(1, 2).reshape(b, s, self.groups, -1)
        return self.o_b_proj(self.o_a_proj(grouped).flatten(2))

    def paged_state_specs(self, prefix: str, layout: PageLayout, window_pages: int, comp_pages: int, slots: int,
                          dtype: torch.dtype) -> list[StateSpec]:
        """Pools of the paged step (paged.py): window, then (if compressed) entries and the compressor's
        ring, then (CSA) indexer keys and the indexer compressor's ring. Every fill is 0: rows are
        read only after they are written, and the trash rows are masked."""
        d = self.head_dim
        specs = [StateSpec(f"{prefix}window_kv_pool", (window_pages, layout.window_page, d), dtype, 0.0)]
        if self.compressor is not None:
            per_page = layout.comp_page // self.ratio
            specs.append(StateSpec(f"{prefix}compressed_kv_pool", (comp_pages, per_page, d), dtype, 0.0))
            extra = layout.draft_tokens
            specs.append(StateSpec(f"{prefix}compressor_ring", (slots, *self.compressor.ring_width(extra)), dtype, 0.0))
            if self.layer_type == "compressed_sparse_attention":
                idx = self.compressor.indexer
                specs.append(StateSpec(f"{prefix}indexer_keys_pool", (comp_pages, per_page, idx.head_dim), dtype, 0.0))
                specs.append(StateSpec(f"{prefix}indexer_compressor_ring", (slots, *idx.ring_width(extra)), dtype, 0.0))
        return specs

    @property
    def paged_state_count(self) -> int:
        """How many pools ``paged_state_specs`` lists for this layer (1 sliding, 3 HCA, 5 CSA)."""
        return 1 + 2 * (self.compressor is not None) + 2 * (self.layer_type == "compressed_sparse_attention")

    def forward(self, mode: str, *args):
        # Entry through __call__ so traced ops carry this module's path (ds4c inspect groups by it).
        return {"prefill": self.prefill, "decode": self.decode, "step": self.step}[mode](*args)

    def prefill(self, x: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, list]:
        b, s, _ = x.shape
        cos, sin = rotary(positions.unsqueeze(0), self.rope_kind, x.dtype)
        qr, q, kv = self._project(x, cos, sin)
        dist = positions.view(-1, 1) - positions.view(1, -1)
        window_ok = (dist >= 0) & (dist < self.window)
        bias = torch.where(window_ok, 0.0, NEG_INF).to(q.dtype).view(1, 1, s, s)
        keys = kv
        # ring buffer after the prompt: slot j holds the latest position p < S with p % W == j
        slots = torch.arange(self.window, device=x.device)
        last = s - 1 - torch.remainder(s - 1 - slots, self.window)  # position held by slot j
        ring = torch.gather(kv[:, 0], 1, last.clamp(min=0).view(1, -1, 1).expand(b, -1, self.head_dim))
        ring = torch.where((last >= 0).view(1, -1, 1), ring, torch.zeros_like(ring))
        state = [ring]
        if self.compressor is not None:
            comp, comp_state = self.compressor("prefill", x, self.capacity, rotary)
            threshold = torch.div(positions + 1, self.ratio, rounding_mode="floor")
            visible = torch.arange(self.capacity, device=x.device).view(1, -1) < threshold.view(-1, 1)
            comp_bias = torch.where(visible, 0.0, NEG_INF).to(q.dtype).view(1, 1, s, self.capacity)
            state += [comp, *comp_state]
            if self.layer_type == "compressed_sparse_attention":
                idx = self.compressor.indexer
                ikeys, istate = idx("prefill", x, self.capacity, rotary)
                comp_bias = idx("select", x, qr, ikeys, positions, cos, sin)
                state += [ikeys, *istate]
            keys = torch.cat([kv, comp.unsqueeze(1)], dim=2)
            bias = torch.cat([bias.expand(b, 1, s, s), comp_bias.expand(b, 1, s, self.capacity)], dim=-1)
        return self._attend(q, keys, bias, cos, sin), state

    def decode(self, x: torch.Tensor, position: torch.Tensor, state: list[torch.Tensor],
               rotary: Rotary) -> tuple[torch.Tensor, list]:
        b = x.shape[0]
        cos, sin = rotary(position.view(1, 1), self.rope_kind, x.dtype)
        qr, q, kv = self._project(x, cos, sin)
        slots = torch.arange(self.window, device=x.device)
        ring = torch.where((slots == torch.remainder(position, self.window)).view(1, -1, 1), kv[:, 0], state[0])
        ring_ok = (slots <= position) | (position >= self.window - 1)
        bias = torch.where(ring_ok, 0.0, NEG_INF).to(q.dtype).view(1, 1, 1, self.window).expand(b, 1, 1, -1)
        keys = ring.unsqueeze(1)
        new_state = [ring]
        if self.compressor is not None:
            comp = state[1]
            n_comp = len(self.compressor.state_specs("", 1, x.dtype))
            comp, comp_state = self.compressor("decode", x, position, comp, state[2:2 + n_comp], rotary)
            new_state += [comp, *comp_state]
            if self.layer_type == "compressed_sparse_attention":
                idx = self.compressor.indexer
                rest = state[2 + n_comp:]
                ikeys, istate = idx("decode", x, position, rest[0], rest[1:], rotary)
                rows = idx("select_entries", x, qr, ikeys, position, cos, sin)  # [B, k]
                new_state += [ikeys, *istate]
                comp_keys = gather_rows(comp.reshape(-1, self.head_dim), rows)  # [B, k, D]: the picks only
                comp_bias = torch.where(rows >= 0, 0.0, NEG_INF).to(q.dtype).view(b, 1, 1, -1)
            else:
                threshold = torch.div(position + 1, self.ratio, rounding_mode="floor")
                visible = torch.arange(self.capacity, device=x.device) < threshold
                comp_bias = torch.where(visible, 0.0, NEG_INF).to(q.dtype).view(1, 1, 1, -1).expand(b, 1, 1, -1)
                comp_keys = comp
            keys = torch.cat([keys, comp_keys.unsqueeze(1)], dim=2)
            bias = torch.cat([bias, comp_bias], dim=-1)
        return self._attend(q, keys, bias, cos, sin), new_state

    def step(self, x: torch.Tensor, index: StepIndex, emits: dict[str, torch.Tensor], state: list[torch.Tensor],
             rotary: Rotary) -> tuple[torch.Tensor, list]:
        """Packed tokens ``x`` [1, N, hidden] against paged ``state`` (``paged_state_specs``).

        Store, then attend: the tokens' window rows, the entries of the windows they close and
        their compressor rows are written first; then each token attends over its own key list
        (its W window positions, oldest first, then its compressed entries: the indexer's top-k
        for CSA, every visible entry for HCA), one query per token (B := N, S := 1)."""
        n, d = x.shape[1], self.head_dim
        cos, sin = rotary(index.positions.unsqueeze(0), self.rope_kind, x.dtype)  # [1, N, r]
        qr, q, kv = self._project(x, cos, sin)
        pool = state[0]
        page = pool.shape[1]
        at = index.window_rows(index.positions, index.token_seq, page)
        pool = torch.index_put(pool.reshape(-1, d), (at,), kv[0, 0]).view(pool.shape)
        new_state = [pool]
        rows = index.window_keys(self.window, page)
        keys = gather_rows(pool.reshape(-1, d), rows)  # [N, W, D]
        valid = rows >= 0
        tok_cos, tok_sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [N, 1, r]
        if self.compressor is not None:
            emit = emits[self.layer_type]
            comp, ring = self.compressor("step", x, index, emit, state[1], state[2], rotary)
            new_state += [comp, ring]
            crows = index.comp_keys(self.ratio, self.capacity, comp.shape[1])
            if self.layer_type == "compressed_sparse_attention":
                idx = self.compressor.indexer
                ikeys, iring = idx("step", x, index, emit, state[3], state[4], rotary)
                new_state += [ikeys, iring]
                crows = idx("select_rows", x.transpose(0, 1), qr.transpose(0, 1), ikeys, crows,
                            index.visible(self.ratio), tok_cos, tok_sin)
            keys = torch.cat([keys, gather_rows(comp.reshape(-1, d), crows)], dim=1)
            valid = torch.cat([valid, crows >= 0], dim=1)
        bias = torch.where(valid, 0.0, NEG_INF).to(q.dtype).view(n, 1, 1, -1)
        out = self._attend(q[0].transpose(0, 1).unsqueeze(2), keys.unsqueeze(1), bias, tok_cos, tok_sin)
        return out.view(1, n, -1), new_state


# -- MoE ---------------------------------------------------------------------------------------------

class Router(nn.Module):
    def __init__(self, config: ModelConfig, hashed: bool):
        super().__init__()
        e = config.n_routed_experts
        self.top_k, self.hidden = config.num_experts_per_tok, config.hidden_size
        self.scale = config.routed_scaling_factor
        self.score_func = config.scoring_func
        self.hashed = hashed
        self.weight = nn.Parameter(torch.empty(e, config.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))
        else:
            self.register_buffer("e_score_correction_bias", torch.zeros(e))

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score_func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        if self.score_func == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1, self.hidden)
        scores = self._score(F.linear(flat, self.weight))
        if self.hashed:
            indices = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            indices = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scale, indices


class Experts(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.limit = config.swiglu_limit

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Gather formulation: each (token, k) pair multiplies its expert's weights (static shapes)."""
        k = indices.shape[-1]
        tokens, hidden = x.shape
        picked = x.repeat_interleave(k, dim=0)
        w = weights.reshape(-1)
        ids = indices.reshape(-1)
        gate_up = torch.bmm(self.gate_up_proj[ids], picked.unsqueeze(-1)).squeeze(-1)
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate.clamp(max=self.limit)) * up.clamp(min=-self.limit, max=self.limit)
        out = torch.bmm(self.down_proj[ids], h.unsqueeze(-1)).squeeze(-1)
        out = out * w.unsqueeze(-1)
        return out.view(tokens, k, hidden).sum(dim=1).to(x.dtype)


class SharedExpert(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, i = config.hidden_size, config.moe_intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.limit = config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, mlp_type: str | None = None):
        super().__init__()
        self.gate = Router(config, hashed=(mlp_type or config.mlp_layer_types[layer]) == "hash_moe")
        self.experts = Experts(config)
        self.shared_experts = SharedExpert(config)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        weights, indices = self.gate(x, input_ids)
        routed = self.experts(x.view(-1, d), indices, weights).view(b, s, d)
        return routed + self.shared_experts(x)


# -- blocks and model ---------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    """Block ``layer`` of the model; ``layer_type`` / ``mlp_type`` override the config's entries for
    it (the MTP block, layer id ``num_hidden_layers``, has none)."""

    def __init__(self, config: ModelConfig, layer: int, max_context: int, layer_type: str | None = None,
                 mlp_type: str | None = None):
        super().__init__()
        self.self_attn = Attention(config, layer, max_context, layer_type)
        self.mlp = MoE(config, layer, mlp_type)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_hc = HyperConnection(config)
        self.ffn_hc = HyperConnection(config)

    def _ffn(self, h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        post, comb, collapsed = self.ffn_hc(h)
        out = self.mlp(self.post_attention_layernorm(collapsed), input_ids)
        return hc_post(out, h, post, comb)

    def forward(self, mode: str, *args):
        return {"prefill": self.prefill, "decode": self.decode, "step": self.step}[mode](*args)

    def prefill(self, h, input_ids, positions, rotary):
        post, comb, collapsed = self.attn_hc(h)
        out, state = self.self_attn("prefill", self.input_layernorm(collapsed), positions, rotary)
        h = hc_post(out, h, post, comb)
        return self._ffn(h, input_ids), state

    def decode(self, h, input_ids, position, state, rotary):
        post, comb, collapsed = self.attn_hc(h)
        out, state = self.self_attn("decode", self.input_layernorm(collapsed), position, state, rotary)
        h = hc_post(out, h, post, comb)
        return self._ffn(h, input_ids), state

    def step(self, h, input_ids, index, emits, state, rotary):
        post, comb, collapsed = self.attn_hc(h)
        out, state = self.self_attn("step", self.input_layernorm(collapsed), index, emits, state, rotary)
        h = hc_post(out, h, post, comb)
        return self._ffn(h, input_ids), state


class MTPBlock(DecoderLayer):
    """DeepSeek-V4's multi-token-prediction block (release ``mtp.0.*``; shared/DSV4_ARCHITECTURE.md
    section 7): a decoder block at layer id ``num_hidden_layers`` (sliding-window attention only,
    learned top-k MoE, its own mHC) fed with ``e_proj(enorm(embed(next token)))`` added to every
    stream of ``h_proj(hnorm(h))``, ``h`` being the streams to continue (the main model's final
    hyper-connection streams at the same position, or this block's own output when drafts are
    chained), then its own HC head and norm before the shared LM head.

    At position ``p`` it reads ``h_p`` and token ``t_{p+1}`` and predicts ``t_{p+2}``; its window
    state is keyed by ``p`` like the main model's. transformers has no MTP (it drops ``mtp.*``), so
    this module is its own reference."""

    def __init__(self, config: ModelConfig, max_context: int):
        super().__init__(config, config.num_hidden_layers, max_context, layer_type="sliding_attention", mlp_type="moe")
        d, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(d, eps)
        self.hnorm = RMSNorm(d, eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.norm = RMSNorm(d, eps)
        self.hc_head = HyperHead(config)

    def forward(self, mode: str, *args):
        return {"prefill": self.prefill, "decode": self.decode, "step": self.step, "draft": self.draft}[mode](*args)

    def mix(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """The block's input streams [B, S, n, D] from ``hidden`` [B, S, n, D] and the next tokens'
        embeddings [B, S, D]."""
        return self.e_proj(self.enorm(embedded)).unsqueeze(2) + self.h_proj(self.hnorm(hidden))

    def draft(self, hidden, embedded, input_ids, index, state, rotary):
        """Paged form over packed rows: the block's output streams and its new window pool."""
        return self.step(self.mix(hidden, embedded), input_ids, index, {}, state, rotary)


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig, max_context: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, max_context) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hc_head = HyperHead(config)
        self.rotary = Rotary(config)


class DeepseekV4Model(nn.Module):
    """DeepSeek-V4 with explicit state. ``state_dict()`` names equal transformers' DeepseekV4ForCausalLM."""

    def __init__(self, config: ModelConfig, max_context: int, *, mtp: bool = False):
        super().__init__()
        self.config = config
        self.max_context = max_context
        self.hc_mult = config.hc_mult
        self.model = _Backbone(config, max_context)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if mtp:  # the draft block (``mtp.0.*``); only where speculative decoding is compiled
            if config.num_nextn_predict_layers < 1:
                raise InputError("DeepseekV4Model(mtp=True): the config has num_nextn_predict_layers=0 (no MTP "
                                 "block); set it to 1 or compile without speculative decoding")
            self.mtp = nn.ModuleList([MTPBlock(config, max_context)])

    @property
    def has_mtp(self) -> bool:
        return hasattr(self, "mtp")

    def state_specs(self, batch: int) -> list[StateSpec]:
        dtype = self.lm_head.weight.dtype
        specs: list[StateSpec] = []
        for i, layer in enumerate(self.model.layers):
            specs += layer.self_attn.state_specs(f"layers.{i}.", batch, dtype)
        return specs

    def _layer_state_counts(self) -> list[int]:
        return [len(layer.self_attn.state_specs("", 1, torch.float32)) for layer in self.model.layers]

    def compression_rates(self) -> dict[str, int]:
        """Compression rate per compressed layer type present in this model."""
        return {layer.self_attn.layer_type: layer.self_attn.ratio for layer in self.model.layers
                if layer.self_attn.ratio}

    def paged_state_specs(self, layout: PageLayout, window_pages: int, comp_pages: int,
                          slots: int) -> list[StateSpec]:
        """The pools of ``step``, every layer's in layer order (paged.py; page 0 and slot 0 are trash)."""
        if layout.window != self.config.sliding_window:
            raise ValueError(f"PageLayout.window={layout.window} but the model's sliding window is "
                             f"{self.config.sliding_window}")
        layout.check_rates(self.compression_rates())
        if layout.max_context > self.max_context:
            raise ValueError(f"PageLayout.max_context={layout.max_context} exceeds the model's {self.max_context}")
        dtype = self.lm_head.weight.dtype
        specs: list[StateSpec] = []
        for i, layer in enumerate(self.model.layers):
            specs += layer.self_attn.paged_state_specs(f"layers.{i}.", layout, window_pages, comp_pages, slots, dtype)
        return specs

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        e = self.model.embed_tokens(input_ids)
        return e.unsqueeze(2).expand(-1, -1, self.hc_mult, -1).contiguous()

    def _head(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model.norm(self.model.hc_head(h, rows)))

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Positions 0..S-1 from an empty state: (logits [B, S, vocab], *state).

        ``S`` may not exceed ``max_context`` (the compressed buffers hold that many tokens' entries);
        under torch.export the ``seq`` dimension's bound enforces it instead of this check.
        """
        s = input_ids.shape[1]
        if isinstance(s, int) and s > self.max_context:
            raise InputError(f"prefill of {s} tokens exceeds max_context={self.max_context} of this model; "
                             "build DeepseekV4Model with a larger max_context")
        h, states = self._prefill_streams(input_ids)
        return (self._head(h), *states)

    def _prefill_streams(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self._embed(input_ids)
        states: list[torch.Tensor] = []
        for layer in self.model.layers:
            h, st = layer("prefill", h, input_ids, positions, self.model.rotary)
            states += st
        return h, states

    def final_streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hyper-connection streams [B, S, n, D] of a whole sequence (before the HC head):
        what the MTP block reads."""
        return self._prefill_streams(input_ids)[0]

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """The MTP block over whole sequences from an empty state (its reference, and its training
        form): position ``p`` reads ``hidden[:, p]`` and ``next_ids[:, p]`` (token ``p + 1``);
        logits [B, S, vocab] predict token ``p + 2``."""
        block = self.mtp[0]
        positions = torch.arange(next_ids.shape[1], device=next_ids.device)
        h, _ = block("prefill", block.mix(hidden, self.model.embed_tokens(next_ids)), next_ids, positions,
                     self.model.rotary)
        return self._mtp_head(h)

    def _mtp_head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the MTP block's streams ``h`` [B, S, n, D]: its own HC head and norm, the shared LM head."""
        block = self.mtp[0]
        return self.lm_head(block.norm(block.hc_head(h)))

    def decode(self, input_ids: torch.Tensor, position: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One token per sequence at ``position`` (0-dim int64): (logits [B, 1, vocab], *new_state)."""
        h = self._embed(input_ids)
        out: list[torch.Tensor] = []
        offset = 0
        for layer, n in zip(self.model.layers, self._layer_state_counts(), strict=True):
            h, st = layer("decode", h, input_ids, position, list(state[offset:offset + n]), self.model.rotary)
            out += st
            offset += n
        return (self._head(h), *out)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, token_seq: torch.Tensor,
             seq_first: torch.Tensor, seq_last: torch.Tensor, logit_rows: torch.Tensor, window_table: torch.Tensor,
             comp_table: torch.Tensor, slot: torch.Tensor, emit_csa: torch.Tensor, emit_hca: torch.Tensor,
             *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One serving step over packed sequences: (logits [L, vocab] of the packed rows ``logit_rows``,
        *new_state) with ``state`` the pools of ``paged_state_specs``.

        Tokens [N] (``input_ids``, ``positions``, ``token_seq``: their sequence) are the chunks of
        R sequences, consecutive rows at consecutive positions; ``seq_first``/``seq_last`` [R] are
        each chunk's first and last row; ``window_table`` [R, Wp], ``comp_table`` [R, Pc] and
        ``slot`` [R] its pages (paged.py). A chunk continues its sequence from the state written by
        earlier steps (chunked prefill; decode is a chunk of one). ``emit_csa``/``emit_hca`` [E]
        are the rows that may close a CSA/HCA window (-1 and rows that close none write to trash)."""
        index = StepIndex(positions, token_seq, seq_first, seq_last, window_table, comp_table, slot)
        emits = {"compressed_sparse_attention": emit_csa, "heavily_compressed_attention": emit_hca}
        ids = input_ids.view(1, -1)
        h = self._embed(ids)
        out: list[torch.Tensor] = []
        offset = 0
        for layer in self.model.layers:
            n = layer.self_attn.paged_state_count
            h, st = layer("step", h, ids, index, emits, list(state[offset:offset + n]), self.model.rotary)
            out += st
            offset += n
        if self.has_mtp:  # the final streams of every row: what the MTP block continues
            return (self._head(h, logit_rows)[0], h[0], *out)
        return (self._head(h, logit_rows)[0], *out)

    def mtp_state_specs(self, layout: PageLayout, window_pages: int) -> list[StateSpec]:
        """The MTP block's pools (its sliding window, in window pages addressed by the same tables as
        the main model's)."""
        return self.mtp[0].self_attn.paged_state_specs("mtp.0.", layout, window_pages, 1, 1,
                                                        self.lm_head.weight.dtype)

    def mtp_step(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                 token_seq: torch.Tensor, seq_first: torch.Tensor, seq_last: torch.Tensor, logit_rows: torch.Tensor,
                 window_table: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The MTP block over packed rows (``step``'s packing; its pools: ``mtp_state_specs``): row
        at position ``p`` reads ``hidden`` [N, n, D] (the streams at ``p``) and ``input_ids`` [N]
        (token ``p + 1``). Returns (logits [L, vocab] of ``logit_rows``: the drafts for ``p + 2``,
        the block's output streams [L, n, D] at those rows: what the next draft continues, *new pool)."""
        index = StepIndex(positions, token_seq, seq_first, seq_last, window_table, window_table, seq_first)
        ids = input_ids.view(1, -1)
        block = self.mtp[0]
        h, st = block("draft", hidden.unsqueeze(0), self.model.embed_tokens(ids), ids, index, list(state),
                      self.model.rotary)
        h = h.index_select(1, logit_rows)
        return (self._mtp_head(h)[0], h[0], *st)

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor, window_table: torch.Tensor,
                    comp_table: torch.Tensor, slot: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``step`` with one token per sequence (row r is sequence r, every row a candidate emitter):
        (logits [R, vocab], *new_state)."""
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.step(input_ids, positions, rows, rows, rows, rows, window_table, comp_table, slot, rows, rows,
                         *state)


class _Entry(nn.Module):
    """Base of the export wrappers: registers the model's own submodules (``model``, ``lm_head``).

    torch.export names a lifted parameter by its path from the exported root, so registering
    the two top-level children directly (instead of the whole model under an attribute) makes
    every exported placeholder target exactly the transformers name (``model.layers.0...``,
    ``lm_head.weight``): ``ENTRY_PARAM_PREFIX`` is empty. The DeepseekV4Model itself is kept
    outside the module tree so its parameters are not registered twice.
    """

    def __init__(self, model: DeepseekV4Model):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head
        object.__setattr__(self, "_impl", model)


class PrefillEntry(_Entry):
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._impl.prefill(input_ids)


class DecodeEntry(_Entry):
    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._impl.decode(input_ids, position, *state)


class RaggedStepEntry(_Entry):
    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._impl.step(*args)


class RaggedDecodeEntry(_Entry):
    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._impl.decode_step(*args)


class MtpStepEntry(_Entry):
    """The MTP block's entry point; its parameters keep their names (``mtp.0.*``) next to the
    shared embedding and LM head."""

    def __init__(self, model: DeepseekV4Model):
        super().__init__(model)
        self.mtp = model.mtp

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._impl.mtp_step(*args)


STEP_INPUTS = ("input_ids", "positions", "token_seq", "seq_first", "seq_last", "logit_rows", "window_table",
               "comp_table", "slot", "emit_csa", "emit_hca")
DECODE_STEP_INPUTS = ("input_ids", "positions", "window_table", "comp_table", "slot")
MTP_STEP_INPUTS = ("input_ids", "positions", "token_seq", "seq_first", "seq_last", "logit_rows", "window_table")
# The symbolic dims of the serving entry points, per input (first axis) and per pool kind.
STEP_DIMS = {"input_ids": "N", "positions": "N", "token_seq": "N", "seq_first": "R", "seq_last": "R",
             "logit_rows": "L", "window_table": "R", "comp_table": "R", "slot": "R", "emit_csa": "Ec",
             "emit_hca": "Eh"}
POOL_DIMS = {"window_kv_pool": "PW", "compressed_kv_pool": "PC", "indexer_keys_pool": "PC",
             "compressor_ring": "SLOTS", "indexer_compressor_ring": "SLOTS"}


def pool_dim(state_name: str) -> str:
    """The pool dimension (PW, PC or SLOTS) of a paged state tensor, from its name."""
    return POOL_DIMS[state_name.rsplit(".", 1)[-1]]


def export_serving_entry_points(model: DeepseekV4Model, layout: PageLayout) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of ``step`` (dynamic N, R, L, Ec, Eh and pool sizes) and ``decode_step``
    (dynamic R and pool sizes) for the page layout ``layout``.

    The example step packs two sequences (chunks of 5 and 4 tokens at different starts); the
    example sizes are distinct so that no two dims are unified by accident."""
    from torch.export import Dim

    device = _example_device(model)
    n_dim, r_dim, l_dim = Dim("N", min=1, max=1 << 20), Dim("R", min=1, max=1 << 16), Dim("L", min=1, max=1 << 20)
    ec, eh = Dim("Ec", min=1, max=1 << 20), Dim("Eh", min=1, max=1 << 20)
    pools = {"PW": Dim("PW", min=2, max=1 << 30), "PC": Dim("PC", min=2, max=1 << 30),
             "SLOTS": Dim("SLOTS", min=2, max=1 << 20)}
    sizes = {"PW": 13, "PC": 11, "SLOTS": 7}
    specs = model.paged_state_specs(layout, sizes["PW"], sizes["PC"], sizes["SLOTS"])
    state = tuple(torch.zeros(s.shape, dtype=s.dtype, device=device) for s in specs)
    state_dims = tuple({0: pools[pool_dim(s.name)]} for s in specs)

    def ints(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype, device=device)

    wp, pc = layout.window_slots, layout.comp_entries
    window_table = ints([[1 + (i % 3) for i in range(wp)], [4 + (i % 3) for i in range(wp)]], torch.int32)
    comp_table = ints([[1 + (i % 2) for i in range(pc)], [3 + (i % 2) for i in range(pc)]], torch.int32)
    slot = ints([1, 2])
    positions = ints([3, 4, 5, 6, 7, 0, 1, 2, 3])
    step_args = (ints([1, 2, 3, 4, 5, 6, 7, 8, 9]), positions, ints([0] * 5 + [1] * 4), ints([0, 5]), ints([4, 8]),
                 ints([4, 8, 2]), window_table, comp_table, slot, ints([0, 8, 2]), ints([4, -1]))
    step_dims = (tuple({0: {"N": n_dim, "R": r_dim, "L": l_dim, "Ec": ec, "Eh": eh}[STEP_DIMS[n]]} for n in STEP_INPUTS)
                 + state_dims)
    step = torch.export.export(RaggedStepEntry(model), (*step_args, *state), dynamic_shapes=(step_dims,),
                               strict=False)
    decode_args = (ints([1, 2, 3]), ints([5, 9, 2]), ints([[1 + (i % 3) for i in range(wp)]] * 3, torch.int32),
                   ints([[1 + (i % 2) for i in range(pc)]] * 3, torch.int32), ints([1, 2, 3]))
    decode_dims = tuple({0: r_dim} for _ in DECODE_STEP_INPUTS) + state_dims
    decode = torch.export.export(RaggedDecodeEntry(model), (*decode_args, *state), dynamic_shapes=(decode_dims,),
                                 strict=False)
    out = {"ragged_step": step, "ragged_decode": decode}
    if model.has_mtp:  # the MTP block over the step's packing (its own window pool, the same tables)
        mtp_specs = model.mtp_state_specs(layout, sizes["PW"])
        mtp_state = tuple(torch.zeros(s.shape, dtype=s.dtype, device=device) for s in mtp_specs)
        cfg = model.config
        hidden = torch.zeros(9, cfg.hc_mult, cfg.hidden_size, dtype=model.lm_head.weight.dtype, device=device)
        by_name = dict(zip(STEP_INPUTS, step_args, strict=True))
        mtp_args = tuple(by_name[n] for n in MTP_STEP_INPUTS)
        mtp_dims = (({0: n_dim},) + tuple({0: {"N": n_dim, "R": r_dim, "L": l_dim}[STEP_DIMS[n]]} for n in MTP_STEP_INPUTS)
                    + tuple({0: pools[pool_dim(s.name)]} for s in mtp_specs))
        out["mtp_step"] = torch.export.export(MtpStepEntry(model), (hidden, *mtp_args, *mtp_state),
                                              dynamic_shapes=(mtp_dims,), strict=False)
    return out


def _example_device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.device


def export_entry_points(model: DeepseekV4Model, *, batch_example: int = 2,
                        seq_example: int | None = None) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of prefill (dynamic batch and sequence) and decode (dynamic batch)."""
    from torch.export import Dim

    device = _example_device(model)
    max_ctx = model.max_context
    seq = seq_example or min(max(model.config.sliding_window + 3, 2 * max(model.config.compress_rates.values()) + 1),
                             max_ctx)
    seq = max(2, min(seq, max_ctx))
    batch = Dim("batch", min=1, max=1 << 16)
    seqdim = Dim("seq", min=2, max=max(max_ctx, 3))
    ids = torch.zeros(batch_example, seq, dtype=torch.long, device=device)
    prefill = torch.export.export(PrefillEntry(model), (ids,), dynamic_shapes={"input_ids": {0: batch, 1: seqdim}},
                                  strict=False)
    specs = model.state_specs(batch_example)
    state = tuple(torch.full(s.shape, s.fill, dtype=s.dtype, device=device) for s in specs)
    tok = torch.zeros(batch_example, 1, dtype=torch.long, device=device)
    pos = torch.tensor(seq, dtype=torch.long, device=device)
    decode = torch.export.export(DecodeEntry(model), (tok, pos, *state),
                                 dynamic_shapes=({0: batch}, None, tuple({0: batch} for _ in specs)), strict=False)
    return {"prefill": prefill, "decode": decode}
