"""Manifold-constrained hyper-connections (mHC): ``mhc.pre``, ``mhc.post``, ``mhc.head``.

N = hc_mult residual streams ``H [.., N, D]``. Per sub-layer (math in fp32, as DeepSeek-V4):

    %x, %post, %comb = mhc.pre(%H, %fn, %base, %scale, norm_eps=1e-06, hc_eps=1e-06, sinkhorn_iters=20)
        mix  = linear(rms(flatten(H)), fn)  split [N | N | N*N]
        pre  = sigmoid(mix0*scale0 + base0) + hc_eps;  post = 2*sigmoid(mix1*scale1 + base1)
        comb = Sinkhorn(softmax(mix2*scale2 + base2, -1) + hc_eps), ``sinkhorn_iters`` column/row steps
        x    = sum_i pre_i * H_i                         -> [.., D], [.., N], [.., N, N]
    %H2 = mhc.post(%f, %H, %post, %comb)  = post ⊗ f + combᵀ·H           -> [.., N, D]
    %y = mhc.head(%H, %fn, %base, %scale, norm_eps=1e-06, hc_eps=1e-06)    -> [.., D]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4c.errors import VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.types import TensorType
from ds4c.ops.norms import rms_norm_reference


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def mhc_pre_reference(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
                      norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    n = h.shape[-2]
    flat = rms_norm_reference(h.flatten(-2).float(), None, norm_eps)  # flatten: -1 is ambiguous for 0 rows
    mix = F.linear(flat, fn.float())
    pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    s_pre, s_post, s_comb = scale.unbind(0)
    comb_w = comb_w.view(*comb_w.shape[:-1], n, n)
    pre = torch.sigmoid(pre_w * s_pre + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * s_post + post_b)
    comb = torch.softmax(comb_w * s_comb + comb_b.view(n, n), dim=-1) + hc_eps
    comb = sinkhorn(comb, sinkhorn_iters, hc_eps)
    collapsed = (pre.unsqueeze(-1) * h).sum(dim=-2).to(h.dtype)
    return collapsed, post, comb


def mhc_post_reference(f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    dtype = h.dtype
    return post.to(dtype).unsqueeze(-1) * f.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), h)


def mhc_head_reference(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
                       norm_eps: float, hc_eps: float) -> torch.Tensor:
    flat = rms_norm_reference(h.flatten(-2).float(), None, norm_eps)
    mix = F.linear(flat, fn.float())
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * h).sum(dim=-2).to(h.dtype)


@register_op
class MhcPre(OpDef):
    name = "mhc.pre"
    num_results = 3
    operands = (Operand("h"), Operand("fn", "weight"), Operand("base", "weight"), Operand("scale", "weight"))
    traits = frozenset({"npu", "positionwise"})

    def reference(self, h, fn, base, scale, *, norm_eps, hc_eps, sinkhorn_iters):
        return mhc_pre_reference(h, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)

    def infer_types(self, operand_types, kwargs):
        h = self.tensor_operand(operand_types, 0, min_rank=2)
        *lead, n, d = h.shape  # the mixing weights are fp32 (the math is)
        return [TensorType(h.dtype, (*lead, d)), TensorType(torch.float32, (*lead, n)),
                TensorType(torch.float32, (*lead, n, n))]

    def verify(self, op) -> None:
        super().verify(op)
        if set(op.kwargs) != {"norm_eps", "hc_eps", "sinkhorn_iters"} or len(op.args) != 4:
            raise VerificationError("mhc.pre takes (H, fn, base, scale) and norm_eps=, hc_eps=, sinkhorn_iters=")
        if not isinstance(op.kwargs["sinkhorn_iters"], int) or op.kwargs["sinkhorn_iters"] < 1:
            raise VerificationError("mhc.pre: sinkhorn_iters must be a positive int")


@register_op
class MhcPost(OpDef):
    name = "mhc.post"
    num_results = 1
    operands = (Operand("f"), Operand("h"), Operand("post"), Operand("comb"))
    traits = frozenset({"npu", "positionwise"})

    def reference(self, f, h, post, comb):
        return mhc_post_reference(f, h, post, comb)

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 1, min_rank=2)]  # the streams' type


@register_op
class MhcHead(OpDef):
    name = "mhc.head"
    num_results = 1
    operands = (Operand("h"), Operand("fn", "weight"), Operand("base", "weight"), Operand("scale", "weight"))
    traits = frozenset({"npu", "positionwise"})

    def reference(self, h, fn, base, scale, *, norm_eps, hc_eps):
        return mhc_head_reference(h, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps)

    def infer_types(self, operand_types, kwargs):
        h = self.tensor_operand(operand_types, 0, min_rank=2)
        return [TensorType(h.dtype, (*h.shape[:-2], h.shape[-1]))]
