"""Passes, pipelines and the PassManager.

A pass is a named function ``(graph, ctx) -> graph`` registered with ``@register_pass``. The
manager runs a named pipeline over every entry point of a Program; instruments observe each
pass (print, time, verify, diff, dump) without the passes knowing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ds4c.errors import PassError
from ds4c.ir.graph import Graph, Program
from ds4c.targets import Target

PassFn = Callable[[Graph, "PassContext"], Graph]


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    doc: str

    def __call__(self, graph: Graph, ctx: PassContext) -> Graph:
        return self.fn(graph, ctx)


_PASSES: dict[str, Pass] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def wrap(fn: PassFn) -> PassFn:
        if name in _PASSES:
            raise PassError(f"pass '{name}' registered twice")
        _PASSES[name] = Pass(name, fn, (fn.__doc__ or "").strip())
        return fn

    return wrap


def get_pass(name: str) -> Pass:
    _load_builtin_passes()
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(f"unknown pass '{name}'; known passes: {', '.join(sorted(_PASSES))}") from None


def list_passes() -> list[Pass]:
    _load_builtin_passes()
    return [ _PASSES[k] for k in sorted(_PASSES)]


# Named pipelines. Later stages (fusion, precision, memory, streams, lowering) append here.
PIPELINES: dict[str, list[str]] = {
    "default": ["canonicalize_shapes", "fold_constants", "cse", "dce", "fuse_norms_mhc", "fuse_rope", "fuse_attention", "fuse_moe", "fuse_compress",
                "cse", "dce", "last_position_logits", "hoist_row_gather", "canonicalize_shapes", "assign_precision", "quantize_weights",
                "lower_paged_state", "plan_memory",
                "schedule_streams", "fit_serving_pools"],
    "none": [],
}
# The lowering stage for targets with Triton kernels (h100 ... mi355x): the ops their kernels run,
# inserted into a named pipeline before memory planning, so the artifact holds the program that runs.
LOWERING: list[str] = ["lower_packed_weights", "fuse_norm_rope", "fuse_paged_reads", "merge_sibling_linears", "dce"]


# Compile options of the GPU lowering (all on by default; off for A/B runs), recorded in the manifest:
# the lowering passes' (fuse_norm_rope, fuse_paged_reads, merge_linears, merge_packed) and the kernels' launch mode
# (pdl: programmatic dependent launch, ds4c/backends/triton/kernels/pdl.py; the ahead-of-time binaries
# and the runtime's launches follow it).
LOWERING_OPTIONS: dict[str, bool] = {"fuse_norm_rope": True, "fuse_paged_reads": True, "merge_linears": True,
                                     "merge_packed": True, "pdl": True}


def check_lowering_options(options: Mapping[str, Any] | None) -> dict[str, bool]:
    """``options`` (lowering pass -> on/off) checked against ``LOWERING_OPTIONS``."""
    out: dict[str, bool] = {}
    for key, value in (options or {}).items():
        if key not in LOWERING_OPTIONS:
            raise PassError(f"lowering option '{key}' does not exist; the options are {', '.join(LOWERING_OPTIONS)}")
        if not isinstance(value, bool):
            raise PassError(f"lowering option '{key}' must be true or false (on/off), got {value!r}")
        out[key] = value
    return out


def get_pipeline(name_or_passes: str | Sequence[str], target: Any = None) -> list[str]:
    """The pass names of a named pipeline (with ``target``'s lowering stage) or of an explicit list."""
    if isinstance(name_or_passes, str):
        if name_or_passes not in PIPELINES:
            raise PassError(f"unknown pipeline '{name_or_passes}'; known pipelines: {', '.join(PIPELINES)}")
        names = list(PIPELINES[name_or_passes])
        if getattr(target, "triton_target", None) is not None and "plan_memory" in names:
            at = names.index("plan_memory")
            names[at:at] = LOWERING
        return names
    return list(name_or_passes)


def check_pipeline_options(pipeline: str | Sequence[str], *, print_after: Iterable[str] = (),
                           stop_after: str | None = None, bisect: int | None = None,
                           target: Any = None) -> list[str]:
    """The pipeline's pass names, once every option that names its passes has been checked.

    Compiling traces the model first (seconds to minutes), so ``ds4c.compile`` calls this before
    any work: a misspelt ``--print-after`` / ``--stop-after`` pass, an unknown pass in a custom
    pipeline or a negative ``--bisect`` is refused at once, naming the passes that exist.
    """
    names = get_pipeline(pipeline, target)
    for name in names:
        get_pass(name)
    ran = ", ".join(dict.fromkeys(names)) or "none: the pipeline is empty"
    for option, asked in [*(("--print-after", p) for p in print_after), ("--stop-after", stop_after)]:
        if asked is not None and asked not in names:
            raise PassError(f"{option} {asked}: no such pass in the pipeline; its passes are {ran}")
    if bisect is not None and bisect < 0:
        raise PassError(f"--bisect {bisect}: give how many rewrites to apply, 0 or more")
    return names


@dataclass
class PassContext:
    """What passes may read: the target, compile options, and the shared program facts.

    Every individual rewrite a pass makes (a fusion, a folded constant, a merged expression) asks
    ``allow_rewrite`` first: with ``bisect_limit = N`` only the first N rewrites of the whole
    pipeline happen (like LLVM's -opt-bisect-limit), and ``rewrite_log`` says which they were.
    """

    target: Target | None = None  # None: target-independent passes only (a target pass refuses it)
    options: dict[str, Any] = field(default_factory=dict)
    program_attrs: dict[str, Any] = field(default_factory=dict)
    bisect_limit: int | None = None
    rewrite_log: list[tuple[int, str, str, bool]] = field(default_factory=list)  # (index, pass, what, applied)
    current_pass: str = ""
    current_graph: str = ""
    # the program's graphs as the pipeline has them (every graph has run the passes before this one)
    graphs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target is not None and not isinstance(self.target, Target):
            raise PassError(f"PassContext.target must be a ds4c.targets.Target record (ds4c.targets.get_target(name)), "
                            f"got {type(self.target).__name__} {self.target!r}")

    def allow_rewrite(self, what: str) -> bool:
        index = len(self.rewrite_log)
        ok = self.bisect_limit is None or index < self.bisect_limit
        self.rewrite_log.append((index, self.current_pass, f"@{self.current_graph}: {what}", ok))
        return ok

    @property
    def rewrites_applied(self) -> int:
        return sum(1 for r in self.rewrite_log if r[3])


class Instrument:
    """Observer of the pipeline. Override any hook."""

    def run_before_pass(self, pass_name: str, graph: Graph) -> None: ...

    def run_after_pass(self, pass_name: str, before: Graph, after: Graph, seconds: float) -> None: ...

    def run_after_pipeline(self, program: Program) -> None: ...


class PassManager:
    def __init__(self, passes: Iterable[str] | str = "default", instruments: Sequence[Instrument] = (),
                 ctx: PassContext | None = None, stop_after: str | None = None):
        self.ctx = ctx or PassContext()
        self.pass_names = check_pipeline_options(passes if isinstance(passes, str) else list(passes),
                                                 stop_after=stop_after, bisect=self.ctx.bisect_limit,
                                                 target=self.ctx.target)
        if stop_after is not None:
            self.pass_names = self.pass_names[: self.pass_names.index(stop_after) + 1]
        self.passes = [get_pass(n) for n in self.pass_names]
        self.instruments = list(instruments)

    def run(self, program: Program) -> Program:
        graphs = dict(program.graphs)
        self.ctx.program_attrs = program.attrs
        self.ctx.graphs = graphs
        for p in self.passes:
            for name, graph in graphs.items():
                self.ctx.current_pass, self.ctx.current_graph = p.name, name
                for ins in self.instruments:
                    ins.run_before_pass(p.name, graph)
                t0 = time.perf_counter()
                try:
                    out = p(graph, self.ctx)
                except PassError:
                    raise
                except Exception as e:
                    raise PassError(f"pass '{p.name}' failed on graph @{name}: {type(e).__name__}: {e}") from e
                dt = time.perf_counter() - t0
                for ins in self.instruments:
                    ins.run_after_pass(p.name, graph, out, dt)
                graphs[name] = out
        result = Program(graphs, dict(program.attrs))
        result.attrs["pipeline"] = list(self.pass_names)
        for ins in self.instruments:
            ins.run_after_pipeline(result)
        return result


# The built-in passes: importing a module registers its passes (``register_pass``). Loaded by
# name on the first lookup, so the passes may import this module without a cycle.
BUILTIN_PASS_MODULES = ("assign_precision", "canonicalize_shapes", "cse", "dce", "fit_serving_pools", "fold_constants",
                        "fuse_attention",
                        "fuse_compress", "fuse_moe", "fuse_norm_rope", "fuse_norms_mhc", "fuse_paged_reads", "fuse_rope",
                        "last_logits",
                        "lower_packed_weights", "lower_paged_state", "merge_sibling_linears", "plan_memory", "quantize_weights",
                        "row_gather", "schedule_streams", "shard_experts")


def _load_builtin_passes() -> None:
    import importlib

    for name in BUILTIN_PASS_MODULES:
        importlib.import_module(f"ds4c.passes.{name}")
