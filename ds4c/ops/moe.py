"""``moe``: DeepSeek-V4's routed + shared experts in one op.

    %y = moe(%x, %ids, %router, %selector, %gate_up, %down, %s_gate, %s_up, %s_down,
             top_k=6, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus") : bf16[B,S,D]

Router: logits = x·routerᵀ (fp32), affinity = score(logits); selection = top-k of (affinity + bias)
(``routing="bias"``, ``selector`` = the correction bias) or ``selector[ids]`` (``routing="hash"``,
``selector`` = tid2eid); weights = affinity[selected] / Σ · route_scale. Experts: clamped SwiGLU
(gate ≤ limit, |up| ≤ limit), down projection, weighted sum over the k picks; plus the shared
expert (same clamps). ``ids`` are the token ids (read by hash routing only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, register_op

ROUTINGS = ("bias", "hash")
SCORES = ("sqrtsoftplus", "sigmoid", "softmax")


def _score(logits: torch.Tensor, score: str) -> torch.Tensor:
    if score == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    if score == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def _route(x, ids, router, selector, top_k: int, route_scale: float, routing: str, score: str):
    """(flattened tokens, selected experts [T, k], routing weights [T, k])."""
    flat = x.reshape(-1, x.shape[-1])
    scores = _score(F.linear(flat, router), score)
    if routing == "hash":
        idx = selector[ids.reshape(-1)].long()
    else:
        idx = torch.topk(scores + selector, top_k, dim=-1, sorted=False).indices
    w = scores.gather(1, idx)
    return flat, idx, w / (w.sum(dim=-1, keepdim=True) + 1e-20) * route_scale


def _shared(x, s_gate, s_up, s_down, limit: float, linear=F.linear) -> torch.Tensor:
    """The shared expert; ``linear(h, w)`` computes ``h @ wᵀ`` (packed weights pass their own)."""
    sg = linear(x, s_gate).clamp(max=limit)
    su = linear(x, s_up).clamp(min=-limit, max=limit)
    return linear(F.silu(sg) * su, s_down)


def moe_reference(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int, route_scale: float,
                  swiglu_limit: float, routing: str, score: str) -> torch.Tensor:
    d = x.shape[-1]
    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    # Group the (token, pick) pairs by expert: memory O(tokens·k·d) instead of gathering a weight
    # matrix per pair (the traced formulation needs 384 GiB for 2048 tokens of V4-Flash).
    sel = idx.reshape(-1)
    token_of = torch.arange(flat.shape[0], device=x.device).repeat_interleave(top_k)
    out = flat.new_zeros((sel.shape[0], d))
    order = torch.argsort(sel, stable=True)
    counts = torch.bincount(sel, minlength=gate_up.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        xe = flat[token_of[pairs]]
        gu = xe @ gate_up[e].t()
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g.clamp(max=swiglu_limit)) * u.clamp(min=-swiglu_limit, max=swiglu_limit)
        out[pairs] = h @ down[e].t()
    out = out * w.reshape(-1).unsqueeze(-1)
    routed = out.view(-1, top_k, d).sum(dim=1).to(x.dtype).view(x.shape)
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit)


def moe_gather_formulation(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int,
                           route_scale: float, swiglu_limit: float, routing: str, score: str) -> torch.Tensor:
    """The export-friendly (static-shape) formulation the model traces: one weight gather per (token, pick)."""
    d = x.shape[-1]
    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    picked = flat.repeat_interleave(top_k, dim=0)
    sel = idx.reshape(-1)
    gu = torch.bmm(gate_up[sel], picked.unsqueeze(-1)).squeeze(-1)
    g, u = gu.chunk(2, dim=-1)
    h = F.silu(g.clamp(max=swiglu_limit)) * u.clamp(min=-swiglu_limit, max=swiglu_limit)
    out = torch.bmm(down[sel], h.unsqueeze(-1)).squeeze(-1) * w.reshape(-1).unsqueeze(-1)
    routed = out.view(-1, top_k, d).sum(dim=1).to(x.dtype).view(x.shape)
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit)


@register_op
class Moe(OpDef):
    name = "moe"
    num_results = 1

    def reference(self, *args, **kwargs):
        return moe_reference(*args, **kwargs)

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != 9:
            raise VerificationError("moe takes 9 operands (x, ids, router, selector, gate_up, down, s_gate, s_up, s_down)")
        if op.kwargs.get("routing") not in ROUTINGS or op.kwargs.get("score") not in SCORES:
            raise VerificationError(f"moe: routing must be one of {ROUTINGS}, score one of {SCORES}")
