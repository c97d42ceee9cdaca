"""``ds4c.compile``: model -> traced IR -> pipeline -> Artifact."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds4c.artifact.artifact import Artifact
from ds4c.errors import ConfigError
from ds4c.frontend.source import ModelSource, resolve_model
from ds4c.frontend.trace import trace_program
from ds4c.ir.graph import Program
from ds4c.passes.instruments import DumpIR, PrintAfterAll, VerifyAfterEach
from ds4c.passes.last_logits import add_last_position_entry
from ds4c.passes.manager import (
    LOWERING,
    LOWERING_OPTIONS,
    Instrument,
    PassContext,
    PassManager,
    check_lowering_options,
    check_pipeline_options,
    get_pipeline,
)
from ds4c.progress import progress_steps
from ds4c.quant.policy import ACTIVATION_MODES, check_table
from ds4c.runtime.tokenizer import checkpoint_tokenizer
from ds4c.targets import get_target

# Policies of ds4c.quant.policy; a path to a per-unit table file (*.json) is accepted too.
PRECISIONS = ("auto", "fp32", "bf16", "fp8", "mxfp4-experts")
# Weights are embedded in the artifact up to this size unless asked otherwise; larger models
# reference their checkpoint (or, for presets, the seed the runtime generates them from).
EMBED_LIMIT_BYTES = 2 << 30
DEFAULT_MAX_CONTEXT = 4096


def compute_dtype(precision: str, target_name: str) -> torch.dtype:
    if precision not in PRECISIONS and not str(precision).endswith(".json"):
        raise ConfigError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}, "
                          "or a per-unit table file (JSON: unit glob -> format)")
    # auto: fp32 where the target has no native bf16 path (cpu; the npu computes in fp16/int8/fp32)
    if precision == "fp32" or (precision == "auto" and (target_name == "cpu"
                                                        or "bf16" not in get_target(target_name).peak_flops)):
        return torch.float32
    return torch.bfloat16


def compile(
    model: Any,
    target: str = "b200",
    *,
    precision: str = "auto",
    max_context: int | None = None,
    dump_ir: str | Path | None = None,
    pipeline: str | Sequence[str] = "default",
    instruments: Sequence[Instrument] = (),
    weights: str = "auto",
    print_after_all: bool = False,
    print_after: Sequence[str] = (),
    stop_after: str | None = None,
    bisect: int | None = None,
    verify: bool = True,
    progress: bool | None = None,
    seed: int | None = None,
    calibration_tokens: Any = None,
    error_bound: float | None = None,
    hbm_budget: int | None = None,
    csa_kv_on_host: bool = False,
    kernel_binaries: bool | None = None,
    activations: str = "native",
    allow_nonfinite: bool = False,
    lowering: Mapping[str, bool] | None = None,
    serving: bool | Mapping[str, int] | None = None,
    mesh: str | Any | None = None,
    gpus: int | None = None,
    speculative: int = 0,
) -> Artifact:
    """Compile ``model`` (preset name, checkpoint directory, ONNX file or transformers DeepseekV4ForCausalLM) for ``target``.

    ``weights``: ``embed`` (weights inside the artifact), ``reference`` (the artifact points at the
    checkpoint directory, or at the preset's seed), or ``auto`` (embed up to 2 GiB).
    ``lowering``: compile options of the GPU lowering stage (ds4c.passes.manager.LOWERING_OPTIONS:
    ``fuse_norm_rope``, ``fuse_paged_reads``, ``merge_linears``, ``merge_packed``, ``pdl``; each on by default), e.g.
    ``{"pdl": False}`` as ``ds4c compile --no-pdl`` does; an unknown name or a non-boolean value is
    refused. The manifest records the options the program was lowered with.
    ``instruments`` observe every pass (see ds4c.debug.CompileTrace); ``print_after`` names passes
    whose output IR is printed; ``stop_after`` ends the pipeline after a pass; ``bisect = N``
    applies only the first N rewrites of the pipeline (the manifest's ``rewrites`` lists them).
    ``precision``: a policy (``auto``, ``fp32``, ``bf16``, ``fp8``, ``mxfp4-experts``) or a per-unit
    table file; ``calibration_tokens`` ([N, S] ids) and ``error_bound`` steer ``auto`` (assign_precision).
    ``activations``: ``native`` (FP8 linears multiply FP8 activations where the target's tensor cores
    do, as DeepSeek runs them) or ``compute`` (weight-only quantisation: activations stay in the
    compute dtype everywhere).
    ``hbm_budget`` (bytes): device memory for weights + state + activations; weights beyond it stay in
    host memory and are prefetched (plan_memory). ``csa_kv_on_host``: plan CSA's compressed KV in
    host memory, fetching only the selected entries each step. ``kernel_binaries``: store Triton
    binaries compiled ahead of time for cuda / rocm targets (default: yes, unless the environment
    sets ``DS4C_KERNEL_BINARIES=0``); without them the runtime JIT-compiles its kernels.
    ``serving``: also compile the serving entry points ``ragged_step`` / ``ragged_decode`` (packed
    requests over paged state, what ``ds4c.Engine`` runs); a mapping sets the page layout and the
    batch they are planned for (ds4c.models.deepseek_v4.paged.SERVING_OPTIONS: ``window_page``,
    ``comp_page``, ``max_chunk``, ``max_running``, ``max_step_tokens``). ``plan_memory`` sizes the
    pools for the target; the manifest's ``serving`` section records layout, pools and pages.
    ``mesh`` (``"ep=E,tp=T"`` or a ds4c.distributed.Mesh) or ``gpus`` (N: the mesh chosen for N
    GPUs, ``Mesh.for_gpus``): compile one program per rank (``shard_experts`` after the precision
    plan; memory and streams planned per rank); the artifact holds every rank's program and the
    whole weights once, each rank reading its slices (ds4c.artifact.sharded).
    ``speculative`` (k >= 1, with ``serving``): also compile the model's MTP block (``mtp_step``; the
    serving steps then return the final streams it reads) for ``ds4c.Engine(..., speculative=k)``,
    with compressor rings sized for k drafts (docs/design/mtp.md); the config needs
    ``num_nextn_predict_layers`` >= 1 and the weights ``mtp.0.*``.
    ``allow_nonfinite``: accept NaN/Inf weights (refused by default, naming the tensor; recorded
    in the weight source so the artifact loads them too). With ``weights="reference"`` the
    artifact records the size and sha256 of every checkpoint file it reads (one read of the
    checkpoint here) and refuses to run on a changed one (ds4c.frontend.file_record).
    """
    if activations not in ACTIVATION_MODES:
        raise ConfigError(f"--activations must be one of {', '.join(ACTIVATION_MODES)}, got '{activations}'")
    if error_bound is not None and not (isinstance(error_bound, int | float) and 0 < error_bound < float("inf")):
        raise ConfigError(f"--error-bound must be a positive number, got {error_bound!r}")
    if hbm_budget is not None and hbm_budget <= 0:
        raise ConfigError(f"--hbm-budget must be a positive number of bytes, got {hbm_budget}")
    from ds4c.frontend.weight_samples import calibration_for
    from ds4c.models.deepseek_v4 import ModelConfig
    from ds4c.quant.packing import pack_weights

    tgt = get_target(target)
    source: ModelSource = resolve_model(model, seed=seed, allow_nonfinite=allow_nonfinite)
    config = ModelConfig.from_hf_dict(source.config, source=_config_where(source))
    if max_context is None:
        max_context = min(int(source.config.get("max_position_embeddings", DEFAULT_MAX_CONTEXT)),
                          DEFAULT_MAX_CONTEXT)
    if max_context < 1:
        raise ConfigError(f"--max-context must be positive, got {max_context}")
    dtype = compute_dtype(precision, tgt.name)
    if weights not in ("auto", "embed", "reference"):
        raise ConfigError(f"weights='{weights}': choose auto, embed or reference")
    if max_context > config.max_position_embeddings:
        raise ConfigError(f"--max-context {max_context} exceeds the model's 'max_position_embeddings' "
                          f"({config.max_position_embeddings}, {_config_where(source)}); give at most that")
    lowering_options = check_lowering_options(lowering)
    mesh = _mesh_of(mesh, gpus, config, tgt, source, stop_after=stop_after, bisect=bisect)
    serving_plan = None
    if not isinstance(speculative, int) or isinstance(speculative, bool) or speculative < 0:
        raise ConfigError(f"--speculative must be a number of drafts >= 0, got {speculative!r}")
    if speculative and not serving:
        raise ConfigError(f"--speculative {speculative}: speculative decoding runs in the serving engine; add --serving")
    if speculative and config.num_nextn_predict_layers < 1:
        raise ConfigError(f"--speculative {speculative}: the model has no MTP block ('num_nextn_predict_layers' is 0 in "
                          f"{_config_where(source)}); compile without --speculative")
    if speculative:
        serving = {**(dict(serving) if isinstance(serving, Mapping) else {}), "draft_tokens": speculative}
    if serving:
        from ds4c.models.deepseek_v4.paged import serving_layout

        if source.kind == "onnx":
            raise ConfigError("serving entry points are traced from the model; an ONNX file has only its own graphs")
        if tgt.backend == "npu":
            raise ConfigError("--serving: the NPU target runs the dense entry points only; compile serving "
                              "artifacts for cpu or a GPU target")
        rates = {t: config.compress_rate(i) for i, t in enumerate(config.layer_types) if config.compress_rate(i)}
        try:
            serving_plan = serving_layout(config.sliding_window, rates, max_context,
                                          dict(serving) if isinstance(serving, Mapping) else None)
        except ValueError as e:
            raise ConfigError(f"--serving: {e}") from None
    # the rest of what the options name is checked before tracing, which takes seconds to minutes
    check_pipeline_options(pipeline, print_after=print_after, stop_after=stop_after, bisect=bisect, target=tgt)
    if dump_ir is not None and Path(dump_ir).exists() and not Path(dump_ir).is_dir():
        raise ConfigError(f"--dump-ir {dump_ir} is a file; give a folder (it is made if missing)")
    if precision not in PRECISIONS and source.kind != "onnx":  # a table: its globs against the weights' names
        from ds4c.frontend.trace import build_meta_model, param_spec

        check_table(precision, param_spec(build_meta_model(config, max_context, dtype)))

    if source.kind == "checkpoint" and source.path is not None:
        # the checkpoint's headers against the model's parameters first: a bad checkpoint is
        # refused before tracing and the passes (loading checks the same again, with the data)
        from ds4c.frontend.checkpoint import check_checkpoint
        from ds4c.frontend.trace import build_meta_model, param_spec

        check_checkpoint(source.path, param_spec(build_meta_model(config, max_context, dtype)))
    with progress_steps(f"compiling for {tgt.name}", total=5, enabled=progress) as steps:
        if source.kind == "onnx":  # the file fixes graph, dtypes and shapes (ds4c.frontend.onnx_import)
            from ds4c.frontend.onnx_import import import_onnx_program, onnx_float_dtype

            steps.advance("importing ONNX", 0)
            program, full_spec = import_onnx_program(source.path)
            dtype = onnx_float_dtype(full_spec)
            if precision not in PRECISIONS:
                check_table(precision, full_spec)
            max_context = program.attrs.get("max_context") or max_context
        else:
            from ds4c.frontend.trace import build_meta_model, param_spec

            steps.advance("tracing (torch.export)", 0)
            # tensor parallelism of attention: every rank's program is the model with its share of
            # the heads (and output groups); shard_experts gives each rank its slices of them
            traced = rank_heads(config, mesh)
            program, meta_model = trace_program(traced, max_context, dtype)
            full_spec = param_spec(meta_model if traced is config and not speculative
                                   else build_meta_model(config, max_context, dtype, mtp=bool(speculative)))
            if serving_plan is not None:
                from ds4c.frontend.trace import trace_serving

                steps.advance("tracing the serving entry points", 0)
                program = add_serving_entries(program, trace_serving(traced, max_context, serving_plan[0], dtype,
                                                                     mtp=bool(speculative)), serving_plan[1])
            if tgt.backend != "npu":  # generation's prefill: the pass last_position_logits makes it
                program = add_last_position_entry(program)
        steps.advance("running passes")
        ins: list[Instrument] = list(instruments)
        if verify:
            ins.append(VerifyAfterEach())
        if dump_ir is not None:
            ins.append(DumpIR(dump_ir))
        if print_after_all:
            ins.append(PrintAfterAll())
        elif print_after:
            ins.append(PrintAfterAll(only=set(print_after)))
        spec = _used_params(program, full_spec)
        materialise = source.kind == "module" or weights == "embed" or (
            weights == "auto" and sum(_numel(s) * d.itemsize for s, d in spec.values()) <= EMBED_LIMIT_BYTES)
        tokens = None if calibration_tokens is None else torch.as_tensor(calibration_tokens, dtype=torch.int64)
        calibration = calibration_for(source, spec, dtype, materialise=materialise, tokens=tokens)
        ctx = PassContext(target=tgt, options={"precision": precision, "max_context": max_context,
                                               "calibration": calibration, "error_bound": error_bound,
                                               "activations": activations,
                                               "csa_kv_on_host": csa_kv_on_host, **lowering_options,
                                               **({"hbm_budget": int(hbm_budget)} if hbm_budget else {})},
                          bisect_limit=bisect)
        if mesh is None:
            programs = [PassManager(pipeline, ins, ctx, stop_after=stop_after).run(program)]
            rewrites = [(len(ctx.rewrite_log), ctx.rewrites_applied)]
        else:
            ctx.options["o_groups"] = config.o_groups  # the whole model's, for tensor parallelism of attention
            programs, rewrites = sharded_pipeline(program, get_pipeline(pipeline, tgt), ins, ctx, mesh)
        steps.advance("collecting weights")
        if kernel_binaries is None:
            kernel_binaries = os.environ.get("DS4C_KERNEL_BINARIES", "1") != "0"
        lowered = [_weights_of(p, full_spec, source) for p in programs]
        whole = whole_provided(lowered) if mesh is not None else {}
        total_bytes = _bytes(whole) if mesh is not None else _bytes(lowered[0].stored)
        mode = weights
        if mode == "auto":
            mode = "embed" if total_bytes <= EMBED_LIMIT_BYTES else "reference"
        if mode == "reference" and source.kind == "module":
            mode = "embed"  # an in-memory module has nothing to point at
        embedded = None
        if mesh is not None:
            # every rank's slices of one set of whole tensors (what the source provides, in the compute
            # dtype): stored once, or read from the source at load; each rank packs its own
            if mode == "embed":
                loaded = source.load_weights(whole, dtype=dtype)
                embedded = {k: loaded[k] for k in whole}
            weights_source = source.reference(whole) if mode == "reference" else source.describe()
        else:
            low = lowered[0]
            if mode == "embed":
                loaded = (calibration.weights() if low.provided == low.spec else None) \
                    or source.load_weights(low.provided, dtype=dtype)
                embedded = {k: loaded[k] for k in low.provided}
                pack_weights(embedded, low.assignment, keep=low.read)
                apply_lowering(embedded, low.transforms)
                embedded = {k: embedded[k] for k in low.stored}
            # a referenced checkpoint is recorded (size + sha256 per file) so a changed one is refused at load
            weights_source = source.reference(low.spec) if mode == "reference" else source.describe()
        steps.advance(f"device code ({tgt.backend})")
        from ds4c.backends import lower_kernels

        for low in lowered:
            low.kernel_section, low.kernel_members = lower_kernels(
                tgt, low.program, progress=progress, binaries=kernel_binaries,
                options={**LOWERING_OPTIONS, **lowering_options})
        steps.advance("done")

    common: dict[str, Any] = {
        "target": tgt.to_dict(),
        "model": {"family": "deepseek_v4", "config": config.to_hf_dict(), "source": source.describe()},
        "max_context": max_context,
    }
    extras: dict[str, bytes] = {}
    rank_manifests = []
    for r, low in enumerate(lowered):
        prefix = "" if mesh is None else f"ranks/{r}/"
        section = _program_manifest(low, precision=precision, dtype=dtype, bisect=bisect, mode=mode,
                                    weights_source=weights_source, lowering_options=lowering_options, prefix=prefix,
                                    rewrites=rewrites[r])
        section.update(plan_sections(low.program, extras, prefix=prefix))
        rank_manifests.append(section)
    kernel_members = merge_kernel_members([low.kernel_members for low in lowered])
    if mesh is None:
        manifest = {**common, **rank_manifests[0]}
    else:
        from ds4c.artifact.sharded import sharded_manifest

        manifest = {**common, **sharded_manifest(rank_manifests, mesh, whole, mode=mode, source=weights_source,
                                                 dtype=dtype)}
    tokenizer = checkpoint_tokenizer(source.path) if source.kind == "checkpoint" and source.path is not None else None
    if tokenizer is not None:
        manifest["tokenizer"], members = tokenizer
        extras.update(members)
    elif config.vocab_size >= 256:
        manifest["tokenizer"] = {"kind": "bytes"}
    else:
        manifest["tokenizer"] = {"kind": "none"}
    return Artifact(manifest=manifest, program=lowered[0].program, weights=embedded, kernels=kernel_members,
                    extras=extras, ranks=None if mesh is None else [low.program for low in lowered])


@dataclass
class _Weights:
    """One program's weights as the pipeline left them: what it reads, in which formats, from what."""

    program: Program
    plan: dict[str, Any]
    assignment: dict[str, str]
    read: set[str]
    transforms: list[dict[str, Any]]
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]]  # the weights it uses, as the model has them
    stored: dict[str, tuple[tuple[int, ...], torch.dtype]]  # as the lowered program reads them
    provided: dict[str, tuple[tuple[int, ...], torch.dtype]]  # as the source gives them
    shard: dict[str, list[dict[str, int]]]  # name -> slices of the whole tensor (sharded programs)
    kernel_section: Any = None
    kernel_members: dict[str, bytes] = field(default_factory=dict)


