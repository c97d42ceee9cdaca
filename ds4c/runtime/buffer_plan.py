"""The kernel executor's arena: every activation it can place, at the offset the compiled plan gives it.

The plan is the compiler's (``plan_memory``, re-packed by ``schedule_streams`` for the issue
order and the streams the runtime runs; the artifact's ``plans/<entry>.memory.json``). It is
symbolic in the sizes: each buffer lists the buffers it must sit above (``below``: those live at
the same time, by stream order and events, and placed lower), so at the sizes of a call (decode at
B=32, a 300-token prompt) the runtime evaluates the offsets (``evaluate_placement``) instead of
planning again: same relative placement, compacted to the call's sizes. What the runtime adds:

- Graph outputs are not placed: they outlive the step (logits, the new state).
- A value is placed only when its op can write into a given buffer: a Triton launcher (it takes
  its results from ``result_buffer``), or an ATen op with an ``out=`` overload (``out_variant``).
  Other results (and kernel scratch: split-K partials, flash-decoding partials) are allocated as
  before; the executor counts both. Their slots stay empty.

        compiled (plan binding B=1, S=2048):    %a [0, 4096)   %b below: [%a]   %c below: [%a, %b]
        a call at B=32: %a's bytes x32 -> %a [0, 131072), %b [131072, ...), %c above both
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds4c.errors import ArtifactError
from ds4c.ir.graph import Graph
from ds4c.ir.registry import has_trait
from ds4c.ir.shapes import eval_dim
from ds4c.ir.types import TensorType


def _align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def evaluate_placement(sizes: list[int | None], below: list[list[int]], order: list[int],
                       alignment: int) -> tuple[list[int | None], int]:
    """Offsets and arena bytes of a ``placement_order`` (``ds4c.passes.plan_memory``) at concrete
    buffer sizes (None: not placed).
    ``order`` lists the buffers from the lowest compiled offset up (a topological order of ``below``)."""
    offsets: list[int | None] = [None] * len(sizes)
    top = 0
    for k in order:
        if sizes[k] is None:
            continue
        off = 0
        for p in below[k]:
            if offsets[p] is not None:
                off = max(off, offsets[p] + _align_up(max(sizes[p] or 0, 1), alignment))
        offsets[k] = off
        top = max(top, off + _align_up(max(sizes[k], 1), alignment))
    return offsets, _align_up(top, alignment)


@functools.cache
def out_variant(op_name: str) -> Any | None:
    """The ``out=`` overload of an ATen op (``aten.add.Tensor`` -> ``aten.add.out``): same
    arguments as the functional overload plus one written ``out`` tensor; None when the op has
    none, returns more than one tensor, or may return a view of an input."""
    parts = op_name.split(".")
    if len(parts) != 3 or parts[0] != "aten" or has_trait(op_name, "view"):
        return None
    packet = getattr(torch.ops.aten, parts[1], None)
    functional = getattr(packet, parts[2], None) if packet is not None else None
    if functional is None:
        return None
    schema = functional._schema
    if len(schema.returns) != 1 or schema.returns[0].alias_info is not None or schema.is_mutable:
        return None
    want = [(a.name, str(a.type)) for a in schema.arguments]
    for name in packet.overloads():
        overload = getattr(packet, name)
        args = overload._schema.arguments
        written = [a for a in args if a.alias_info is not None and a.alias_info.is_write]
        if len(written) == 1 and written[0].name == "out" and written[0].kwarg_only and \
                [(a.name, str(a.type)) for a in args if a is not written[0]] == want:
            return overload
    return None


@dataclass
class BufferPlan:
    """Offsets of the placed results at one binding: ``slots[i][k]`` is (offset, dtype, shape) of
    result ``k`` of step ``i``, or None where that result is allocated by its op."""

    sizes: dict[str, int]
    arena_bytes: int
    slots: list[list[tuple[int, torch.dtype, tuple[int, ...]] | None]]
    placed: int  # results with a slot
    placed_bytes: int  # their bytes (what one allocation per result would have held at once, at most)
    peak_live_bytes: int  # the most placed bytes live at one step (the arena's lower bound, alignment aside)
    unplaced: dict[str, int]  # per op name, its results (not graph outputs) its op allocates itself
    outputs: int  # buffers that hold (or may hold) graph outputs: allocated by their ops, they outlive the step
    seconds: float = 0.0  # time to evaluate the compiled plan at these sizes

    def views(self, arena: torch.Tensor) -> list[list[torch.Tensor | None] | None]:
        """Each slot as a contiguous tensor of its result's dtype and shape inside ``arena``; None
        for a step with no slot."""
        return [None if all(s is None for s in step) else [None if s is None else _view(arena, *s) for s in step]
                for step in self.slots]

    @functools.cached_property
    def numels(self) -> list[list[int | None]]:
        """Elements of each slot's result (what the op must return there)."""
        return [[None if s is None else math.prod(s[2]) for s in step] for step in self.slots]


