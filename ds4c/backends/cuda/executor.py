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
from ds4c.ir.registry import OpDef
from ds4c.ops.moe import moe_gather_formulation


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


class KernelExecutor(ReferenceExecutor):
    def __init__(self, graph: Graph, device: torch.device | str = "cuda",
                 on_op: Callable[[int, Op, list[Any]], None] | None = None, *, use_kernels: bool = True):
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

    def stats(self) -> dict[str, dict[str, int]]:
        """Per fused op name: how many calls ran a kernel and how many fell back to the reference."""
        out: dict[str, dict[str, int]] = {}
        for (name, how), n in self.counts.items():
            out.setdefault(name, {})[how] = n
        return out


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
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            snapshot = {k: v.clone() for k, v in self.state.items()}
            for _ in range(warmup):  # compiles/autotunes kernels, outside the capture
                self._step()
            for k, v in snapshot.items():
                self.state[k].copy_(v)
            del snapshot
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        out = self.executor.run({"input_ids": self.ids, "position": self.position}, self.params, self.state)
        logits = out.pop("logits")
        for k, v in out.items():
            self.state[k].copy_(v)
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


# Formats the GEMV (``linear.packed``) and MoE kernels read as stored.
KERNEL_FORMATS = frozenset({"fp8", "fp8-f32scale", "int8"})
_MOE_WEIGHT_ARGS = range(4, 9)  # gate_up, down, s_gate, s_up, s_down among moe's operands


def _reads_packed(use: Op, value: Any) -> bool:
    """Whether ``use`` can take ``value`` (a dequantised weight) packed: as the weight of a
    bias-free ``aten.linear`` or as one of ``moe``'s expert weights."""
    if use.name == "aten.linear.default":
        return len(use.args) >= 2 and use.args[1] is value and value not in use.args[:1] + use.args[2:] \
            and all(a is None for a in use.args[2:]) and not use.kwargs
    if use.name == "moe":
        return any(use.args[i] is value for i in _MOE_WEIGHT_ARGS) and value not in use.args[:4]
    return False


def unpack_weights_once(graphs: Mapping[str, Graph], weights: dict[str, torch.Tensor]
                        ) -> tuple[dict[str, Graph], dict[str, torch.Tensor], list[str]]:
    """Prepare packed weights (``quant.dequant`` of parameters) for the kernel backends, at load.

    Where every use of a dequantised weight is a kernel that reads its format as stored
    (``KERNEL_FORMATS`` as the weight of a bias-free linear, or an expert weight of ``moe``), the
    dequantisation is dropped and the uses become ``linear.packed`` / ``moe.packed`` over the
    packed tensors: the step reads FP8/INT8 bytes. Any other packed weight is expanded once here
    into a parameter (the reference ``quant.dequant`` would expand a whole expert tensor at
    every step). Returns the rewritten graphs, the weights (packed tensors no graph reads any
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
            ops.append(_read_packed(op, packed) if packed else op)
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


def _read_packed(op: Op, packed: Mapping[Any, tuple[str, list[int], tuple]]) -> Op:
    """``op`` rewritten to read the packed weights among its operands (unchanged if none)."""
    if op.name == "aten.linear.default" and len(op.args) >= 2 and op.args[1] in packed:
        fmt, shape, tensors = packed[op.args[1]]
        return op.replace(name="linear.packed", args=(op.args[0], *tensors), kwargs={"format": fmt, "shape": shape})
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
