"""Which ops of a graph run on the NPU, and why the others stay on the host.

The decision is per op kind (plus the instance's dtypes and attributes), and every host op gets a
reason that ``ds4c inspect`` prints:

- NPU: the fused compute ops (attention, MoE with hash routing, RMSNorm, mHC, compress, RoPE,
  grouped linear, int8 dequantisation) and the ATen arithmetic between them (linear, matmul,
  elementwise math). Their operands must be tensors in dtypes the target's units compute in
  (``NpuFacts.dtypes``; integer tensors are accepted as indices).
- host: top-k selection (``indexer.topk``, MoE ``routing="bias"``): TVM 0.27's ``c`` codegen of
  topk emits invalid C; layout and indexing ops (views, slices, concatenation, gathers): no
  arithmetic, the host runtime passes tensors through; integer/boolean mask arithmetic and
  symbolic sizes: host-side control; anything not listed: not lowered yet.

    >>> place(op, target)
    Placement(npu=False, reason="top-k selection: TVM 0.27's c codegen of topk emits invalid C")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ds4c.errors import TargetError
from ds4c.ir.graph import Op, Value, iter_values
from ds4c.ir.types import TensorType
from ds4c.targets import Target, canonical_dtype

ACT_REASON = "activation quantisation to FP8/FP4: the NPU computes in fp16/int8/fp32, so the host runs it"
TOPK_REASON = "top-k selection: TVM 0.27's c codegen of topk emits invalid C, so it runs on the host"

# Fused ds4c ops the NPU takes (their references are traced into Relax).
NPU_FUSED = frozenset({"attention.sliding", "attention.csa", "attention.hca", "moe", "rms_norm", "mhc.pre",
                       "mhc.post", "mhc.head", "compress", "rope", "linear.grouped", "quant.dequant"})
# ATen arithmetic the NPU takes: matrix-unit ops and vector-unit elementwise math.
NPU_ATEN = frozenset({
    "aten.linear.default", "aten.matmul.default", "aten.mm.default", "aten.bmm.default",
    "aten.mul.Tensor", "aten.add.Tensor", "aten.sub.Tensor", "aten.div.Tensor", "aten.neg.default",
    "aten.cos.default", "aten.sin.default", "aten.exp.default", "aten.rsqrt.default", "aten.sqrt.default",
    "aten.silu.default", "aten.sigmoid.default", "aten._softmax.default", "aten.softmax.int",
})
# Host ops with a specific reason; the rest of ATen falls into the generic classes below.
HOST_REASONS = {
    "indexer.topk": TOPK_REASON,
    "aten.topk.default": TOPK_REASON,
    "memory.prefetch": "host-memory prefetch: a transfer the host runtime issues, not a kernel",
}
_LAYOUT_WORDS = ("view", "reshape", "unsqueeze", "squeeze", "transpose", "permute", "expand", "slice", "select",
                 "cat", "stack", "flatten", "contiguous", "clone", "repeat", "index", "gather", "scatter",
                 "embedding", "to.", "_to_copy", "split", "chunk", "narrow", "alias", "t.default")
LAYOUT_REASON = "layout/indexing (no arithmetic): the host runtime passes the tensors through"
FACTORY_REASON = "tensor factory (arange/full/zeros): host-side constant"
SYM_REASON = "symbolic size arithmetic: host-side control"
UNLISTED_REASON = "not lowered to TVM yet: runs the op's reference on the host"

_INDEX_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class Placement:
    npu: bool
    reason: str = ""


def place(op: Op, target: Target) -> Placement:
    """Where ``op`` runs on ``target`` (an ``npu`` target record), with the reason for host ops."""
    name = op.name
    if name in HOST_REASONS:
        return Placement(False, HOST_REASONS[name])
    if name.startswith("sym.") or name == "aten.sym_size.int":
        return Placement(False, SYM_REASON)
    if name not in NPU_FUSED and name not in NPU_ATEN:
        short = name.removeprefix("aten.")
        if any(w in short for w in ("arange", "full", "zeros", "ones", "empty", "new_")):
            return Placement(False, FACTORY_REASON)
        if any(short.startswith(w) or f".{w}" in short for w in _LAYOUT_WORDS):
            return Placement(False, LAYOUT_REASON)
        return Placement(False, UNLISTED_REASON)
    if name == "moe" and op.kwargs.get("routing") != "hash":
        return Placement(False, f"moe routing='{op.kwargs.get('routing')}' picks experts with {TOPK_REASON}")
    if name == "moe" and (op.kwargs.get("act") or op.kwargs.get("shared_act")):
        return Placement(False, f"{ACT_REASON} (act={op.kwargs.get('act')}, shared_act={op.kwargs.get('shared_act')})")
    return _check_operands(op, target)


def _check_operands(op: Op, target: Target) -> Placement:
    allowed = set(target.npu.dtypes) if target.npu is not None else set()
    values: list[Value] = [*iter_values(op.args), *iter_values(op.kwargs), *op.results]
    for v in values:
        if not isinstance(v.type, TensorType):
            return Placement(False, f"takes a scalar operand (%{v.name}: {v.type}): host-side control")
        dt = v.type.dtype
        if dt in _INDEX_DTYPES:  # indices into floating-point work are fine; integer results are control
            if v in op.results:
                return Placement(False, "integer index arithmetic: host-side control")
            continue
        if dt == torch.bool:
            return Placement(False, "boolean mask arithmetic: host-side control")
        try:
            name = canonical_dtype(str(dt))
        except TargetError:
            name = str(dt).removeprefix("torch.")
        if name not in allowed:
            return Placement(False, f"dtype {name} is not an NPU dtype ({', '.join(target.npu.dtypes)}); "
                                    "compile with --precision fp32")
    return Placement(True)


def placement_table(ops: list[Op], target: Target) -> dict[str, dict[str, Any]]:
    """Per op kind: how many instances run on the NPU and on the host, with the host reasons."""
    table: dict[str, dict[str, Any]] = {}
    for op in ops:
        p = place(op, target)
        row = table.setdefault(op.name, {"npu": 0, "host": 0, "reasons": []})
        if p.npu:
            row["npu"] += 1
        else:
            row["host"] += 1
            if p.reason not in row["reasons"]:
                row["reasons"].append(p.reason)
    return dict(sorted(table.items()))
