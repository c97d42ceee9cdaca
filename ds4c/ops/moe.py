"""``moe``: DeepSeek-V4's routed + shared experts in one op.

    %y = moe(%x, %ids, %router, %selector, %gate_up, %down, %s_gate, %s_up, %s_down,
             top_k=6, route_scale=1.5, swiglu_limit=10.0, routing="bias", score="sqrtsoftplus") : bf16[B,S,D]

Router: logits = x·routerᵀ (fp32), affinity = score(logits); selection = top-k of (affinity + bias)
(``routing="bias"``, ``selector`` = the correction bias) or ``selector[ids]`` (``routing="hash"``,
``selector`` = tid2eid); weights = affinity[selected] / Σ · route_scale. Experts: clamped SwiGLU
(gate ≤ limit, |up| ≤ limit), down projection, weighted sum over the k picks; plus the shared
expert (same clamps). ``ids`` are the token ids (read by hash routing only).

Activation quantisation (quantize_weights sets it where the experts' weights are FP8 and the
target's tensor cores multiply FP8): ``act`` (routed experts) and ``shared_act`` (shared expert)
name the format a GEMM's input is quantised to first, as DeepSeek's ``act_quant`` does inside
every FP8 linear: the hidden row ``x`` before gate/up and the SwiGLU output ``h`` (in x's dtype)
before down, one scale per token and block (ds4c.quant.activations). Absent: the compute dtype.

    %y = moe(%x, ..., top_k=6, ..., act="fp8", shared_act="fp8") : bf16[B,S,D]

Expert parallelism (``shard_experts``): ``expert_offset=o`` with ``gate_up``/``down`` holding
experts ``o ..`` only computes the picks of those; ``shared=False`` leaves out the shared expert.
The ranks' results summed (``dist.all_reduce``) are the whole op's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op

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


def _quantized(t: torch.Tensor, act: str | None) -> torch.Tensor:
    """``t`` as a GEMM that multiplies in ``act`` sees it (None: unchanged)."""
    if act is None:
        return t
    from ds4c.quant.activations import roundtrip

    return roundtrip(t, act)


def _linear(h: torch.Tensor, w: torch.Tensor, act: str | None) -> torch.Tensor:
    return F.linear(_quantized(h, act), w)


def _shared(x, s_gate, s_up, s_down, limit: float, linear=_linear, act: str | None = None) -> torch.Tensor:
    """The shared expert; ``linear(h, w, act)`` computes ``h @ wᵀ`` with ``h`` quantised to ``act``
    first (packed weights pass their own)."""
    sg = linear(x, s_gate, act).clamp(max=limit)
    su = linear(x, s_up, act).clamp(min=-limit, max=limit)
    return linear(F.silu(sg) * su, s_down, act)


def moe_reference(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int, route_scale: float,
                  swiglu_limit: float, routing: str, score: str, act: str | None = None,
                  shared_act: str | None = None, expert_offset: int = 0, shared: bool = True) -> torch.Tensor:
    """Routing over all of ``router``'s experts; ``gate_up``/``down`` hold experts ``expert_offset
    ..`` of them (all by default; a slice on a rank of an expert-parallel program, whose partial
    sums the ranks then add), and ``shared`` says whether the shared expert is added here."""
    d = x.shape[-1]
    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    flat_q = _quantized(flat, act)  # per token: the same for every expert the token picks
    # Group the (token, pick) pairs by expert: memory O(tokens·k·d) instead of gathering a weight
    # matrix per pair (the traced formulation needs 384 GiB for 2048 tokens of V4-Flash).
    sel = idx.reshape(-1)
    token_of = torch.arange(flat.shape[0], device=x.device).repeat_interleave(top_k)
    out = flat.new_zeros((sel.shape[0], d))
    order = torch.argsort(sel, stable=True)
    counts = torch.bincount(sel, minlength=max(router.shape[0], expert_offset + gate_up.shape[0])).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        local = e - expert_offset
        if not 0 <= local < gate_up.shape[0]:  # another rank's expert: its rows stay 0 here
            continue
        xe = flat_q[token_of[pairs]]
        gu = xe @ gate_up[local].t()
        g, u = gu.chunk(2, dim=-1)
        h = F.silu(g.clamp(max=swiglu_limit)) * u.clamp(min=-swiglu_limit, max=swiglu_limit)
        out[pairs] = _quantized(h, act) @ down[local].t()
    out = out * w.reshape(-1).unsqueeze(-1)
    routed = out.view(-1, top_k, d).sum(dim=1).to(x.dtype).view(x.shape)
    if not shared:
        return routed
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit, act=shared_act)


def moe_gather_formulation(x, ids, router, selector, gate_up, down, s_gate, s_up, s_down, *, top_k: int,
                           route_scale: float, swiglu_limit: float, routing: str, score: str, act: str | None = None,
                           shared_act: str | None = None, expert_offset: int = 0, shared: bool = True) -> torch.Tensor:
    """The export-friendly (static-shape) formulation the model traces: one weight gather per (token, pick)."""
    d = x.shape[-1]
    flat, idx, w = _route(x, ids, router, selector, top_k, route_scale, routing, score)
    picked = _quantized(flat, act).repeat_interleave(top_k, dim=0)
    sel = idx.reshape(-1)
    weight = w.reshape(-1)
    if expert_offset or gate_up.shape[0] != router.shape[0]:  # a rank's experts (the traced form has all)
        sel = sel - expert_offset
        weight = weight * ((sel >= 0) & (sel < gate_up.shape[0]))  # picks of the experts held here
        sel = sel.clamp(0, gate_up.shape[0] - 1)
    gu = torch.bmm(gate_up[sel], picked.unsqueeze(-1)).squeeze(-1)
    g, u = gu.chunk(2, dim=-1)
    h = _quantized(F.silu(g.clamp(max=swiglu_limit)) * u.clamp(min=-swiglu_limit, max=swiglu_limit), act)
    out = torch.bmm(down[sel], h.unsqueeze(-1)).squeeze(-1) * weight.unsqueeze(-1)
    routed = out.view(-1, top_k, d).sum(dim=1).to(x.dtype).view(x.shape)
    if not shared:
        return routed
    return routed + _shared(x, s_gate, s_up, s_down, swiglu_limit, act=shared_act)


@register_op
class Moe(OpDef):
    name = "moe"
    num_results = 1
    operands = (Operand("x"), Operand("ids", "index"), Operand("router", "weight"), Operand("selector", "weight"),
                Operand("gate_up", "weight", unit="experts"), Operand("down", "weight", unit="experts"),
                Operand("s_gate", "weight", unit="shared_experts"), Operand("s_up", "weight", unit="shared_experts"),
                Operand("s_down", "weight", unit="shared_experts"))
    traits = frozenset({"npu", "positionwise", "host_sync"})
    packed_variant = "moe.packed"

    def reference(self, *args, **kwargs):
        return moe_reference(*args, **kwargs)

    def portable(self, kwargs):
        return moe_gather_formulation

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]

    def verify(self, op) -> None:
        super().verify(op)
        if len(op.args) != len(self.operands):
            raise VerificationError(f"moe takes {len(self.operands)} operands "
                                    f"({', '.join(o.name for o in self.operands)})")
        if op.kwargs.get("routing") not in ROUTINGS or op.kwargs.get("score") not in SCORES:
            raise VerificationError(f"moe: routing must be one of {ROUTINGS}, score one of {SCORES}")
        offset = op.kwargs.get("expert_offset", 0)
        if not isinstance(offset, int) or offset < 0 or not isinstance(op.kwargs.get("shared", True), bool):
            raise VerificationError("moe: expert_offset must be an integer >= 0 and shared a boolean")
        verify_activations(op)


def verify_activations(op) -> None:
    """``act`` / ``shared_act`` of ``moe`` and ``moe.packed``: an activation format or absent."""
    from ds4c.quant.activations import ACTIVATION_FORMATS

    for key in ("act", "shared_act"):
        if op.kwargs.get(key) not in (None, *ACTIVATION_FORMATS):
            raise VerificationError(f"{op.name}: {key} must be one of {', '.join(ACTIVATION_FORMATS)} (or absent), "
                                    f"got {op.kwargs.get(key)!r}")
