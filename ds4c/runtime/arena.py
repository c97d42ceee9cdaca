"""Run a graph with its activations in one arena laid out by the memory plan, and measure the peak.

``ArenaExecutor`` allocates one byte tensor of ``plan['arena_bytes']`` once, writes every planned
buffer at its offset, and lets view ops see their source's bytes. If two buffers that are live at
the same time overlapped, results would differ from the reference backend: running it is a check
of the plan, not only a use of it.

It also measures, independently of the planner, the activation bytes the runtime holds as ops
execute: every op result owns an allocation (its arena slot; or, for a view, the allocation its
bytes lie in, found by address; or a fresh storage when torch returned a copy); an allocation is
live while some value holding it has a use still to come (graph outputs: to the end). The
measured peak is the largest sum of live allocations' sizes, alignment excluded, which is what
``plan['peak_live_bytes']`` predicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ds4c.errors import InputError, IRError, RankFailure
from ds4c.ir.graph import Graph, Value, map_values
from ds4c.ir.interpreter import ReferenceExecutor
from ds4c.ir.registry import split_results


class ArenaExecutor(ReferenceExecutor):
    """Executes ``graph`` sequentially with activations placed per ``plan`` (a ``memory_plan`` entry)."""

    def __init__(self, graph: Graph, plan: Mapping[str, Any], device: torch.device | str = "cpu"):
        super().__init__(graph, device)
        import ds4c.ops.memory  # noqa: F401 - ds4c.prefetch may appear in planned graphs

        self.plan = plan
        self.arena = torch.empty(int(plan["arena_bytes"]), dtype=torch.uint8, device=self.device)
        self._slot = {b["value"]: (int(b["offset"]), int(b["size"])) for b in plan["buffers"]}
        # Our own liveness (not the planner's): release a value after its last read, or right after
        # its op when nothing reads it; graph outputs are kept to the end.
        n = len(graph.ops)
        last: dict[Value, int] = {}
        for i, op in enumerate(graph.ops):
            for r in op.results:
                last[r] = i
            for v in op.operands:
                last[v] = i
        for v in graph.output_values():
            last[v] = n
        self._release: list[list[Value]] = [[] for _ in range(n + 1)]
        for v, i in last.items():
            self._release[i].append(v)
        self._inputs = {gi.value for gi in graph.inputs}
        self.peak_bytes = 0
        self.live_bytes_trace: list[int] = []

    def run(self, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        env: dict[Value, Any] = {}
        state = state or {}
        for gi in self.graph.inputs:
            src = {"input": inputs, "param": params, "state": state}.get(gi.kind, self.constants)
            if gi.value.name not in src:
                raise InputError(f"graph @{self.graph.name}: {gi.kind} '{gi.value.name}' was not supplied")
            env[gi.value] = src[gi.value.name]
        self.bind_sizes({gi.value: env[gi.value] for gi in self.graph.inputs if gi.kind in ("input", "state")})

        arena_ptr = self.arena.untyped_storage().data_ptr()
        owner: dict[Value, tuple[str, int, int]] = {}  # value -> allocation (name, first byte address, size)
        holders: dict[str, int] = {}
        live = 0
        self.live_bytes_trace = []
        lookup = env.__getitem__

        def hold(v: Value, alloc: tuple[str, int, int]) -> None:
            nonlocal live
            owner[v] = alloc
            if holders.get(alloc[0], 0) == 0:
                live += alloc[2]
            holders[alloc[0]] = holders.get(alloc[0], 0) + 1

        def release(v: Value) -> None:
            nonlocal live
            alloc = owner.pop(v, None)
            if alloc is not None:
                holders[alloc[0]] -= 1
                if holders[alloc[0]] == 0:
                    live -= alloc[2]
            if v not in self._inputs:
                env.pop(v, None)

        for i, (op, opdef, args, kwargs) in enumerate(self._steps):
            try:
                out = opdef.reference(*map_values(args, lookup), **map_values(kwargs, lookup))
            except RankFailure:  # another rank's failure, as it is
                raise
            except Exception as e:
                raise IRError(f"graph @{self.graph.name}: op #{i} {op.name} failed: {e}") from e
            outs = split_results(out)
            if len(outs) != len(op.results):
                raise IRError(f"graph @{self.graph.name}: op #{i} {op.name} returned {len(outs)} values, "
                              f"IR declares {len(op.results)}")
            source = next((v for v in op.operands if isinstance(env.get(v), torch.Tensor)), None)
            for r, o in zip(op.results, outs, strict=True):
                if not isinstance(o, torch.Tensor):
                    env[r] = o
                    continue
                nbytes = o.numel() * o.element_size()
                if r.name in self._slot:
                    offset, size = self._slot[r.name]
                    if nbytes > size:
                        raise InputError(f"graph @{self.graph.name}: %{r.name} needs {nbytes} bytes, the plan made "
                                         f"for sizes {self.plan['sizes']} gives it {size}; recompile with a larger "
                                         "--max-context")
                    slot = self.arena[offset:offset + nbytes].view(o.dtype).view(o.shape)
                    slot.copy_(o)
                    env[r] = slot
                    hold(r, (r.name, arena_ptr + offset, nbytes))
                    continue
                env[r] = o
                storage = o.untyped_storage().data_ptr()
                src = env.get(source) if source is not None else None
                src_alloc = owner.get(source) if source is not None else None
                if isinstance(src, torch.Tensor) and storage == src.untyped_storage().data_ptr():
                    if src_alloc is None:
                        continue  # a view of a graph input (or of a view of one): not an activation
                    if storage == arena_ptr and not src_alloc[1] <= o.data_ptr() <= src_alloc[1] + src_alloc[2]:
                        raise IRError(f"graph @{self.graph.name}: op #{i} {op.name}: %{r.name} points into the arena "
                                      f"outside its source's buffer")
                    hold(r, src_alloc)  # a view shares its source's allocation
                else:
                    hold(r, (f"copy:{r.name}", storage, o.untyped_storage().nbytes()))  # torch made a copy
            self.live_bytes_trace.append(live)
            self.peak_bytes = max(self.peak_bytes, live)
            for v in self._release[i]:
                release(v)
        self.live_bytes_trace.append(live)

        def detach(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == arena_ptr:
                return v.clone()
            return v

        return {name: detach(env[v]) for name, v in self.graph.outputs}
