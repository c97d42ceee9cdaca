"""The GPU runtime's executor: the compiled schedule and memory plan, run; CUDA-graph capture.

``ScheduledExecutor`` is the backend's ``KernelExecutor`` (Triton kernels for fused ops, torch for
the rest) running what the artifact compiled for it:

- the ops in the issue order of the compiled stream schedule (``schedule_streams``; the
  artifact's ``plans/<entry>.schedule.json``), on a CUDA device each on its stream, waiting for
  and recording the compiled events (``issued``): nothing is re-derived here;
- activations at the offsets of the compiled memory plan in one arena per binding of the symbolic
  sizes (``ds4c.runtime.buffer_plan``: the plan evaluated at the call's sizes, nothing planned
  here): Triton launchers write their results there (``result_buffer``), ATen ops through their
  ``out=`` overloads; inside a CUDA graph the arena is the graph's, so every captured shape holds
  one planned allocation for its activations.

``GraphedDecode`` captures one decode step of a fixed batch size as a CUDA graph over static
input, state and output buffers; the step ends by copying the new state into the state buffers,
so the model state is updated in place and a replay needs no allocation and no host work beyond
the launch. ``GraphedPrefill`` does the same for one prefill shape.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ds4c.backends.triton.executor import KernelExecutor
from ds4c.backends.triton.kernels import planned_results
from ds4c.backends.triton.kernels.configs import KernelContext
from ds4c.errors import IRError
from ds4c.ir.graph import Graph, Op
from ds4c.ir.registry import OpDef, get_op, split_results
from ds4c.runtime.buffer_plan import BufferPlan, out_variant, place


class _Streams:
    """The CUDA streams and events of one executor: ``main`` is whatever stream is current when a
    run starts (the capture stream inside a CUDA graph); the others fork from it at the start of a
    run and join it at the end, so a run is one unit of work on ``main`` for its caller."""

    def __init__(self, names: set[str], n_events: int, device: torch.device):
        self.side = {n: torch.cuda.Stream(device) for n in sorted(names - {"main"})}
        self.events = [torch.cuda.Event() for _ in range(n_events)]
        self.current: dict[str, torch.cuda.Stream] = {}

    def begin(self, main: torch.cuda.Stream) -> None:
        self.current = {"main": main, **self.side}
        for s in self.side.values():
            s.wait_stream(main)

    def end(self) -> None:
        main = self.current["main"]
        for s in self.side.values():
            main.wait_stream(s)


class _Arena:
    """An executor's planned activation buffers: the compiled plan evaluated per binding of the
    symbolic sizes (a ``BufferPlan``; the last ``MAX_PLANS`` kept), laid over one arena. Eager runs
    share an arena that grows to the largest; a run being captured into a CUDA graph gets its own
    (the graph keeps its addresses), allocated inside the capture, i.e. from the graph's memory pool."""

    MAX_PLANS = 16

    def __init__(self, graph: Graph, placeable: list[bool], compiled: Mapping[str, Any], device: torch.device):
        self.graph, self.placeable, self.compiled, self.device = graph, placeable, compiled, device
        self.plans: dict[tuple, BufferPlan] = {}
        self.eager: torch.Tensor | None = None
        self._eager_views: dict[tuple, list] = {}
        # arenas of captured runs: held by the CUDA graph object that took them (``take_captured``),
        # seen here through weak references (evicting a graph frees its arena)
        self.pending: list[torch.Tensor] = []
        self.captured: list[weakref.ref] = []
        self.current: list[list[torch.Tensor | None] | None] | None = None
        self.expected: list[list[int | None]] = []  # the current plan's ``numels``
        self.counts: Counter = Counter()  # (op name, "placed" | "allocated")
        self.share_captured = False  # captures reuse a live captured arena that is large enough

    def plan(self, sizes: Mapping[str, int]) -> BufferPlan:
        key = _key(sizes)
        plan = self.plans.pop(key, None)
        if plan is None:
            plan = place(self.graph, self.compiled, dict(sizes), self.placeable)
        self.plans[key] = plan  # most recently used last
        while len(self.plans) > self.MAX_PLANS:
            old = next(iter(self.plans))
            del self.plans[old]
            self._eager_views.pop(old, None)
        return plan

    def capturing(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def begin(self, sizes: Mapping[str, int]) -> None:
        plan, key = self.plan(sizes), _key(sizes)
        if self.capturing():
            arena = None
            if self.share_captured:  # graphs replayed one at a time: the largest captured arena serves them all
                live = [a for a in (r() for r in self.captured) if a is not None and a.numel() >= plan.arena_bytes]
                arena = max(live, key=lambda a: a.numel()) if live else None
            if arena is None:
                arena = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device)
                self.captured.append(weakref.ref(arena))
            self.pending.append(arena)
            self.current = plan.views(arena)
        else:
            if self.eager is None or self.eager.numel() < plan.arena_bytes:
                if self.eager is not None and self.eager.is_cuda:
                    # it may have been allocated on another stream (a capture's warm-up): not
                    # reused before the work queued on this one is done
                    self.eager.record_stream(torch.cuda.current_stream(self.device))
                self.eager = None  # free the old arena before taking the larger one
                self.eager = torch.empty(plan.arena_bytes, dtype=torch.uint8, device=self.device)
                self._eager_views.clear()
            if key not in self._eager_views:
                self._eager_views[key] = plan.views(self.eager)
            self.current = self._eager_views[key]
        self.expected = plan.numels

    def take(self) -> list[torch.Tensor]:
        """The arenas of the runs captured since the last call (see ``KernelExecutor.take_captured``)."""
        taken, self.pending = self.pending, []
        self.captured = [r for r in self.captured if r() is not None]
        return taken

    def stats(self) -> dict[str, Any]:
        latest = next(reversed(self.plans.values()), None)
        per_op: dict[str, dict[str, int]] = {}
        for (name, how), n in self.counts.items():
            per_op.setdefault(name, {})[how] = n
        return {"plans": len(self.plans),
                "arena_bytes": 0 if self.eager is None else self.eager.numel(),
                "captured_arena_bytes": sum(a.numel() for a in (r() for r in self.captured) if a is not None),
                "latest": None if latest is None else {
                    "sizes": latest.sizes, "arena_bytes": latest.arena_bytes, "placed": latest.placed,
                    "placed_bytes": latest.placed_bytes, "peak_live_bytes": latest.peak_live_bytes,
                    "outputs": latest.outputs, "unplaced": latest.unplaced, "plan_seconds": latest.seconds},
                "results": per_op}


