"""GPU executor: runs a graph with Triton kernels for fused ops, torch (cuBLAS) for the rest.

``KernelExecutor`` is the reference executor with a different op table: every op that has a
registered launcher (``ds4c.backends.cuda.kernels``) runs it; a launcher that declines an instance
(``NotImplemented``) falls back to the op's reference, and the executor counts both so
``stats()`` says what ran where. It works on any device Triton reaches (CUDA, ROCm builds of
PyTorch, or CPU under ``TRITON_INTERPRET=1``).

``GraphedDecode`` captures one decode step of a fixed batch size as a CUDA graph over static
input, state and output buffers; the step ends by copying the new state into the state buffers,
so the model state is updated in place and a replay needs no allocation and no host work beyond
the launch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ds4c.backends.cuda.kernels import get_kernel
from ds4c.backends.reference import ReferenceExecutor
from ds4c.ir.graph import Graph, Op
from ds4c.ir.registry import OpDef, get_op, split_results
from ds4c.ops.moe import moe_gather_formulation
from ds4c.quant.activations import ACTIVATION_BLOCKS, WEIGHT_FORMATS


class _KernelOp(OpDef):
    """An op run by its Triton launcher, falling back to the reference when the launcher declines."""

    def __init__(self, inner: OpDef, launcher: Callable[..., Any], counts: Counter):
        self.inner = inner
        self.launcher = launcher
        self.counts = counts
        self.name = inner.name

    def reference(self, *args: Any, **kwargs: Any) -> Any:
        out = self.launcher(*args, **kwargs)
        if out is NotImplemented:
            self.counts[(self.name, "reference")] += 1
            return self.inner.reference(*args, **kwargs)
        self.counts[(self.name, "kernel")] += 1
        return out


def _moe_without_host_sync(*args: Any, **kwargs: Any) -> Any:
    """``moe`` with no kernel: the reference groups tokens by expert on the host (a sync, so no
    CUDA graph); for a few tokens gather the picked experts' weights instead (static shapes)."""
    x, gate_up = args[0], args[4]
    pairs = x.numel() // x.shape[-1] * kwargs["top_k"]
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if pairs > gate_up.shape[0] and not capturing:
        return NotImplemented
    return moe_gather_formulation(*args, **kwargs)


# Torch formulations used when no Triton launcher is registered for the op.
TORCH_FALLBACKS: dict[str, Callable[..., Any]] = {"moe": _moe_without_host_sync}


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


