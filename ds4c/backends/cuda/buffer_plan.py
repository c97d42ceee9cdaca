"""The kernel executor's static buffer plan: every activation it can place at an arena offset fixed
before the step runs, one arena allocation per binding of the symbolic sizes.

``plan_memory`` plans the stored graph at one binding (the largest prefill, ``plan_batch``). The
kernel backends run that graph (lowered at compile: packed weights, norm+rope, merged linears)
in the stream schedule's issue order, at the sizes each call brings (decode at B=32, a 300-token
prompt), so the executor plans what it runs with the same planner: ``analyze_liveness`` over its
op sequence at the bound sizes, then ``pack_arena``. What differs from the compile-time plan:

- Graph outputs are not placed: they outlive the step (logits, the new state).
- A value is placed only when its op can write into a given buffer: a Triton launcher (it takes
  its results from ``result_buffer``), or an ATen op with an ``out=`` overload (``out_variant``). Other results (and kernel scratch: split-K partials,
  flash-decoding partials) are allocated as before; the executor counts both.
- With several streams, bytes of a buffer are reused only by an op that every op touching the
  buffer (its writer and readers) happens before, through stream order and the executor's
  cross-stream events: the buffer's live range runs to the last issued op not ordered after all
  of them. So the plan needs no extra events, and is the liveness of one stream when there is one.

        ops in issue order:  0 main  %a = linear(%x)      buffers:  %a [0, 2]  (read by #2 on aux)
                             1 main  %b = rms_norm(%x)              %b [1, 3]
                             2 aux   %c = rope(%a)                  %c [2, 3]
                             3 main  %d = add(%b, %c)               (#3 waits for #2's event)
        with one stream %a could share bytes with %d; with #2 on aux, only ops after #3 on main
        (ordered after #2 through #3's wait) may reuse %a's bytes.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds4c.ir.graph import Graph, Op
from ds4c.ir.types import TensorType
from ds4c.passes.liveness import Buffer, Liveness, SizeEvaluator, analyze_liveness, is_view_op
from ds4c.passes.plan_memory import ALIGNMENT, pack_arena

PACK_EFFORT = 2000  # buffer placements per plan beyond the greedy orders (plans are made at run time)


@functools.cache
def out_variant(op_name: str) -> Any | None:
    """The ``out=`` overload of an ATen op (``aten.add.Tensor`` -> ``aten.add.out``): same
    arguments as the functional overload plus one written ``out`` tensor; None when the op has
    none, returns more than one tensor, or may return a view of an input."""
    parts = op_name.split(".")
    if len(parts) != 3 or parts[0] != "aten" or is_view_op(op_name):
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
    seconds: float = 0.0  # time to make the plan

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


def _happens_before(ops: Sequence[Op], streams: Sequence[str]) -> list[int]:
    """Per op (issue order), a bit set of the ops that complete before it starts: the earlier ops
    of its stream and, through the event of each cross-stream operand, its producer's ancestors."""
    producer = {r: i for i, op in enumerate(ops) for r in op.results}
    last_on: dict[str, int] = {}
    before: list[int] = []
    for i, op in enumerate(ops):
        bits = 0
        prev = last_on.get(streams[i])
        if prev is not None:
            bits |= before[prev] | (1 << prev)
        for v in op.operands:
            j = producer.get(v)
            if j is not None and streams[j] != streams[i]:
                bits |= before[j] | (1 << j)
        before.append(bits)
        last_on[streams[i]] = i
    return before


def _concurrent_end(touchers: int, start: int, before: list[int], by_stream: dict[str, list[int]]) -> int:
    """The last issued op that not every op in ``touchers`` (a bit set) happens before: along a
    stream the set of ops before an op only grows, so per stream a binary search finds it."""
    end = start
    for order in by_stream.values():
        lo, hi = bisect.bisect_right(order, start), len(order)
        while lo < hi:  # first op of this stream after ``start`` that all touchers precede
            mid = (lo + hi) // 2
            if before[order[mid]] & touchers == touchers:
                hi = mid
            else:
                lo = mid + 1
        if lo > 0:
            end = max(end, order[lo - 1])
    return end


