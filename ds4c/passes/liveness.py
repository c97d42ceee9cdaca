"""Liveness of a graph's activation tensors: when each buffer is written first and read last.

Steps are op indices ``0 .. n-1`` plus a virtual step ``n``, the graph's ``return``. A value made
by op ``i`` and read last by op ``j`` is live over the closed interval ``[i, j]``: at step ``j``
the reader's inputs and outputs coexist, so an op never writes over its own inputs. Graph outputs
live to step ``n``; a result nobody reads lives over ``[i, i]``.

Graph inputs (``input``, ``param``, ``state``, ``const``) are not activation buffers: the runtime
owns them. Ops that return a view of an input (the registry's ``view`` trait: view, reshape,
expand, slice, select, permute, transpose, unsqueeze, split, ...) get no buffer of their own: they
share the buffer of their source and extend its live range; a view of a graph input is no buffer
at all. So do ATen ops that return their input itself when there is nothing to do (the
``copy_if_needed`` trait: ``contiguous``, ``to``) where the IR shows there is nothing to do
(``returns_operand``): a ``to`` that keeps the dtype; a ``contiguous`` of a value a non-view op
made. A conversion, or a ``contiguous`` of a view, makes a fresh tensor and gets its own buffer.

Byte sizes of symbolic dims are evaluated at one binding of the symbols (``plan_binding``):
``ctx.options['plan_sizes']`` when given (``{'B': 1, 'S': 4096}``); otherwise ``B`` =
``ctx.options['plan_batch']`` (default 1) and ``S`` = the compile's ``max_context``
(``ctx.options['max_context']``, else ``Program.attrs['max_context']``, else 4096): the largest
prefill the program accepts. Any other free symbol is bound to that ``S`` too (an upper bound for
sequence-derived sizes) and listed in ``Liveness.assumed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ds4c.ir.graph import Graph, Op, Value
from ds4c.ir.registry import has_trait
from ds4c.ir.shapes import dim_expr, eval_dim
from ds4c.ir.types import IRType, ListType, TensorType

DEFAULT_MAX_CONTEXT = 4096

def is_view_op(name: str) -> bool:
    """Whether op ``name``'s results are views of its first tensor operand (its ``view`` trait)."""
    return has_trait(name, "view")


def returns_operand(op: Op, source: Value | None, source_is_view: bool) -> bool:
    """Whether ``op``'s results share the bytes of ``source`` (its first tensor operand): a view
    op's always; a ``copy_if_needed`` op's (``contiguous``, ``to``) where it has nothing to do: the
    dtype is kept and, for the layout ops, ``source`` was made by a non-view op (contiguous: the IR
    has no strides, so a view's result is taken to need the copy). Otherwise the op makes a fresh
    tensor, which is a buffer of its own."""
    if has_trait(op.name, "view"):
        return True
    if source is None or not has_trait(op.name, "copy_if_needed"):
        return False
    src, res = source.type, op.results[0].type if op.results else None
    if not isinstance(src, TensorType) or not isinstance(res, TensorType) or src.dtype != res.dtype:
        return False
    return not (source_is_view and op.name.startswith("aten.contiguous"))


def plan_binding(graph: Graph, options: dict[str, Any] | None = None,
                 program_attrs: dict[str, Any] | None = None) -> tuple[dict[str, int], list[str]]:
    """Symbol values the plan is made for, and the symbols that were bound by assumption (see module doc)."""
    options = options or {}
    program_attrs = program_attrs or {}
    max_context = int(options.get("max_context") or program_attrs.get("max_context") or DEFAULT_MAX_CONTEXT)
    sizes: dict[str, int] = {"B": int(options.get("plan_batch", 1)), "S": max_context}
    sizes.update({k: int(v) for k, v in (options.get("plan_sizes") or {}).items()})
    assumed: list[str] = []
    for v in graph.all_values():
        for t in _tensor_types(v.type):
            for d in t.shape:
                if isinstance(d, str):
                    for s in dim_expr(d).free_symbols:
                        if s.name not in sizes:
                            sizes[s.name] = sizes["S"]
                            assumed.append(s.name)
    return sizes, assumed


