"""Which ops of a graph run on the NPU, and why the others stay on the host.

The decision is per op kind (plus the instance's dtypes and attributes), and every host op gets a
reason that ``ds4c inspect`` prints:

- NPU: the ops with the ``npu`` trait (``ds4c.ir.registry``): the fused compute ops (attention,
  MoE with hash routing, RMSNorm, mHC, compress, RoPE, grouped linear, int8 dequantisation) and
  the ATen arithmetic between them (linear, matmul, elementwise math). Their operands must be
  tensors in dtypes the target's units compute in (``NpuFacts.dtypes``; integer tensors are
  accepted as indices).
- host: top-k selection (the ``topk`` trait, MoE ``routing="bias"``): TVM 0.27's ``c`` codegen of
  topk emits invalid C; transfers between memories (``ds4c.prefetch``); layout and indexing ops
  (views, slices, concatenation, gathers: no arithmetic, the host runtime passes tensors through);
  integer/boolean mask arithmetic and symbolic sizes: host-side control; anything else: not
  lowered yet.

    >>> place(op, target)
    Placement(npu=False, reason="top-k selection: TVM 0.27's c codegen of topk emits invalid C")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ds4c.errors import TargetError
from ds4c.ir.graph import Op, Value, iter_values
from ds4c.ir.registry import get_op
from ds4c.ir.types import TensorType
from ds4c.targets import Target, canonical_dtype

ACT_REASON = "activation quantisation to FP8/FP4: the NPU computes in fp16/int8/fp32, so the host runs it"
TOPK_REASON = "top-k selection: TVM 0.27's c codegen of topk emits invalid C, so it runs on the host"

TRANSFER_REASON = "a transfer between host and device memory: the host runtime issues it, not a kernel"
# traits of ops that move elements without arithmetic
_LAYOUT_TRAITS = frozenset({"view", "reshape", "broadcast", "cast", "identity", "copy_if_needed", "layout"})
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
    name, traits = op.name, get_op(op.name).traits
    if "topk" in traits:
        return Placement(False, TOPK_REASON)
    if "transfer" in traits:
        return Placement(False, TRANSFER_REASON)
    if name.startswith("sym.") or name == "aten.sym_size.int":
        return Placement(False, SYM_REASON)
    if "npu" not in traits:
        if "factory" in traits:
            return Placement(False, FACTORY_REASON)
        if traits & _LAYOUT_TRAITS:
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
