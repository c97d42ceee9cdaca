"""Precision units: the weights that get one storage format together, found from the ops that read them.

A unit is a linear's weight, a grouped linear's weight, an embedding table, the routed experts of
one MoE (gate_up and down together: one expert group) or its shared expert: the operands each op
declares with a ``unit`` (``ds4c.ir.registry.Operand``). Everything else a graph reads (norms, mHC
mixing, sinks, biases, the MoE router, whose top-k is discontinuous) stays in the compute dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import get_op
from ds4c.ir.types import TensorType

# expert unit kind -> the ``moe`` keyword naming the activation format of its GEMMs
MOE_ACT_KWARG = {"experts": "act", "shared_experts": "shared_act"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "model.layers.1.mlp.experts"
    kind: str  # linear | grouped_linear | embedding | experts | shared_experts
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    op_index: int  # first op that reads it

    @property
    def layer(self) -> int | None:
        m = _LAYER.search(self.name + ".")
        return int(m.group(1)) if m else None

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total


def _common_prefix(names: tuple[str, ...]) -> str:
    parts = [n.removesuffix(".weight").split(".") for n in names]
    out = []
    for level in zip(*parts, strict=False):
        if any(p != level[0] for p in level):
            break
        out.append(level[0])
    return ".".join(out) if len(names) > 1 else names[0].removesuffix(".weight")


def find_units(graph: Graph) -> list[Unit]:
    """Every unit of ``graph``, in the order of the first op reading it; weights read twice count once."""
    params = {id(v) for v in graph.inputs_of_kind("param")}
    seen: set[str] = set()
    units: list[Unit] = []
    for i, op in enumerate(graph.ops):
        for positions, kind in get_op(op.name).unit_operands():
            vals = [op.args[p] if p < len(op.args) else None for p in positions]
            if not all(isinstance(v, Value) and id(v) in params and isinstance(v.type, TensorType) and v.type.rank >= 2 and v.type.is_static
                       and v.type.dtype.is_floating_point for v in vals):
                continue
            names = tuple(v.name for v in vals)
            if any(n in seen for n in names):
                continue
            seen.update(names)
            units.append(Unit(_common_prefix(names), kind, names, tuple(tuple(v.type.shape) for v in vals), i))
    return units


def unit_op(graph: Graph, unit: Unit) -> Op:
    return graph.ops[unit.op_index]