class _OnStream(OpDef):
    """An op issued on its scheduled stream: waits for the events of its producers on other
    streams, records its own event when a consumer runs elsewhere, and marks its results as used
    by those streams (so the caching allocator does not hand their memory out too early)."""

    def __init__(self, inner: OpDef, streams: _Streams, stream: str, waits: list[int], record: int | None,
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
        if self.record is not None:
            self.streams.events[self.record].record(s)
        if self.used_on:
            for t in split_results(out):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    for name in self.used_on:
                        t.record_stream(self.streams.current[name])
        return out


def stream_assignment(stored: Graph, schedule: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """Per op of ``stored`` (the graph ``schedule`` was made for), keyed by its first result's
    name: (stream, scheduled start). Keys survive the load-time rewrites, which keep result names."""
    return {op.results[0].name: (str(row[0]), float(row[1]))
            for op, row in zip(stored.ops, schedule["ops"], strict=True) if op.results}


def order_for_streams(graph: Graph, assignment: Mapping[str, tuple[str, float]]) -> tuple[Graph, list[str]]:
    """``graph`` with its ops in scheduled issue order and each op's stream. An op's issue time is
    its scheduled start, raised to its producers' issue times: ops the schedule does not know
    (load-time rewrites add some, e.g. a merged GEMM) then issue right after what they read, and
    sorting by (time, graph order) stays a topological order whatever the rewrites moved. Ops
    the schedule does not know, and impure ops, run on ``main``."""
    keyed = []
    issue: dict[Any, float] = {}
    for i, op in enumerate(graph.ops):
        after = max((issue[v] for v in op.operands if v in issue), default=0.0)
        stream, start = assignment.get(op.results[0].name, ("main", after)) if op.results else ("main", after)
        if not get_op(op.name).pure:
            stream = "main"
        start = max(start, after)
        for r in op.results:
            issue[r] = start
        keyed.append((start, i, op, stream))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return graph.copy(ops=[k[2] for k in keyed]), [k[3] for k in keyed]


class KernelExecutor(ReferenceExecutor):
    """``streams``: per op, keyed by result name, the (stream, start) of a ``schedule_streams``
    schedule (``stream_assignment``); on a CUDA device the ops then run in scheduled order on
    their streams with an event per cross-stream edge, elsewhere in that order on one stream."""

    def __init__(self, graph: Graph, device: torch.device | str = "cuda",
                 on_op: Callable[[int, Op, list[Any]], None] | None = None, *, use_kernels: bool = True,
                 streams: Mapping[str, tuple[str, float]] | None = None):
        op_streams = None
        if streams is not None:
            graph, op_streams = order_for_streams(graph, streams)
        super().__init__(graph, device, on_op)
        self.counts: Counter = Counter()
        if use_kernels:
            steps = []
            for op, opdef, args, kwargs in self._steps:
                launcher = get_kernel(op.name) or TORCH_FALLBACKS.get(op.name)
                if launcher is not None:
                    opdef = _KernelOp(opdef, launcher, self.counts)
                steps.append((op, opdef, args, kwargs))
            self._steps = steps
        self._streams: _Streams | None = None
        if op_streams is not None and self.device.type == "cuda" and len(set(op_streams)) > 1:
            self._use_streams(op_streams)

    def _use_streams(self, op_streams: list[str]) -> None:
        producer = {r: i for i, (op, *_) in enumerate(self._steps) for r in op.results}
        event_of: dict[int, int] = {}
        waits: list[set[int]] = [set() for _ in self._steps]
        used_on: list[set[str]] = [set() for _ in self._steps]
        for i, (op, *_) in enumerate(self._steps):
            for v in op.operands:
                j = producer.get(v)
                if j is not None and op_streams[j] != op_streams[i]:
                    waits[i].add(event_of.setdefault(j, len(event_of)))
                    used_on[j].add(op_streams[i])
        self._streams = _Streams(set(op_streams), len(event_of), self.device)
        self._steps = [(op, _OnStream(opdef, self._streams, op_streams[i], sorted(waits[i]), event_of.get(i),
                                      sorted(used_on[i])), args, kwargs)
                       for i, (op, opdef, args, kwargs) in enumerate(self._steps)]
        self.stream_events = len(event_of)

    def run(self, inputs: Mapping[str, Any], params: Mapping[str, torch.Tensor],
            state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        if self._streams is None:
            return super().run(inputs, params, state)
        self._streams.begin(torch.cuda.current_stream(self.device))
        try:
            return super().run(inputs, params, state)
        finally:
            self._streams.end()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per fused op name: how many calls ran a kernel and how many fell back to the reference."""
        out: dict[str, dict[str, int]] = {}
        for (name, how), n in self.counts.items():
            out.setdefault(name, {})[how] = n
        return out


def capture_after_warmup(device: torch.device, warm: Callable[[], None], step: Callable[[], Any]
                         ) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``warm`` on a side stream (Triton compiles and autotunes, the caching allocator fills,
    outside the capture), then capture one ``step`` as a CUDA graph: (graph, step's result)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        warm()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


class GraphedDecode:
    """One decode step for batch ``batch`` as a replayable CUDA graph with in-place state."""

    def __init__(self, executor: KernelExecutor, params: Mapping[str, torch.Tensor],
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

    def __call__(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self.ids.copy_(ids)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()}


# Formats the GEMV (``linear.packed``) and MoE kernels read as stored.
KERNEL_FORMATS = frozenset({"fp8", "fp8-f32scale", "int8", "mxfp4"})
_MOE_WEIGHT_ARGS = range(4, 9)  # gate_up, down, s_gate, s_up, s_down among moe's operands


def _reads_packed(use: Op, value: Any) -> bool:
    """Whether ``use`` can take ``value`` (a dequantised weight) packed: as the weight of a
    bias-free ``aten.linear``, the weight of ``linear.grouped`` or one of ``moe``'s expert weights."""
    if use.name == "aten.linear.default":
        return len(use.args) >= 2 and use.args[1] is value and value not in use.args[:1] + use.args[2:] \
            and all(a is None for a in use.args[2:]) and not use.kwargs
    if use.name == "linear.grouped":
        return len(use.args) == 2 and use.args[1] is value and use.args[0] is not value
    if use.name == "moe":
        return any(use.args[i] is value for i in _MOE_WEIGHT_ARGS) and value not in use.args[:4]
    return False


def unpack_weights_once(graphs: Mapping[str, Graph], weights: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, Graph], dict[str, torch.Tensor], list[str]]:
    """Prepare packed weights (``quant.dequant`` of parameters) for the kernel backends, at load.

    Where every use of a dequantised weight is a kernel that reads its format as stored
    (``KERNEL_FORMATS`` as the weight of a bias-free linear or of ``linear.grouped``, or an expert
    weight of ``moe``), the dequantisation is dropped and the uses become ``linear.packed`` /
    ``linear.grouped.packed`` / ``moe.packed`` over the packed tensors: the step reads FP8/INT8
    bytes; a ``quant.activation`` feeding such an FP8 (MXFP4) linear is folded into it (``act=``:
    the kernel quantises its input itself) and dropped once nothing else reads it. Any other
    packed weight is expanded once here into a parameter (the reference ``quant.dequant`` would
    expand a whole expert tensor at every step). Returns the rewritten graphs, the weights (packed tensors no graph reads any
    more dropped) and the names of the expanded weights.
    """
    from ds4c.ir.graph import GraphInput
    from ds4c.ir.registry import get_op

    dequant = get_op("quant.dequant")
    expanded: dict[str, torch.Tensor] = {}
    out: dict[str, Graph] = {}
    for name, g in graphs.items():
        params = set(g.inputs_of_kind("param"))
        users, outputs = g.users(), set(g.output_values())
        packed: dict[Any, tuple[str, list[int], tuple]] = {}  # dequantised value -> (format, shape, packed operands)
        quantized = {op.result: op for op in g.ops if op.name == "quant.activation"
                     and op.kwargs["block"] == ACTIVATION_BLOCKS.get(op.kwargs["format"])}
        ops, new_inputs = [], []
        for op in g.ops:
            if op.name == "quant.dequant" and all(v in params for v in op.operands):
                r = op.result
                if op.kwargs["format"] in KERNEL_FORMATS and r not in outputs and users.get(r) and all(_reads_packed(u, r) for u in users[r]):
                    packed[r] = (op.kwargs["format"], list(op.kwargs["shape"]), tuple(op.args))
                    continue
                if r.name not in expanded:
                    expanded[r.name] = dequant.reference(*(weights[v.name] for v in op.args), **op.kwargs)
                new_inputs.append(GraphInput("param", r))
                continue
            ops.append(_read_packed(op, packed, quantized) if packed else op)
        if packed and quantized:  # quant.activation folded into every linear.packed that read it
            read = {v for op in ops for v in op.operands} | outputs
            ops = [op for op in ops if op.name != "quant.activation" or op.result in read]
        out[name] = g.copy(ops=ops, inputs=[*g.inputs, *new_inputs]) if (new_inputs or packed) else g
    if out == dict(graphs):
        return dict(graphs), weights, []
    read = {v.name for g in out.values() for op in g.ops for v in op.operands}
    kept = {k: v for k, v in weights.items() if k in read or k in expanded}
    kept.update(expanded)
    final = {}
    for name, g in out.items():  # drop graph inputs for packed tensors nothing reads now
        final[name] = g.copy(inputs=[gi for gi in g.inputs if gi.kind != "param" or gi.value.name in kept])
    return final, kept, sorted(expanded)


def _read_packed(op: Op, packed: Mapping[Any, tuple[str, list[int], tuple]], quantized: Mapping[Any, Op]) -> Op:
    """``op`` rewritten to read the packed weights among its operands (unchanged if none). A
    linear whose input is a ``quant.activation`` (in ``quantized``, by result) of an FP8 weight
    reads the unquantised input and quantises it itself (``act=``)."""
    if op.name == "aten.linear.default" and len(op.args) >= 2 and op.args[1] in packed:
        fmt, shape, tensors = packed[op.args[1]]
        x, kwargs = op.args[0], {"format": fmt, "shape": shape}
        if x in quantized and fmt in WEIGHT_FORMATS.get(quantized[x].kwargs["format"], ()):
            x, kwargs["act"] = quantized[x].args[0], quantized[x].kwargs["format"]
        return op.replace(name="linear.packed", args=(x, *tensors), kwargs=kwargs)
    if op.name == "linear.grouped" and op.args[1] in packed:
        fmt, shape, tensors = packed[op.args[1]]
        return op.replace(name="linear.grouped.packed", args=(op.args[0], *tensors),
                          kwargs={"format": fmt, "shape": shape, "groups": op.kwargs["groups"]})
    if op.name == "moe" and any(op.args[i] in packed for i in _MOE_WEIGHT_ARGS):
        formats, shapes, tensors = [], [], []
        for w in op.args[4:9]:
            fmt, shape, ts = packed.get(w, ("none", None, (w,)))
            formats.append(fmt)
            shapes.append(shape if shape is not None else list(w.type.shape))
            tensors.extend(ts)
        return op.replace(name="moe.packed", args=(*op.args[:4], *tensors),
                          kwargs={**op.kwargs, "formats": formats, "shapes": shapes})
    return op