def _key(sizes: Mapping[str, int]) -> tuple:
    return tuple(sorted(sizes.items()))


class _Placed(OpDef):
    """An op that writes its results into their planned buffers, when this run's plan has any:
    an ATen op through its ``out=`` overload, a launcher through ``result_buffer``. Results that
    did not land in their buffer (a launcher declined, or allocated elsewhere) are counted; an
    ``out=`` call that raises marks the op unplaceable and runs it as before."""

    def __init__(self, inner: OpDef, arena: _Arena, index: int, out_op: Any | None):
        self.inner, self.arena, self.index, self.out_op = inner, arena, index, out_op
        self.name = inner.name

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        views = self.arena.current[self.index]
        if views is None:  # no slot for this op at this binding
            return self.inner.reference(*args, **kwargs)
        if self.out_op is not None:
            try:
                out = self.out_op(*args, **kwargs, out=views[0])
            except (RuntimeError, TypeError):
                self.out_op = None  # this op's out= overload does not take these operands: allocate
                self.arena.counts[(self.name, "out= failed")] += 1
                return self.inner.reference(*args, **kwargs)
        else:
            with planned_results(views):
                out = self.inner.reference(*args, **kwargs)
        outs = split_results(out)
        for k, (o, v) in enumerate(zip(outs, views, strict=False)):
            if v is None or not isinstance(o, torch.Tensor):
                continue
            if o.data_ptr() == v.data_ptr() and o.numel() == self.arena.expected[self.index][k]:
                self.arena.counts[(self.name, "placed")] += 1
            elif o.data_ptr() == v.data_ptr():
                raise IRError(f"op {self.name}: result {k} has {o.numel()} elements, its IR type at this binding "
                              f"{self.arena.expected[self.index][k]}; the buffer plan's slot was overrun - "
                              "report this (ds4c.load(..., buffer_plan=False) runs without the plan)")
            elif o.untyped_storage().data_ptr() == v.untyped_storage().data_ptr():
                # a fallback returned (a view of) another arena buffer, whose bytes the plan may
                # reuse before this result's last read: give it bytes of its own
                self.arena.counts[(self.name, "copied")] += 1
                if isinstance(out, torch.Tensor):
                    return o.clone()
                out = type(out)(x.clone() if i == k else x for i, x in enumerate(out))
            else:
                self.arena.counts[(self.name, "allocated")] += 1
        return out