def _view(arena: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    return arena[offset:offset + nbytes].view(dtype).view(shape)


def place(graph: Graph, plan: Mapping[str, Any], sizes: dict[str, int], placeable: Sequence[bool]) -> BufferPlan:
    """The compiled ``plan`` evaluated at ``sizes`` for ``graph`` (ops in the order the executor
    runs them, the order the plan was packed for): a slot for each result of a ``placeable`` op
    that is not a graph output."""
    t0 = time.perf_counter()
    result_at = {r.name: (i, k) for i, op in enumerate(graph.ops) for k, r in enumerate(op.results)}
    buffers = plan["buffers"]

    @functools.cache
    def dim(d: str) -> int:  # a symbolic dim at ``sizes`` (many buffers share each)
        return max(0, eval_dim(d, sizes))

    nbytes: list[int | None] = []
    shapes: list[tuple[torch.dtype, tuple[int, ...]] | None] = []
    unplaced: dict[str, int] = {}
    outputs = 0
    for b in buffers:
        where = result_at.get(b["value"])
        if where is None:
            raise ArtifactError(f"the memory plan places %{b['value']}, which graph @{graph.name} does not make; "
                                "the artifact is inconsistent - recompile it")
        i, k = where
        ty, shape = graph.ops[i].results[k].type, None
        if b.get("output"):
            outputs += 1
        elif placeable[i] and isinstance(ty, TensorType):
            try:
                shape = tuple(d if isinstance(d, int) else dim(d) for d in ty.shape)
            except Exception:  # noqa: BLE001 - a size no bound symbol determines (data-dependent)
                shape = None
            if shape is not None:
                shapes.append((ty.dtype, shape))
                nbytes.append(math.prod(shape) * ty.dtype.itemsize)
                continue
        if not b.get("output"):
            unplaced[graph.ops[i].name] = unplaced.get(graph.ops[i].name, 0) + 1
        shapes.append(None)
        nbytes.append(None)
    order = sorted((j for j in range(len(buffers)) if buffers[j].get("placed_offset") is not None),
                   key=lambda j: (int(buffers[j]["placed_offset"]), j))
    offsets, arena = evaluate_placement(nbytes, [b.get("below", []) for b in buffers], order,
                                        int(plan["alignment"]))
    slots: list[list[Any]] = [[None] * len(op.results) for op in graph.ops]
    live = [0] * (len(graph.ops) + 2)
    for b, off, sh, size in zip(buffers, offsets, shapes, nbytes, strict=True):
        if off is None or sh is None or size is None:
            continue
        i, k = result_at[b["value"]]
        slots[i][k] = (off, *sh)
        first, last = b.get("issued") or (b["start"], b["end"])
        live[first] += size
        live[min(last, len(graph.ops)) + 1] -= size
    peak, acc = 0, 0
    for d in live:
        acc += d
        peak = max(peak, acc)
    placed = [n for n, o in zip(nbytes, offsets, strict=True) if n is not None and o is not None]
    return BufferPlan(dict(sizes), arena, slots, len(placed), sum(placed), peak, dict(sorted(unplaced.items())),
                      outputs, time.perf_counter() - t0)
