"""Record the Triton launches a program makes, for any Triton target, without a GPU.

Ahead-of-time compilation must produce exactly the binaries Triton's JIT will look for when the
program runs: the same kernel, signature (argument types), constexprs, specialisation attributes
(16-byte alignment of pointers, integers equal to 1 or divisible by 16) and options. Rather than
re-deriving those rules, we let Triton's own JIT compute them: each entry point runs once through
the ``KernelExecutor`` on the ``meta`` device (shapes and strides, no data, no memory), with

- a stand-in driver whose current target is the AOT target (``GPUTarget("cuda", 90, 32)``,
  ``GPUTarget("hip", "gfx942", 64)``, ...), so the JIT builds its binder and parses options as on
  that device;
- ``triton.knobs.runtime.jit_cache_hook``, which Triton calls with the serialised specialisation
  (``specialization_data``, the format ``JITFunction.preload`` reads) just before it would compile;
  the hook records it and tells the JIT to skip compiling and launching.

The executor's kernel context is the target's record with the artifact's ``pdl`` option
(``configs.KernelContext``), so tiles and options are the ones ``ds4c.load`` launches. Meta
tensors report a data pointer of 0 plus their storage offset, so alignment attributes match what
the caching allocator gives on a device. This needs kernels decorated as ``JITFunction`` (not under
``TRITON_INTERPRET=1``), which is why ``ds4c.backends.triton.aot`` records in a worker process.

``triton_source`` turns a recorded specialisation back into ``triton.compile``'s inputs; the
compiler and the runtime's cache-key check (``ds4c.runtime.binaries``) share it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ds4c.ir.graph import Graph
from ds4c.ir.shapes import eval_dim
from ds4c.targets import Target

DECODE_BATCH = 1
# Prompt lengths whose prefill launches are compiled ahead of time: one a multiple of 16 and one
# not (Triton specialises integer arguments on divisibility by 16), both past the MoE kernels'
# switch from decode to prefill tiles for small models, and one past the packed linears' switch
# from GEMV to GEMM (linear.MAX_ROWS). Lengths beyond the program's context are clamped to it
# (``prefill_lengths``). Other lengths may add specialisations, which the JIT compiles once on
# first use and caches.
PREFILL_LENGTHS = (128, 64, 37)
# An artifact with serving entry points also records the engine's steps (``serving_runs``): each
# decode bucket and token bucket it captures at start, with the step's input buffers laid out as
# the engine holds them (one blob per dtype), so its start compiles nothing either.


def prefill_lengths(max_context: int | None) -> list[int]:
    """PREFILL_LENGTHS no longer than ``max_context`` (a longer prompt would index past the
    program's caches), longest first, without repeats."""
    cap = int(max_context) if max_context else max(PREFILL_LENGTHS)
    return sorted({min(n, cap) for n in PREFILL_LENGTHS}, reverse=True)


@dataclass(frozen=True)
class Launch:
    """One specialisation of one kernel: ``function`` (``module.qualname``) and Triton's serialised
    ``specialization`` (JSON text, ``JITFunction.preload``'s format); ``ops``: IR ops that launch it."""

    function: str
    specialization: str
    ops: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.function.rpartition(".")[2]


class _RecordingDriver:
    """What ``JITFunction.run`` asks of a driver before it compiles: device, stream, target."""

    def __init__(self, target: Any):
        self.target = target

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def _recording(triton_target: Any, sink: list[tuple[str, str]]) -> Iterator[None]:
    from triton import knobs
    from triton.runtime.driver import driver

    from ds4c.backends.triton import kernels

    def hook(*, key: Any, repr: str, fn: Any, compile: dict[str, Any], is_manual_warmup: bool,
             already_compiled: bool) -> bool:
        sink.append((f"{fn.module}.{fn.name}", compile["specialization_data"]))
        return True  # skip compiling and launching

    kernels.kernels()  # the kernel modules imported (and their keys settled) before their binders are swapped
    functions = kernels.jit_functions()
    saved_caches = [f.device_caches for f in functions]
    saved_driver, saved_hook = driver._active, knobs.runtime.jit_cache_hook
    for f in functions:  # a fresh binder per kernel: built for the recording target, then dropped
        f.device_caches = type(f.device_caches)(f.create_binder)
    driver.set_active(_RecordingDriver(triton_target))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        driver._active = saved_driver
        for f, caches in zip(functions, saved_caches, strict=True):
            f.device_caches = caches


def _meta(ty: Any, sizes: Mapping[str, int]) -> torch.Tensor:
    return torch.empty([eval_dim(d, dict(sizes)) for d in ty.shape], dtype=ty.dtype, device="meta")


def meta_params(graphs: Mapping[str, Graph]) -> dict[str, torch.Tensor]:
    """Every parameter of ``graphs`` as a meta tensor of its type (shapes and dtypes, no data)."""
    return {gi.value.name: _meta(gi.value.type, {}) for g in graphs.values() for gi in g.inputs if gi.kind == "param"}


def _packed_meta(inputs: Mapping[str, torch.Tensor], order: Sequence[str]) -> dict[str, torch.Tensor]:
    """``inputs`` as views of one meta blob per dtype, in ``order``: the layout of a serving step's
    static input buffers (``runtime.executor.GraphedServingStep``: one device blob per dtype, one
    copy per step), so pointer alignments, which Triton specialises on, are the ones it launches with."""
    names = [k for k in order if k in inputs] + [k for k in inputs if k not in order]
    out: dict[str, torch.Tensor] = {}
    for dtype in dict.fromkeys(inputs[k].dtype for k in names):
        group = [k for k in names if inputs[k].dtype == dtype]
        blob = torch.empty(sum(inputs[k].numel() for k in group), dtype=dtype, device="meta")
        at = 0
        for k in group:
            out[k] = blob[at:at + inputs[k].numel()].view(inputs[k].shape)
            at += inputs[k].numel()
    return {k: out[k] for k in inputs}


def serving_runs(graphs: Mapping[str, Graph], serving: Mapping[str, Any] | None) -> list[tuple[str, dict[str, int]]]:
    """The serving steps an engine captures at start (``default_buckets`` of the artifact's batch
    record: ``ragged_decode`` per decode bucket, ``ragged_step`` per token bucket, padded as
    ``step_batch.pad_step`` pads them), as (entry point, sizes of its symbolic dims, pools
    included); none without serving entry points."""
    from ds4c.models.deepseek_v4.paged import default_buckets, padded_sizes

    if not serving or not serving.get("pages") or not {"ragged_decode", "ragged_step"} & set(graphs):
        return []
    batch, pages, rates = serving["batch"], serving["pages"]["pages"], dict(serving["rates"])
    pools = {"PW": int(pages["window"]), "PC": int(pages["compressed"]), "SLOTS": int(pages["slots"])}
    decode, steps, seqs = default_buckets(int(batch["max_running"]), int(batch["max_step_tokens"]))
    runs: list[tuple[str, dict[str, int]]] = []
    if "ragged_decode" in graphs:
        runs += [("ragged_decode", {"R": r, **pools}) for r in decode]
    if "ragged_step" in graphs:
        runs += [("ragged_step", {**padded_sizes(n, seqs, rates), **pools}) for n in steps]
    if serving.get("mtp") and "mtp_step" in graphs and "ragged_step" in graphs:
        # speculation (CompiledStepRunner.warm_up): the MTP block in the token buckets, and per decode
        # bucket r a small step of r + 1 sequences of draft_tokens + 1 rows, as a verify (logits of
        # every row) and as the MTP block's catch-up / chained drafts (logits of each sequence)
        drafts = int(serving["layout"].get("draft_tokens", 0))
        runs += [("mtp_step", {**padded_sizes(n, seqs, rates), **pools}) for n in steps]
        for r in decode:
            tokens, small = (r + 1) * (drafts + 1), r + 1
            runs.append(("ragged_step", {**padded_sizes(tokens, small, rates, logits=tokens), **pools}))
            runs.append(("mtp_step", {**padded_sizes(tokens, small, rates), **pools}))
    return runs


def record_launches(graphs: Mapping[str, Graph], state_layout: Sequence[Mapping[str, Any]], target: Target,
                    prefill_lengths: Sequence[int] = PREFILL_LENGTHS, *, pdl: bool,
                    serving: Mapping[str, Any] | None = None) -> list[Launch]:
    """The distinct launches of the kernel backend running ``graphs`` for ``target`` with the
    artifact's compile option ``pdl``: decode at batch 1, prefill at batch 1 and each of
    ``prefill_lengths``, and with the manifest's ``serving`` record the engine's steps in each of
    their buckets (``serving_runs``, speculation's small steps and MTP block included); sorted, so
    every process agrees. The graphs are the artifact's, lowered for the target: what
    ``ds4c.load`` and ``ds4c.Engine`` run."""
    from triton.backends.compiler import GPUTarget

    from ds4c.backends.triton.executor import KernelExecutor
    from ds4c.backends.triton.kernels.configs import KernelContext
    from ds4c.ir.types import torch_dtype

    if target.triton_target is None:
        raise ValueError(f"target '{target.name}' has no Triton target")
    context = KernelContext(target, tuning=None, pdl=pdl)
    weights = meta_params(graphs)
    state = {s["name"]: torch.empty([DECODE_BATCH if d == "B" else int(d) for d in s["shape"]],
                                    dtype=torch_dtype(s["dtype"]), device="meta") for s in state_layout}
    runs: list[tuple[str, dict[str, int]]] = []
    if "decode" in graphs:
        runs.append(("decode", {"B": DECODE_BATCH}))
    if "prefill" in graphs:
        runs += [("prefill", {"B": 1, "S": int(n)}) for n in prefill_lengths]
    runs += serving_runs(graphs, serving)
    found: dict[tuple[str, str], set[str]] = {}
    for entry, sizes in runs:
        g = graphs[entry]
        inputs = {gi.value.name: _meta(gi.value.type, sizes) for gi in g.inputs if gi.kind == "input"}
        if entry not in ("decode", "prefill"):  # as the engine's graphs hold them (alignment specialises)
            orders = {**(serving or {}).get("inputs", {}), "mtp_step": ((serving or {}).get("mtp") or {}).get("inputs")}
            inputs = _packed_meta(inputs, orders.get(entry) or list(inputs))
        pools = {gi.value.name: _meta(gi.value.type, sizes) for gi in g.inputs if gi.kind == "state"}
        executor = KernelExecutor(g, "meta", context=context)
        sink: list[tuple[str, str]] = []
        with _recording(GPUTarget(*target.triton_target), sink):
            _run_noting_ops(executor, inputs, weights, state if entry in ("decode", "prefill") else pools, sink,
                            found)
    return sorted((Launch(fn, spec, tuple(sorted(ops))) for (fn, spec), ops in found.items()),
                  key=lambda la: (la.function, la.specialization))


def _run_noting_ops(executor: Any, inputs: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                    state: Mapping[str, torch.Tensor], sink: list[tuple[str, str]],
                    found: dict[tuple[str, str], set[str]]) -> None:
    """Run ``executor``; attribute every launch recorded in ``sink`` to the op that made it."""
    marks: list[tuple[int, str]] = []

    def on_op(i: int, op: Any, outs: list[Any]) -> None:
        marks.append((len(sink), op.name))

    executor.on_op = on_op
    try:
        executor.run(inputs, weights, state)
    finally:
        executor.on_op = None
    start = 0
    for end, op_name in marks:
        for launch in sink[start:end]:
            found.setdefault(launch, set()).add(op_name)
        start = end


def triton_source(function: str, specialization: str) -> tuple[Any, Any, dict[str, Any]]:
    """(JITFunction, ``ASTSource``, options dict) for ``triton.compile`` from a recorded
    specialisation, decoded as ``JITFunction.preload`` does (triton 3.6 and 3.9 formats)."""
    import triton.language as tl
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from ds4c.backends.triton import kernels

    kernels.kernels()  # the kernel modules imported and their cache keys settled (kernels._settle_cache_keys)
    module, _, qualname = function.rpartition(".")
    fn = getattr(importlib.import_module(module), qualname, None)
    if not isinstance(fn, JITFunction):
        raise LookupError(f"{function} is not a Triton kernel of this ds4c (found {type(fn).__name__})")
    data = json.loads(specialization)

    def decode(value: Any) -> Any:
        if tl.dtype.is_dtype(value):
            return tl.dtype(value)
        if isinstance(value, dict) and "constexpr" in value:
            return tl.constexpr(_tuples(value["constexpr"]))
        return _tuples(value)

    constexprs = {tuple(k): decode(v) for k, v in zip(data["constant_keys"], data["constant_vals"], strict=True)}
    attrs = {tuple(k): v for k, v in zip(data["attrs_keys"], data["attrs_vals"], strict=True)}
    signature = {k: _tuples(v) for k, v in data["signature"].items()}
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in data["options"].items()}
    return fn, ASTSource(fn, signature, constexprs, attrs), options


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