def _weights_of(program: Program, full_spec: dict[str, tuple[tuple[int, ...], torch.dtype]],
                source: ModelSource) -> _Weights:
    from ds4c.distributed.shards import slice_shape
    from ds4c.quant.packing import stored_spec

    plan = program.attrs.get("precision") or {}
    assignment = plan.get("assignment") or {}
    read = {v.name for g in program.graphs.values() for v in g.inputs_of_kind("param")}
    transforms = program.attrs.get("weight_transforms") or []
    shard = (program.attrs.get("shard") or {}).get("weights", {})
    if shard:  # this rank's shapes of the tensors it holds slices of
        full_spec = dict(full_spec)
        for name, slices in shard.items():
            shape, dt = full_spec[name]
            full_spec[name] = (slice_shape(shape, slices), dt)
    spec = _used_params(program, full_spec, also=set(assignment) | transform_sources(transforms))
    packed = stored_spec(spec, assignment, read | transform_sources(transforms))  # as the precision plan says
    stored = lowered_spec(packed, transforms, read)  # as the lowered program reads them
    # what the source gives: checkpoint tensors shipped in their assigned format come packed (their bytes)
    provided = source.provided_spec(spec, assignment, keep=read | transform_sources(transforms))
    if shard:
        shipped = sorted(k for k in provided if k not in spec)
        if shipped:
            raise ConfigError(f"--mesh: the checkpoint ships '{shipped[0]}' packed (a part of a quantised weight); "
                              "sharding a checkpoint's packed tensors is not supported yet: compile it without "
                              "--mesh, or from a bf16 checkpoint")
    return _Weights(program, plan, assignment, read, transforms, spec, stored, provided, shard)


