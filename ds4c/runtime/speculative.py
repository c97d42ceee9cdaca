"""Speculative decoding's token rules (#28; docs/design/mtp.md, section 3): drafting a token from the
MTP block's logits and accepting drafts against the main model's logits of a verify step.

A verify step runs the main model over ``[x, d_1 .. d_k]`` at positions ``L .. L+k`` (x: the
request's next token, d: the drafts), which gives the target logits for positions ``L+1 .. L+k+1``.

- Greedy requests accept the longest prefix of drafts equal to the target's argmax, then add the
  target's argmax at the first mismatch (or after the last draft): exactly the tokens greedy
  decoding without speculation gives.
- Sampled requests use the rejection rule of Leviathan et al. (2023) / Chen et al. (2023): draft
  ``d_i`` drawn from the draft distribution ``q_i`` is kept with probability
  ``min(1, p_i(d_i) / q_i(d_i))``; the first rejected one is replaced by a draw from
  ``normalise(max(p_i - q_i, 0))``; if all are kept, one more token comes from ``p_{k+1}``. Every
  emitted token is then distributed as sampling from the target alone would give. ``p`` and ``q``
  are the request's processed distributions (temperature, min-p, top-k, top-p: as ``sample``
  processes them), so speculation samples the same distribution as the sampler.

Penalties (repetition, frequency, presence) apply to each verify row as the sampler would apply
them at that position: over the prompt, the output so far and the drafts before the row
(``penalty_context``). Random numbers come from a generator per (request seed, tokens generated),
so a request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ds4c.runtime.sampling import SamplingParams, _apply_top_k_top_p

__all__ = ["accept", "accept_greedy", "draft_token", "generator_for", "penalty_context", "processed_logits"]


def penalty_context(params: SamplingParams, prompt: list[int], output: list[int], drafts: list[int],
                    vocab: int, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(output-token counts [k+1, vocab], tokens seen [k+1, vocab]) at each of a verify's k + 1 rows
    (row i follows drafts[:i]), as the sampler keeps them; None without penalties."""
    if not params.penalised:
        return None
    base = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).to(device)
    seen = torch.zeros(vocab, dtype=torch.bool, device=device)
    seen[torch.tensor(prompt + output, dtype=torch.long, device=device)] = True
    steps = torch.zeros(len(drafts) + 1, vocab, dtype=base.dtype, device=device)
    if drafts:
        ahead = torch.nn.functional.one_hot(torch.tensor(drafts, device=device), vocab).to(base.dtype)
        steps[1:] = ahead.cumsum(0)
    counts = base + steps
    return counts, seen | (steps > 0)


def processed_logits(logits: Tensor, params: SamplingParams,
                     penalties: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``logits`` [M, vocab] as ``sample`` turns them into a distribution for ``params`` (fp32):
    ``penalties`` (``penalty_context``) applied first; then raw for greedy, else divided by the
    temperature, min-p, top-k and top-p applied."""
    logits = logits.float()
    if penalties is not None:
        counts, seen = penalties
        rep = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    if params.greedy:
        return logits
    scaled = logits / params.temperature
    if params.min_p > 0:
        scaled = scaled.masked_fill(scaled < scaled.amax(dim=-1, keepdim=True) + math.log(params.min_p), -math.inf)
    vocab = scaled.shape[-1]
    top_k = min(params.top_k, vocab) if params.top_k > 0 else vocab
    if top_k < vocab or params.top_p < 1:
        m = scaled.shape[0]
        scaled = _apply_top_k_top_p(scaled, torch.full((m,), top_k, dtype=torch.long, device=scaled.device),
                                    torch.full((m,), params.top_p, dtype=torch.float32, device=scaled.device))
    return scaled


def generator_for(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one verify of a request: a function of its seed and how many tokens it
    has generated (never of the batch)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) % (1 << 63))
    return g


def draft_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """One draft from the MTP block's ``logits`` [vocab]: (token, its distribution q [vocab] fp32, or
    None for greedy, whose draft is the argmax)."""
    processed = processed_logits(logits[None], params)[0]
    if params.greedy:
        return int(processed.argmax()), None
    q = processed.softmax(dim=-1)
    return int(torch.multinomial(q, 1, generator=generator)), q


def accept_greedy(drafts: list[int], picks: list[int]) -> tuple[list[int], int]:
    """Greedy acceptance from the target's argmax ``picks`` of the k + 1 verify rows: the longest
    prefix of ``drafts`` equal to them, then the pick at the first mismatch (or after the last)."""
    a = 0
    while a < len(drafts) and drafts[a] == picks[a]:
        a += 1
    return [*drafts[:a], picks[a]], a


def accept(target: Tensor, drafts: list[int], draft_probs: list[Tensor | None], params: SamplingParams,
           generator: torch.Generator | None,
           penalties: tuple[Tensor, Tensor] | None = None) -> tuple[list[int], int]:
    """The tokens a verify emits: (tokens, drafts accepted). ``target`` [k+1, vocab]: the main
    model's logits of the verify rows; ``drafts`` [k] and ``draft_probs`` (their q, None for greedy);
    ``penalties``: ``penalty_context`` of the rows."""
    k = len(drafts)
    if target.shape[0] != k + 1:
        raise ValueError(f"accept: {target.shape[0]} target rows for {k} drafts; a verify has one row more")
    processed = processed_logits(target, params, penalties)
    if params.greedy:
        return accept_greedy(drafts, processed.argmax(dim=-1).tolist())
    p = processed.softmax(dim=-1)
    out: list[int] = []
    for i, (d, q) in enumerate(zip(drafts, draft_probs, strict=True)):
        assert q is not None
        ratio = float(p[i, d]) / max(float(q[d]), 1e-30)
        u = float(torch.rand((), generator=generator, device=p.device))
        if u < min(1.0, ratio):
            out.append(d)
            continue
        residual = (p[i] - q).clamp(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out, i
    out.append(int(torch.multinomial(p[k], 1, generator=generator)))
    return out, k