@functools.cache
def _never_aliases(op_name: str) -> bool:
    """Whether torch's schema of this ATen op says no result is a view of an input."""
    from ds4c.ir.registry import get_op

    schema = getattr(get_op(op_name), "schema", None) if op_name.startswith("aten.") else None
    return schema is not None and all(r.alias_info is None for r in schema.returns)


def plan_buffers(graph: Graph, sizes: dict[str, int], placeable: Sequence[bool],
                 streams: Sequence[str] | None = None, alignment: int = ALIGNMENT) -> BufferPlan:
    """The buffer plan of ``graph`` (ops in issue order, ``streams[i]`` the stream of op ``i``)
    at ``sizes``: results of the ops marked ``placeable`` that are not (views of) graph outputs.

    An op that is not placeable and not a view op allocates its results, but may return one of
    its operands as is (``aten.contiguous``, ``aten.to`` with nothing to change: their schemas say
    so; a fused op's reference: unknown): such a result counts as a view of each operand's buffer
    (their bytes stay live while it is read), and a buffer that may reach a graph output that way
    is not placed."""
    t0 = time.perf_counter()
    evaluator = SizeEvaluator(sizes)
    live = analyze_liveness(graph, sizes)
    n = len(graph.ops)
    outputs = {v.name for v in graph.output_values()}
    result_at: dict[str, tuple[int, int]] = {r.name: (i, k) for i, op in enumerate(graph.ops)
                                            for k, r in enumerate(op.results)}
    group = {b.root: b for b in live.buffers}
    buffer_of = {v: b for b in live.buffers for v in b.values}  # value -> the buffer holding its bytes
    for i in range(n - 1, -1, -1):  # later ops first: a chain of such ops reaches back to the first
        op = graph.ops[i]
        if placeable[i] or is_view_op(op.name) or not op.results or _never_aliases(op.name):
            continue
        members: list[str] = []
        for r in op.results:
            members += group[r.name].values if r.name in group else [r.name]
        for v in op.operands:
            b = buffer_of.get(v.name)
            if b is not None:
                b.values += [m for m in members if m not in b.values]
    last: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for v in op.operands:
            last[v.name] = i
    for v in outputs:
        last[v] = n

    chosen: list[Buffer] = []
    shape_of: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    unplaced: dict[str, int] = {}
    n_outputs = 0
    for b in live.buffers:
        i, k = result_at[b.root]
        ty = graph.ops[i].results[k].type
        end = max([b.start] + [last.get(v, b.start) for v in b.values])
        if end >= n:  # (may be) a graph output: it outlives the step
            n_outputs += 1
            continue
        shape = None
        if placeable[i] and isinstance(ty, TensorType):
            try:
                shape = tuple(evaluator.dim(d) for d in ty.shape)
            except Exception:  # noqa: BLE001 - a size no bound symbol determines (data-dependent)
                shape = None
        if shape is None:
            unplaced[graph.ops[i].name] = unplaced.get(graph.ops[i].name, 0) + 1
            continue
        shape_of[b.root] = (ty.dtype, shape)
        chosen.append(Buffer(b.root, list(b.values), b.start, end, b.size, b.op))
    if streams is not None and len(set(streams)) > 1 and chosen:
        before = _happens_before(graph.ops, streams)
        by_stream: dict[str, list[int]] = {}
        for i, s in enumerate(streams):
            by_stream.setdefault(s, []).append(i)
        readers: dict[str, int] = {}
        for i, op in enumerate(graph.ops):
            for v in op.operands:
                readers[v.name] = readers.get(v.name, 0) | (1 << i)
        for b in chosen:
            touchers = 1 << b.op
            for v in b.values:
                touchers |= readers.get(v, 0)
            b.end = max(b.end, _concurrent_end(touchers, b.start, before, by_stream))
    offsets, arena = pack_arena(chosen, alignment, effort=PACK_EFFORT)
    slots: list[list[Any]] = [[None] * len(op.results) for op in graph.ops]
    for b, off in zip(chosen, offsets, strict=True):
        i, k = result_at[b.root]
        slots[i][k] = (off, *shape_of[b.root])
    peak = max(Liveness(graph.name, n + 1, dict(sizes), [], chosen).live_bytes(), default=0)
    return BufferPlan(dict(sizes), arena, slots, len(chosen), sum(b.size for b in chosen), peak,
                      dict(sorted(unplaced.items())), n_outputs, time.perf_counter() - t0)