class _OnStream(OpDef):
    """An op issued on its scheduled stream: waits for the events of its producers on other
    streams, records its own event when a consumer runs elsewhere, and marks its results as used
    by those streams (so the caching allocator does not hand their memory out too early)."""

    def __init__(self, inner: OpDef, streams: _Streams, stream: str, waits: list[int], record: list[int],
                 used_on: list[str]):
        self.inner, self.streams, self.stream = inner, streams, stream
        self.waits, self.record, self.used_on = waits, record, used_on
        self.name = inner.name

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        s = self.streams.current[self.stream]
        for e in self.waits:
            s.wait_event(self.streams.events[e])
        with torch.cuda.stream(s):
            out = self.inner.reference(*args, **kwargs)
        for e in self.record:
            self.streams.events[e].record(s)
        if self.used_on:
            for t in split_results(out):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    for name in self.used_on:
                        t.record_stream(self.streams.current[name])
        return out


def issued(graph: Graph, schedule: Mapping[str, Any]) -> tuple[Graph, list[str], list[dict[str, Any]]]:
    """``graph`` with its ops in the compiled schedule's issue order, each op's stream, and the
    schedule's events with op indices of that order. ``schedule`` is ``schedule_streams``' plan of
    this very graph (the artifact's ``plans/<entry>.schedule.json``): nothing is re-derived."""
    rows = schedule["ops"]
    if len(rows) != len(graph.ops):
        raise IRError(f"the stream schedule covers {len(rows)} ops, graph @{graph.name} has {len(graph.ops)}: "
                      "the artifact is inconsistent - recompile it")
    issue = [int(i) for i in schedule.get("issue") or sorted(range(len(rows)), key=lambda i: (float(rows[i][1]), i))]
    at = {u: k for k, u in enumerate(issue)}
    events = [{"id": int(e["id"]), "producer": at[int(e["producer"])], "wait_stream": str(e["wait_stream"]),
               "consumers": [at[int(c)] for c in e["consumers"]]} for e in schedule.get("events", [])]
    return graph.copy(ops=[graph.ops[u] for u in issue]), [str(rows[u][0]) for u in issue], events