def _program_manifest(low: _Weights, *, precision: str, dtype: torch.dtype, bisect: int | None, mode: str,
                      weights_source: dict[str, Any], lowering_options: Mapping[str, bool],
                      prefix: str = "", rewrites: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """The manifest sections of one program (the whole model's, or one rank's of a sharded one);
    ``rewrites``: (attempted, applied) by the pipeline that made it."""
    from ds4c.quant.packing import stored_spec

    program, spec, assignment = low.program, low.spec, low.assignment
    out: dict[str, Any] = {
        "precision": {**low.plan, "policy": precision, "compute_dtype": str(dtype).removeprefix("torch."),
                      # the bytes of the formats chosen (before the lowering's weight transforms: a
                      # packed weight a non-matmul op reads is expanded at load, see weights.bytes)
                      "weight_bytes": _bytes(stored_spec(spec, assignment, ())),
                      "bf16_weight_bytes": sum(_numel(s) * (2 if d.is_floating_point else d.itemsize)
                                               for s, d in spec.values())},
        "pipeline": program.attrs.get("pipeline", []),
        "rewrites": {"attempted": rewrites[0], "applied": rewrites[1], "bisect_limit": bisect},
        "entry_points": _entry_points(program, prefix),
        "state": program.attrs["state"],
        **({"serving": serving_section(program)} if "serving" in program.attrs else {}),
        "weights": {
            "mode": mode,
            "source": weights_source,
            "dtype": str(dtype).removeprefix("torch."),
            "bytes": _bytes(low.stored),
            "tensors": _describe(low.stored),
            # What the source provides, when it differs from what the program reads (packed weights).
            **({"source_tensors": _describe(low.provided)} if assignment or low.transforms or low.shard else {}),
            # Transforms the runtime applies to referenced weights at load, in order.
            "transforms": [{"op": "cast", "dtype": str(dtype).removeprefix("torch."), "tensors": "floating"}]
            + ([{"op": "quantize", "tensors": assignment}] if assignment else []) + list(low.transforms),
            **({"shard": low.shard} if low.shard else {}),
        },
        "kernels": low.kernel_section,
    }
    lowered = [p for p in program.attrs.get("pipeline", []) if p in LOWERING and p != "dce"]
    if lowered:  # the GPU lowering stage ran: the IR is the program the kernels run, with these options
        out["lowering"] = {"passes": lowered, "options": {**LOWERING_OPTIONS, **lowering_options}}
    return out


def sharded_pipeline(program: Program, names: Sequence[str], instruments: Sequence[Instrument], ctx: PassContext,
                     mesh: Any) -> tuple[list[Program], list[tuple[int, int]]]:
    """Every rank's program and its rewrites (attempted, applied): the pipeline up to
    ``quantize_weights`` once (tracing, fusion and the precision plan are the whole model's), then
    ``shard_experts`` and the rest per rank (weights packed, memory planned and streams scheduled
    for the rank's slices)."""
    at = names.index("quantize_weights") if "quantize_weights" in names else len(names)
    shared = PassManager(list(names[:at]), instruments, ctx).run(program)
    out, rewrites = [], []
    for rank in range(mesh.world):
        rank_ctx = PassContext(target=ctx.target, options={**ctx.options, "ep": mesh.ep, "tp": mesh.tp, "rank": rank,
                                                           "attention": mesh.attention})
        own = Program(dict(shared.graphs), copy.deepcopy(shared.attrs))  # the passes record into the attrs
        rest = PassManager(["shard_experts", *names[at:]], instruments if rank == 0 else (), rank_ctx).run(own)
        rest.attrs["pipeline"] = [*names[:at], "shard_experts", *names[at:]]
        rewrites.append((len(ctx.rewrite_log) + len(rank_ctx.rewrite_log),
                         ctx.rewrites_applied + rank_ctx.rewrites_applied))
        out.append(rest)
    return out, rewrites


def whole_provided(lowered: Sequence[_Weights]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The whole tensors the ranks of a sharded program read slices of (and the replicated ones), once."""
    from ds4c.distributed.shards import whole_spec

    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for low in lowered:
        out.update(whole_spec(low.provided, low.shard))
    return out


def merge_kernel_members(parts: Sequence[Mapping[str, bytes]]) -> dict[str, bytes]:
    """The ranks' kernel members, each stored once (a kernel of the same shapes has the same name)."""
    out: dict[str, bytes] = {}
    for members in parts:
        for name, blob in members.items():
            if out.setdefault(name, blob) != blob:
                raise ConfigError(f"kernel member '{name}' differs between ranks; compile with --no-kernel-binaries")
    return out


def _bytes(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    return sum(_numel(s) * d.itemsize for s, d in spec.values())


def _describe(spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(s), "dtype": str(d).removeprefix("torch.")} for k, (s, d) in spec.items()}


def plan_sections(program: Program, members: dict[str, bytes], prefix: str = "") -> dict[str, Any]:
    """Manifest summaries of ``plan_memory`` and ``schedule_streams`` per entry point; the whole
    plans go into ``members`` as ``plans/<entry>.memory.json`` / ``plans/<entry>.schedule.json``
    (the GPU runtime runs the schedule and places activations by the memory plan; ``ds4c inspect``
    and the notebooks show them)."""
    import json

    out: dict[str, Any] = {}
    for key, kind in (("memory_plan", "memory"), ("schedule", "schedule")):
        plans = program.attrs.get(key) or {}
        section = {}
        for entry, plan in plans.items():
            member = f"{prefix}plans/{entry}.{kind}.json"
            members[member] = json.dumps(plan, default=str, separators=(",", ":")).encode()
            if kind == "memory":
                summary = {k: plan.get(k) for k in ("sizes", "arena_bytes", "arena_bytes_sequential", "peak_live_bytes",
                                                    "device_bytes", "target_hbm_bytes", "fits")}
                summary["weights"] = {k: v for k, v in (plan.get("weights") or {}).items() if k != "prefetch"}
                summary["state_bytes"] = (plan.get("state") or {}).get("by_kind")
                # the GPU runtime's arena at the plan's sizes (graph outputs are not placed in it)
                placed = [b for b in plan.get("buffers", []) if b.get("placed_offset") is not None]
                summary["runtime_arena"] = {"bytes": plan.get("placed_arena_bytes"), "buffers": len(placed),
                                            "bytes_apart": sum(int(b["size"]) for b in placed),
                                            "orders": plan.get("orders", ["graph"])}
            else:
                streams = [s for s, *_ in plan["ops"]]
                summary = {"makespan_s": plan["makespan"], "single_stream_makespan_s": plan["single_stream_makespan"],
                           "ops_per_stream": {s: streams.count(s) for s in plan["streams"]},
                           "events": len(plan["events"])}
            section[entry] = {**summary, "member": member}
        if section:
            out[key] = section
    return out


def _mesh_of(mesh: Any, gpus: int | None, config: Any, tgt: Any, source: ModelSource, *, stop_after: str | None,
             bisect: int | None) -> Any:
    """The Mesh the options ask for (None: one rank), checked against what sharding supports."""
    from ds4c.distributed.mesh import Mesh

    if mesh is not None and gpus is not None:
        raise ConfigError("give --mesh or --gpus, not both")
    if gpus is not None:
        mesh = Mesh.for_gpus(gpus, experts=config.n_routed_experts)
    elif isinstance(mesh, str):
        mesh = Mesh.parse(mesh)
    elif mesh is not None and not isinstance(mesh, Mesh):
        raise ConfigError(f"mesh={mesh!r}: give a string like 'ep=2,tp=2' or a ds4c.distributed.Mesh")
    if mesh is None or mesh.world == 1:
        return None
    if source.kind == "onnx":
        raise ConfigError("--mesh / --gpus: an ONNX file's graphs are not sharded; compile the checkpoint or preset")
    if tgt.backend == "npu":
        raise ConfigError("--mesh / --gpus: the NPU target runs one device; compile sharded programs for cpu or a GPU")
    if stop_after is not None or bisect is not None:
        raise ConfigError("--stop-after / --bisect debug one program; drop --mesh / --gpus to use them")
    heads, groups = config.num_attention_heads, config.o_groups
    if mesh.tp > 1 and mesh.attention != "dp" and (heads % mesh.tp or (groups % mesh.tp and mesh.tp % groups)):
        raise ConfigError(f"--mesh {mesh}: tensor parallelism splits attention's {heads} heads in {groups} output "
                          f"groups over tp={mesh.tp} ranks; give a tp that divides the heads and divides or is a "
                          "multiple of the groups (or attention=dp)")
    if config.n_routed_experts % mesh.ep:
        raise ConfigError(f"--mesh {mesh}: the model's {config.n_routed_experts} routed experts do not split over "
                          f"ep={mesh.ep} ranks; give an ep that divides {config.n_routed_experts}")
    return mesh


def rank_heads(config: Any, mesh: Any) -> Any:
    """The config each rank's program is traced from: with ``tp`` > 1 (and attention not data
    parallel), ``num_attention_heads`` / tp heads and ``o_groups`` / tp output groups (one, a part
    of a group's heads, where tp exceeds the groups)."""
    import dataclasses

    if mesh is None or mesh.tp == 1 or mesh.attention == "dp":
        return config
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // mesh.tp,
                               o_groups=max(1, config.o_groups // mesh.tp))


def _config_where(source: ModelSource) -> str:
    if source.kind == "checkpoint":
        return str(Path(source.path or source.name) / "config.json")
    return f"{source.kind} '{source.name}' config"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _used_params(program: Program, full: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 also: Iterable[str] = ()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Weights any graph reads (or ``also`` names, e.g. packed ones), with shape and dtype, in ``full``'s order."""
    used: set[str] = set(also)
    for g in program.graphs.values():
        used.update(v.name for v in g.inputs_of_kind("param"))
    return {k: full[k] for k in full if k in used}


def transform_sources(transforms: Sequence[dict[str, Any]]) -> set[str]:
    """Every weight the lowering's weight transforms read (packed tensors, concatenated parts)."""
    out: set[str] = set()
    for tr in transforms:
        for entry in tr["tensors"].values():
            out.update(entry["from"] if tr["op"] == "dequantize" else entry)
    return out


def lowered_spec(stored: dict[str, tuple[tuple[int, ...], torch.dtype]], transforms: Sequence[dict[str, Any]],
                 read: set[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors the program reads (``read``), with shape and dtype: ``stored`` ones and those
    the lowering's transforms make (dequantized weights, concatenations)."""
    out = dict(stored)
    for tr in transforms:
        for name, entry in tr["tensors"].items():
            if tr["op"] == "dequantize":
                out[name] = (tuple(int(d) for d in entry["shape"]), getattr(torch, entry["dtype"]))
            else:
                shapes = [out[p][0] for p in entry]
                out[name] = ((sum(s[0] for s in shapes), *shapes[0][1:]), out[entry[0]][1])
    return {k: v for k, v in out.items() if k in read}


def apply_lowering(weights: dict[str, torch.Tensor], transforms: Sequence[dict[str, Any]]) -> None:
    """The lowering's weight transforms on embedded weights, at compile (the artifact stores the results)."""
    from ds4c.quant.packing import concat_weights, dequantize_weights

    for tr in transforms:
        (dequantize_weights if tr["op"] == "dequantize" else concat_weights)(weights, tr["tensors"])


def add_serving_entries(program: Program, serving: Program, batch: Mapping[str, int]) -> Program:
    """``program`` with the serving graphs of ``serving`` (trace_serving) and their attrs; ``batch``:
    the max_running / max_step_tokens the pools are planned for."""
    attrs = {**program.attrs, "serving": {**serving.attrs["serving"], "batch": dict(batch)},
             "graph_dim_names": {**program.attrs.get("graph_dim_names", {}), **serving.attrs["graph_dim_names"]}}
    return Program({**program.graphs, **serving.graphs}, attrs)


def serving_section(program: Program) -> dict[str, Any]:
    """The manifest's ``serving``: layout, rates, entry inputs, pools, batch and the planned pages."""
    return {**program.attrs["serving"], "pages": program.attrs.get("serving_pages")}


def _entry_points(program: Program, prefix: str = "") -> dict[str, Any]:
    out = {}
    for name, g in program.graphs.items():
        out[name] = {
            "ir": f"{prefix}ir/{name}.ds4ir",
            "consts": f"{prefix}consts/{name}.safetensors",
            "inputs": [{"name": i.value.name, "type": str(i.value.type)} for i in g.inputs if i.kind == "input"],
            "outputs": [n for n, _ in g.outputs],
            "ops": len(g.ops),
        }
    return out


__all__ = ["compile", "PRECISIONS"]
