"""The IR: SSA values, immutable ops, and graphs (one per entry point).

An op is ``Op(name, args, kwargs, results)``: ``args``/``kwargs`` hold literals (int, float, bool,
None, str, torch.dtype, torch.device, torch.layout, torch.memory_format, lists) and ``Value``s, in the
calling convention of the op's reference implementation. Its operands are the values found in
them, in order. Graph inputs have a kind:

- ``input``: supplied by the caller (token ids, position);
- ``param``: a model weight, supplied by the runtime's weight store under the value's name;
- ``state``: model state the runtime owns (ring buffers, compressed KV, compressor tails);
- ``const``: a small tensor stored with the program (RoPE tables, folded constants).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ds4c.errors import IRError
from ds4c.ir.types import IRType, TensorType

INPUT_KINDS = ("input", "param", "state", "const")


@dataclass(frozen=True, eq=False)
class Value:
    """An SSA value. Identity matters: two values with the same name are the same only in one graph."""

    name: str
    type: IRType

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


def iter_values(obj: Any) -> Iterator[Value]:
    """Yield the Values inside a nested args structure, in order."""
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from iter_values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_values(o)


def map_values(obj: Any, fn: Callable[[Value], Any]) -> Any:
    """Rebuild a nested args structure with every Value replaced by ``fn(value)``."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, list):
        return [map_values(o, fn) for o in obj]
    if isinstance(obj, tuple):
        return tuple(map_values(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_values(o, fn) for k, o in obj.items()}
    return obj


@dataclass(frozen=True, eq=False)
class Op:
    name: str
    args: tuple
    kwargs: dict[str, Any]
    results: tuple[Value, ...]
    loc: str | None = None  # the source module path, e.g. "model.layers.3.self_attn"

    @property
    def operands(self) -> tuple[Value, ...]:
        return tuple(itertools.chain(iter_values(self.args), iter_values(self.kwargs)))

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise IRError(f"op {self.name} has {len(self.results)} results, not one")
        return self.results[0]

    def replace(self, **changes: Any) -> Op:
        fields = {"name": self.name, "args": self.args, "kwargs": self.kwargs, "results": self.results,
                  "loc": self.loc}
        fields.update(changes)
        return Op(**fields)

    def map_operands(self, fn: Callable[[Value], Value]) -> Op:
        return self.replace(args=map_values(self.args, fn), kwargs=map_values(self.kwargs, fn))


@dataclass(frozen=True, eq=False)
class GraphInput:
    kind: str
    value: Value


@dataclass(eq=False)
class Graph:
    """One entry point (``prefill``, ``decode``): ordered ops over SSA values."""

    name: str
    inputs: list[GraphInput]
    ops: list[Op]
    outputs: list[tuple[str, Value]]
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------------
    def inputs_of_kind(self, kind: str) -> list[Value]:
        return [i.value for i in self.inputs if i.kind == kind]

    def input_kind(self, value: Value) -> str | None:
        for i in self.inputs:
            if i.value is value:
                return i.kind
        return None

    def producers(self) -> dict[Value, Op]:
        return {r: op for op in self.ops for r in op.results}

    def users(self) -> dict[Value, list[Op]]:
        out: dict[Value, list[Op]] = {}
        for op in self.ops:
            for v in op.operands:
                out.setdefault(v, []).append(op)
        return out

    def all_values(self) -> Iterable[Value]:
        for i in self.inputs:
            yield i.value
        for op in self.ops:
            yield from op.results

    def value_names(self) -> set[str]:
        return {v.name for v in self.all_values()}

    def fresh_name(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.value_names() if taken is None else taken
        if base not in taken:
            return base
        for i in itertools.count(1):
            cand = f"{base}_{i}"
            if cand not in taken:
                return cand
        raise AssertionError  # unreachable

    def output_values(self) -> list[Value]:
        return [v for _, v in self.outputs]

    def copy(self, *, ops: list[Op] | None = None, inputs: list[GraphInput] | None = None,
             outputs: list[tuple[str, Value]] | None = None,
             constants: dict[str, torch.Tensor] | None = None) -> Graph:
        return Graph(
            name=self.name,
            inputs=list(self.inputs if inputs is None else inputs),
            ops=list(self.ops if ops is None else ops),
            outputs=list(self.outputs if outputs is None else outputs),
            constants=dict(self.constants if constants is None else constants),
        )

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        return counts

    def tensor_type(self, value: Value) -> TensorType:
        if not isinstance(value.type, TensorType):
            raise IRError(f"%{value.name} is {value.type}, not a tensor")
        return value.type

    def __str__(self) -> str:
        from ds4c.ir.printer import print_graph

        return print_graph(self)


def replace_uses(graph: Graph, mapping: dict[Value, Value]) -> Graph:
    """Return a graph where every use of a key of ``mapping`` is replaced by its value."""
    if not mapping:
        return graph

    def resolve(v: Value) -> Value:
        while v in mapping:
            v = mapping[v]
        return v

    ops = [op.map_operands(resolve) if any(o in mapping for o in op.operands) else op for op in graph.ops]
    outputs = [(n, resolve(v)) for n, v in graph.outputs]
    return graph.copy(ops=ops, outputs=outputs)


@dataclass(eq=False)
class Program:
    """All entry points of one model plus compile-time facts shared by them."""

    graphs: dict[str, Graph]
    attrs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.graphs.values())