def _tensor_types(ty: IRType) -> tuple[TensorType, ...]:
    if isinstance(ty, TensorType):
        return (ty,)
    if isinstance(ty, ListType):
        return ty.elements
    return ()


class SizeEvaluator:
    """Bytes of IR types at one binding; caches each symbolic dim."""

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self._dims: dict[str, int] = {}

    def dim(self, d: int | str) -> int:
        if isinstance(d, int):
            return d
        if d not in self._dims:
            self._dims[d] = max(0, eval_dim(d, self.sizes))
        return self._dims[d]

    def nbytes(self, ty: IRType) -> int | None:
        """Bytes of a tensor (or list of tensors); None for host scalars."""
        types = _tensor_types(ty)
        if not types:
            return None
        total = 0
        for t in types:
            n = 1
            for d in t.shape:
                n *= self.dim(d)
            total += n * t.dtype.itemsize
        return total


@dataclass
class Buffer:
    """One activation buffer: the value that writes it (``root``) and the views that share it."""

    root: str
    values: list[str]  # root first, then its views
    start: int  # step of the root's op
    end: int  # last step any of ``values`` is read (n for graph outputs)
    size: int  # bytes of the root, unaligned
    op: int  # index of the op that writes it


@dataclass
class Liveness:
    graph: str
    num_steps: int  # len(ops) + 1: the last step is the graph's return
    sizes: dict[str, int]
    assumed: list[str]
    buffers: list[Buffer]
    alias_of: dict[str, str | None] = field(default_factory=dict)  # view -> its buffer's root (None: an input)

    def live_bytes(self) -> list[int]:
        """Bytes of live buffers at every step (alignment excluded)."""
        delta = [0] * (self.num_steps + 1)
        for b in self.buffers:
            delta[b.start] += b.size
            delta[b.end + 1] -= b.size
        out, acc = [], 0
        for t in range(self.num_steps):
            acc += delta[t]
            out.append(acc)
        return out


def analyze_liveness(graph: Graph, sizes: dict[str, int], assumed: list[str] | None = None) -> Liveness:
    """Buffers of ``graph`` with their live intervals and byte sizes at ``sizes``."""
    evaluator = SizeEvaluator(sizes)
    n = len(graph.ops)
    inputs = {gi.value for gi in graph.inputs}
    root_of: dict[Value, Value | None] = {}  # every tensor op result -> the value owning its bytes (None: an input)
    buffers: dict[Value, Buffer] = {}
    made_by_view: set[Value] = set()
    for i, op in enumerate(graph.ops):
        source = next((v for v in op.operands if isinstance(v.type, TensorType | ListType)), None)
        view = returns_operand(op, source, source in made_by_view)
        if view and has_trait(op.name, "view"):
            made_by_view.update(op.results)
        for r in op.results:
            if evaluator.nbytes(r.type) is None:
                continue
            if view and source is not None:
                root = None if source in inputs else root_of.get(source, source)
                root_of[r] = root
                if root is not None:
                    buffers[root].values.append(r.name)
            else:
                root_of[r] = r
                buffers[r] = Buffer(r.name, [r.name], i, i, evaluator.nbytes(r.type) or 0, i)

    def extend(v: Value, step: int) -> None:
        root = root_of.get(v)
        if root is not None:
            b = buffers[root]
            b.end = max(b.end, step)

    for i, op in enumerate(graph.ops):
        for v in op.operands:
            extend(v, i)
    for v in graph.output_values():
        extend(v, n)
    alias_of = {r.name: (root.name if root is not None else None) for r, root in root_of.items() if root is not r}
    return Liveness(graph.name, n + 1, dict(sizes), list(assumed or []), list(buffers.values()), alias_of)
