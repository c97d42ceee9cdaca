"""Common-subexpression elimination."""

from __future__ import annotations

import torch

from ds4c.ir.graph import Graph, Value, replace_uses
from ds4c.ir.printer import format_literal
from ds4c.ir.registry import get_op
from ds4c.passes.manager import PassContext, register_pass

_SMALL_CONST = 1 << 16  # bytes: constants compared by content (tables, frequencies), not weights
_NONDETERMINISTIC = ("rand", "normal", "uniform", "bernoulli", "dropout", "multinomial", "exponential")


def is_deterministic(op_name: str) -> bool:
    return not any(w in op_name for w in _NONDETERMINISTIC)


@register_pass("cse")
def cse(graph: Graph, ctx: PassContext) -> Graph:
    """Merge pure, deterministic ops that compute the same thing from the same operands, and small
    constants of equal content (each layer's copy of the RoPE frequencies: their tables then merge).

    Needs: nothing. Guarantees: no two pure ops have equal name, arguments and result types; no
    two constants under 64 KiB have equal dtype, shape and bytes. DCE drops the merged constants.

        %a = aten.sym_size.int(%x, 1) : int
        %b = aten.sym_size.int(%x, 1) : int     ->  uses of %b read %a
    """
    seen: dict[tuple, tuple[Value, ...]] = {}
    mapping: dict[Value, Value] = _equal_constants(graph, ctx)
    ops = []
    for op in graph.ops:
        if mapping:
            op = op.map_operands(lambda v: mapping.get(v, v))
        if get_op(op.name).pure and is_deterministic(op.name):
            key = (
                op.name,
                format_literal(list(op.args)),
                format_literal([[k, v] for k, v in sorted(op.kwargs.items())]),
                tuple(str(r.type) for r in op.results),
            )
            prev = seen.get(key)
            if prev is not None and ctx.allow_rewrite(f"merge %{op.results[0].name} into %{prev[0].name}"):
                mapping.update(zip(op.results, prev, strict=True))
                continue
            seen[key] = op.results
        ops.append(op)
    return replace_uses(graph.copy(ops=ops), mapping)


def _equal_constants(graph: Graph, ctx: PassContext) -> dict[Value, Value]:
    """Each small constant input whose dtype, shape and bytes equal an earlier one's -> that one."""
    first: dict[tuple, Value] = {}
    mapping: dict[Value, Value] = {}
    for inp in graph.inputs:
        t = graph.constants.get(inp.value.name) if inp.kind == "const" else None
        if t is None or t.device.type == "meta" or t.numel() * t.element_size() > _SMALL_CONST:
            continue
        raw = t.detach().cpu().contiguous().reshape(-1)
        key = (str(t.dtype), tuple(t.shape), raw.view(torch.uint8).numpy().tobytes() if raw.numel() else b"")
        prev = first.get(key)
        if prev is None:
            first[key] = inp.value
        elif ctx.allow_rewrite(f"merge constant %{inp.value.name} into %{prev.name}"):
            mapping[inp.value] = prev
    return mapping