class ScheduledExecutor(KernelExecutor):
    """``schedule``: the compiled ``schedule_streams`` plan of ``graph``; the ops then run in its
    issue order, on a CUDA device on its streams with its events (on one stream elsewhere, or with
    ``streams=False``). ``memory_plan``: the compiled ``plan_memory`` plan of ``graph`` (re-packed
    for that issue order too when there is a schedule); results are placed at its offsets (module doc)
    unless ``buffer_plan`` is False or there is none. ``context``: the launchers' kernel context
    (``KernelExecutor``).
    """

    def __init__(self, graph: Graph, device: torch.device | str = "cuda",
                 on_op: Callable[[int, Op, list[Any]], None] | None = None, *, context: KernelContext,
                 use_kernels: bool = True, schedule: Mapping[str, Any] | None = None,
                 memory_plan: Mapping[str, Any] | None = None, streams: bool = True, buffer_plan: bool = True):
        op_streams, events = None, []
        if schedule is not None:
            graph, op_streams, events = issued(graph, schedule)
        if memory_plan is not None and schedule is not None and "issue" not in memory_plan.get("orders", []):
            raise IRError(f"graph @{graph.name}: the memory plan holds for program order only, the executor runs "
                          "the stream schedule's issue order; the artifact is inconsistent - recompile it")
        super().__init__(graph, device, on_op, context=context, use_kernels=use_kernels)
        self._streams: _Streams | None = None
        multi = streams and op_streams is not None and self.device.type == "cuda" and len(set(op_streams)) > 1
        self._arena: _Arena | None = None
        if buffer_plan and memory_plan is not None:
            self._plan_buffers(memory_plan)
        if multi:
            self._use_streams(op_streams, events)

    def _plan_buffers(self, memory_plan: Mapping[str, Any]) -> None:
        """Wrap every op that can write into a planned buffer (a launcher, an ATen op with ``out=``)."""
        placeable, steps = [], []
        self._arena = _Arena(self.graph, placeable, memory_plan, self.device)
        for i, (op, opdef, args, kwargs) in enumerate(self._steps):
            launcher = self.runs_kernel(i)
            out_op = None if launcher else out_variant(op.name)
            ok = (launcher or out_op is not None) and get_op(op.name).pure and bool(op.results)
            placeable.append(ok)
            steps.append((op, _Placed(opdef, self._arena, i, out_op) if ok else opdef, args, kwargs))
        self._steps = steps

    def _begin(self, sizes: dict[str, int]) -> None:
        if self._arena is not None:
            self._arena.begin(sizes)

    def take_captured(self) -> list[torch.Tensor]:
        """The arenas of the runs captured since the last call, for the CUDA graph that replays
        them to keep (the executor itself keeps none)."""
        return [] if self._arena is None else self._arena.take()

    def share_captured_arenas(self) -> None:
        """From now on a captured run takes the largest arena an earlier capture took, when it is
        large enough, instead of its own: for graphs that are never replayed concurrently (an
        engine's step buckets, captured largest first)."""
        if self._arena is not None:
            self._arena.share_captured = True

    def drop_eager_arena(self) -> None:
        """Free the arena of runs outside a graph (e.g. the warm-up of graphs that replay every shape)."""
        if self._arena is not None:
            self._arena.eager = None
            self._arena._eager_views.clear()

    def buffer_plan(self, sizes: Mapping[str, int]) -> BufferPlan | None:
        """The compiled plan evaluated at ``sizes``, as this executor runs it (None when off)."""
        return None if self._arena is None else self._arena.plan(sizes)

    def buffer_stats(self) -> dict[str, Any] | None:
        """The buffer plan's state (None when off): plans made, arena bytes (eager, captured), the
        latest plan, and per op how many results were placed or allocated."""
        return None if self._arena is None else self._arena.stats()

    def _use_streams(self, op_streams: list[str], events: list[dict[str, Any]]) -> None:
        """Each op on its stream: it records the compiled events it produces, waits for those its
        stream needs, and marks its results as used by the streams that wait for them."""
        waits: list[list[int]] = [[] for _ in self._steps]
        records: list[list[int]] = [[] for _ in self._steps]
        used_on: list[set[str]] = [set() for _ in self._steps]
        for e in events:
            records[e["producer"]].append(e["id"])
            used_on[e["producer"]].add(e["wait_stream"])
            for c in e["consumers"]:
                waits[c].append(e["id"])
        self._streams = _Streams(set(op_streams), len(events), self.device)
        self._steps = [(op, _OnStream(opdef, self._streams, op_streams[i], sorted(set(waits[i])), records[i],
                                      sorted(used_on[i])), args, kwargs)
                       for i, (op, opdef, args, kwargs) in enumerate(self._steps)]
        self.stream_events = len(events)

    def run(self, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        if self._streams is None:
            return super().run(inputs, params, state)
        self._streams.begin(torch.cuda.current_stream(self.device))
        try:
            return super().run(inputs, params, state)
        finally:
            self._streams.end()


def capture_after_warmup(device: torch.device, warm: Callable[[], None], step: Callable[[], Any], *,
                         pool: Any = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``warm`` on a side stream (Triton compiles and autotunes, the caching allocator fills,
    outside the capture), then capture one ``step`` as a CUDA graph (in memory ``pool`` when given,
    shared with other graphs): (graph, step's result)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        warm()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


class GraphedDecode:
    """One decode step for batch ``batch`` as a replayable CUDA graph with in-place state."""

    def __init__(self, executor: ScheduledExecutor, params: Mapping[str, torch.Tensor],
                 state: Mapping[str, torch.Tensor], batch: int, warmup: int = 2):
        self.executor = executor
        device = executor.device
        self.ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.position = torch.zeros((), dtype=torch.int64, device=device)
        self.state = {k: v.clone() for k, v in state.items()}
        self.params = params

        def warm() -> None:  # steps advance the state: put it back after
            snapshot = {k: v.clone() for k, v in self.state.items()}
            for _ in range(warmup):
                self._step()
            for k, v in snapshot.items():
                self.state[k].copy_(v)
        self.graph, self.logits = capture_after_warmup(device, warm, self._step)
        self.arenas = executor.take_captured()  # the planned activations the graph addresses

    def _step(self) -> torch.Tensor:
        out = self.executor.run({"input_ids": self.ids, "position": self.position}, self.params, self.state)
        logits = out.pop("logits")
        # the new state into the state buffers: one multi-tensor copy (a kernel or two) rather
        # than a copy kernel per state tensor; outputs that are the buffers already are skipped
        pairs = [(self.state[k], v) for k, v in out.items() if v is not self.state[k]]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        return logits

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for k, v in state.items():
            if v is not self.state[k]:
                self.state[k].copy_(v)

    def __call__(self, ids: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        if isinstance(position, torch.Tensor):
            self.position.copy_(position)
        else:
            self.position.fill_(position)
        self.graph.replay()
        return self.logits


class GraphedPrefill:
    """One prefill shape as a replayable CUDA graph over a static ids buffer.

    A prefill of a few thousand tokens is a few hundred kernels; launched from Python each waits
    for the host (custom-op dispatch, launcher argument handling), which costs milliseconds. The
    graph replays them back to back. The outputs live in the graph's private memory pool and are
    overwritten by the next replay, so each call returns clones of them.
    """

    def __init__(self, executor: Any, params: Mapping[str, torch.Tensor], ids_shape: tuple[int, ...],
                 device: torch.device, warmup: int = 1):
        self.ids = torch.zeros(ids_shape, dtype=torch.int64, device=device)

        def step() -> dict[str, torch.Tensor]:
            return executor.run({"input_ids": self.ids}, params)

        def warm() -> None:
            for _ in range(warmup):
                step()
        self.graph, self.out = capture_after_warmup(device, warm, step)
        self.arenas = executor.take_captured()

    def __call__(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self.ids.copy_(ids)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()}


def decode_buffers(layout: Any, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed inputs of ``ragged_decode`` for ``rows`` sequences (``DECODE_STEP_INPUTS``): a row of
    zeros is a padding row, token 0 at position 0 over page 0 and slot 0, the pools' trash, so what
    it writes lands where no real row reads."""
    def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    return {"input_ids": zeros(rows), "positions": zeros(rows), "window_table": zeros(rows, layout.window_slots,
                                                                                      dtype=torch.int32),
            "comp_table": zeros(rows, layout.comp_entries, dtype=torch.int32), "slot": zeros(rows)}


def fill_buffers(buffers: dict[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> None:
    """The first rows of ``buffers`` from ``inputs`` (as many rows as they have), the rest zeros
    (padding rows of ``decode_buffers``)."""
    for name, buf in buffers.items():
        src = inputs[name]
        r = src.shape[0]
        buf[:r].copy_(src, non_blocking=True)
        if r < buf.shape[0]:
            buf[r:].zero_()


def _packed(buffers: dict[str, torch.Tensor], device: torch.device
            ) -> tuple[dict[str, torch.Tensor], dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, dict]]]:
    """``buffers`` re-laid as views of one device blob per dtype, with a pinned host blob of the same
    layout: (the new buffers, {dtype: (host blob, device blob, {name: host view})})."""
    out: dict[str, torch.Tensor] = {}
    blobs = {}
    for dtype in dict.fromkeys(b.dtype for b in buffers.values()):
        names = [k for k, b in buffers.items() if b.dtype == dtype]
        total = sum(buffers[k].numel() for k in names)
        dev = torch.empty(total, dtype=dtype, device=device)
        host = torch.empty(total, dtype=dtype, pin_memory=True)
        views, at = {}, 0
        for k in names:
            b = buffers[k]
            out[k] = dev[at:at + b.numel()].view(b.shape)
            out[k].copy_(b)
            views[k] = host[at:at + b.numel()].view(b.shape)
            at += b.numel()
        blobs[dtype] = (host, dev, views)
    return {k: out[k] for k in buffers}, blobs


OUTPUTS_BESIDE_STATE = ("logits", "hidden")  # a serving step's outputs that are not pools


class GraphedServingStep:
    """A serving entry point (``ragged_decode`` or ``ragged_step``) for one bucket of input sizes as a
    replayable CUDA graph over static input ``buffers``, its pools (``state``, the engine's own
    tensors) written in place: the graph addresses them, so nothing is copied per step. A call
    copies a step's inputs, padded to the bucket (``decode_buffers`` / ``step_batch.pad_step``),
    into the buffers, replays, and returns a copy of the first ``rows`` logits (the next replay of
    any bucket may reuse the memory). Warm-up and capture run the buffers as they are given:
    padding rows only, which touch nothing but the trash page and slot. Graphs captured with one
    ``pool`` and an executor sharing its captured arenas (``share_captured_arenas``) take the memory
    of the largest bucket once, not per bucket: they are replayed one at a time.

    Raises ``RuntimeError`` when the executor does not update every pool in place (a graph would
    then copy whole pools each step: the artifact needs ``lower_paged_state``)."""

    def __init__(self, executor: Any, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], *, pool: Any = None, warmup: int = 2):
        device = executor.device
        self.replays = 0
        self.buffers, self._blobs = _packed(buffers, device)
        self._copied: torch.cuda.Event | None = None

        def step() -> tuple[torch.Tensor, torch.Tensor | None]:
            out = executor.run(self.buffers, params, state)
            copied = [k for k, v in out.items() if k not in OUTPUTS_BESIDE_STATE
                      and (v.data_ptr() != state[k].data_ptr() or v.shape != state[k].shape)]
            if copied:
                raise RuntimeError(f"{getattr(executor, 'name', 'the serving step')} returns new tensors for "
                                   f"{len(copied)} pools (e.g. {copied[0]}) instead of writing them in place; "
                                   "recompile the artifact with this ds4c (lower_paged_state)")
            return out["logits"], out.get("hidden")

        def warm() -> None:
            for _ in range(warmup):
                step()
        # hidden: the final streams of every row (artifacts with an MTP block), read after a replay
        self.graph, (self.logits, self.hidden) = capture_after_warmup(device, warm, step, pool=pool)
        self.arenas = executor.take_captured() if hasattr(executor, "take_captured") else []

    def release(self) -> None:
        """Drop the graph, its arenas and buffers (the engine that captured it is closing)."""
        self.graph = self.logits = self.hidden = None
        self.arenas, self.buffers, self._blobs = [], {}, {}

    def __call__(self, inputs: Mapping[str, torch.Tensor], rows: int,
                 device_inputs: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Inputs on the host go through one pinned staging blob per dtype and one copy each; inputs
        already on the device are copied buffer by buffer. ``device_inputs``: tensors on the device
        that overwrite the first rows of those buffers after the staging copy (the previous step's
        tokens, which the host has not read: nothing here waits for them)."""
        if all(t.device.type == "cpu" for t in inputs.values()):
            if self._copied is not None:
                self._copied.synchronize()  # the staging blobs' last copy has left
            for _host, _dev, views in self._blobs.values():
                fill_buffers(views, inputs)
            for host, dev, _ in self._blobs.values():
                dev.copy_(host, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            fill_buffers(self.buffers, inputs)
        for name, t in (device_inputs or {}).items():
            self.buffers[name][:t.shape[0]].copy_(t, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self.logits[:rows].clone()
