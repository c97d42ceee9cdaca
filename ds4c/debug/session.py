"""Drivers behind ``ds4c debug``: compile with a trace, make inputs, find divergences, bisect.

Every driver checks its options (entry point, tolerance, lengths) before compiling anything.
An artifact is debugged through the model it was compiled from: its manifest names the source
(a preset and seed, a checkpoint directory, an ONNX file) and the options that shaped the graph
(target, precision, context, pipeline, bisect limit), so the same compile is rerun with a trace
and every stage is compared; where the recompile's IR differs from the artifact's (another ds4c,
options the manifest does not replay), the artifact's own graph is compared with the recompile's.
Two artifacts of one model are compared side by side whatever their precision or context: each
runs on its own weights, on inputs both accept; values whose shapes differ (state sized by the
context) are left out and named.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ds4c.debug.numerics import (
    Divergence,
    Feed,
    bisect_rewrites,
    comparable,
    compare_graphs,
    find_divergence,
    run_capturing,
)
from ds4c.debug.trace import CompileTrace
from ds4c.errors import InputError

ENTRIES = ("prefill", "decode")
DEFAULT_SEQ_LEN = 64


def check_options(*, entry: str = "prefill", atol: float = 1e-4, seq_len: int | None = None,
                  max_context: int | None = None) -> None:
    """Refuse impossible debug options before any compile."""
    if entry not in ENTRIES:
        raise InputError(f"--entry {entry}: choose {' or '.join(ENTRIES)}")
    if not math.isfinite(atol) or atol < 0:
        raise InputError(f"--atol {atol}: give a tolerance of 0 or more, e.g. 1e-4")
    if max_context is not None and max_context < 1:
        raise InputError(f"--max-context must be positive, got {max_context}")
    least = 2 if entry == "decode" else 1  # decode continues from a prefill of all tokens but the last
    if seq_len is not None and seq_len < least:
        raise InputError(f"--seq-len {seq_len}: @{entry} needs at least {least} token{'s' if least > 1 else ''}; "
                         "give more")
    if seq_len is not None and max_context is not None and seq_len > max_context:
        raise InputError(f"--seq-len {seq_len} exceeds the maximum context {max_context}; give a shorter "
                         f"--seq-len or a larger --max-context")


def sample_inputs(vocab_size: int, max_context: int, *, seq_len: int | None = None, batch: int = 1,
                  seed: int = 0) -> torch.Tensor:
    n = seq_len or min(max_context, DEFAULT_SEQ_LEN)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, n), generator=g)


def _entry_inputs(trace_or_graphs: dict[str, Any], entry: str, ids: torch.Tensor, params: dict[str, torch.Tensor]):
    """Inputs and state for one entry point; decode continues from a prefill of ``ids``."""
    if entry == "prefill":
        return {"input_ids": ids}, None
    prefill = trace_or_graphs["prefill"]
    outs, _ = run_capturing(prefill, {"input_ids": ids[:, :-1]}, params)
    state = {k: v for k, v in outs.items() if k != "logits"}
    return {"input_ids": ids[:, -1:], "position": torch.tensor(ids.shape[1] - 1)}, state


def _static_ids_shape(graphs: dict[str, Any]) -> list[int] | None:
    """[batch, seq] of @prefill's input when fixed (an ONNX import), else None."""
    graph = graphs.get("prefill")
    for inp in graph.inputs if graph is not None else ():
        if inp.kind == "input" and inp.value.name == "input_ids" and getattr(inp.value.type, "is_static", False):
            return [int(d) for d in inp.value.type.shape]
    return None


def _need_entry(graphs: dict[str, Any], entry: str, what: str) -> None:
    if entry not in graphs or (entry == "decode" and "prefill" not in graphs):
        raise InputError(f"{what} has no @{entry} to compare (it has {', '.join(sorted(graphs))}); choose "
                         f"--entry {' or '.join(g for g in ENTRIES if g in graphs) or 'prefill'}")


def with_concat_parts(weights: dict[str, torch.Tensor], transforms: Sequence[dict[str, Any]],
                      graphs: Any) -> dict[str, torch.Tensor]:
    """``weights`` plus the parts of each concatenation the lowering made (``concat`` transforms)
    that the artifact does not store, as row views of it: the graphs before ``merge_sibling_linears``
    read them. ``graphs``: graphs whose parameter types give each part's rows."""
    rows = {v.name: int(v.type.shape[0]) for g in graphs for v in g.inputs_of_kind("param")}
    out = dict(weights)
    for tr in transforms:
        if tr["op"] != "concat":
            continue
        for name, parts in tr["tensors"].items():
            if name in out and not all(p in out for p in parts) and all(p in rows for p in parts):
                out.update(zip(parts, torch.split(out[name], [rows[p] for p in parts], 0), strict=True))
    return out


def numerics_for_model(model: Any, *, target: str = "cpu", pipeline: str | Sequence[str] = "default",
                       entry: str = "prefill", atol: float = 1e-4, seq_len: int | None = None,
                       max_context: int | None = None, seed: int = 0,
                       lowering: Mapping[str, bool] | None = None) -> tuple[Divergence | None, CompileTrace]:
    """The first pass (and op) whose graph diverges when ``model`` compiles for ``target`` (fp32
    weights): a Triton target's named pipeline includes its GPU lowering stage, with the compile
    options ``lowering``."""
    import ds4c

    check_options(entry=entry, atol=atol, seq_len=seq_len, max_context=max_context)
    trace = CompileTrace()
    art = ds4c.compile(model, target=target, precision="fp32", pipeline=pipeline, instruments=[trace],
                       weights="embed", max_context=max_context, progress=False, verify=False, lowering=lowering)
    params = art.weights or {}
    cfg = art.manifest["model"]["config"]
    if not trace.graph_names:
        raise InputError("the pipeline runs no passes, so there is nothing to compare; give --pipeline default or "
                         "pass names")
    first = {g: trace.stages(g)[0].graph for g in trace.graph_names}
    params = with_concat_parts(params, art.manifest["weights"].get("transforms", []), first.values())
    _need_entry(first, entry, f"model {model}")
    check_options(entry=entry, atol=atol, seq_len=seq_len, max_context=art.manifest["max_context"])
    ids = sample_inputs(cfg["vocab_size"], art.manifest["max_context"], seq_len=seq_len, seed=seed)
    inputs, state = _entry_inputs(first, entry, ids, params)
    return find_divergence(trace, inputs, params, graph=entry, state=state, atol=atol), trace


def is_artifact(model: Any) -> bool:
    """Whether ``model`` names a ds4c artifact file (rather than a preset or a checkpoint)."""
    return isinstance(model, str | Path) and Path(model).suffix == ".ds4" and Path(model).is_file()


def artifact_source(manifest: dict[str, Any], path: str | Path) -> tuple[Any, int | None, str]:
    """(model to compile, preset seed, description) of the model an artifact was compiled from."""
    source = manifest["model"].get("source") or {}
    kind, name = source.get("kind"), source.get("name")
    if kind == "preset":
        return name, source.get("seed"), f"preset '{name}' (seed {source.get('seed')})"
    if kind in ("checkpoint", "onnx"):
        where = Path(str(source.get("path") or name))
        if not where.exists():
            raise InputError(f"{path} was compiled from the {kind} {where}, which is not there any more; debug "
                             f"that {kind} where it is now (`ds4c debug numerics DIR`)")
        return where, None, f"{kind} {where}"
    raise InputError(f"{path} was compiled from a {kind or 'model'} ('{name}') that cannot be rebuilt from its "
                     "manifest; debug the model itself (ds4c.debug.session.numerics_for_model)")


def numerics_for_artifact(path: str | Path, *, entry: str = "prefill", atol: float = 1e-4, seq_len: int | None = None,
                          seed: int = 0) -> tuple[Divergence | None, list[str]]:
    """The first pass (and op) whose graph diverges, for the pipeline that made the artifact at
    ``path``: its model recompiled with a trace as the manifest records it. Returns (divergence or
    None, notes saying what was recompiled and how it relates to the artifact)."""
    import ds4c
    from ds4c.artifact.artifact import read_artifact
    from ds4c.frontend.source import load_weights
    from ds4c.ir.printer import print_graph
    from ds4c.runtime.model import _dtype, apply_transforms

    check_options(entry=entry, atol=atol, seq_len=seq_len)
    manifest, program, _ = read_artifact(path)
    _need_entry(program.graphs, entry, f"artifact {path}")
    check_options(entry=entry, atol=atol, seq_len=seq_len, max_context=int(manifest["max_context"]))
    model, preset_seed, described = artifact_source(manifest, path)
    precision = manifest["precision"]
    trace = CompileTrace()
    art = ds4c.compile(model, target=manifest["target"]["name"], precision=precision["policy"],
                       max_context=manifest["max_context"], pipeline=manifest["pipeline"], instruments=[trace],
                       weights="embed", seed=preset_seed, bisect=(manifest.get("rewrites") or {}).get("bisect_limit"),
                       activations=precision.get("activation_mode", "native"), progress=False, verify=False,
                       lowering=(manifest.get("lowering") or {}).get("options"))
    notes = [f"{Path(path).name}: {described}, target {manifest['target']['name']}, precision {precision['policy']} "
             f"({precision['compute_dtype']}), max context {manifest['max_context']}; recompiled with a trace "
             f"through its {len(manifest['pipeline'])} passes"]
    # every stage's weights: the source's, in the compute dtype, and packed where the pipeline packs
    wman = art.manifest["weights"]
    provided = {k: (tuple(v["shape"]), _dtype(v["dtype"]))
                for k, v in (wman.get("source_tensors") or wman["tensors"]).items()}
    params = load_weights(wman["source"], provided, dtype=_dtype(wman["dtype"]))
    params = {**apply_transforms(params, wman.get("transforms", []), keep=set(params)), **(art.weights or {})}
    first = {g: trace.stages(g)[0].graph for g in trace.graph_names}
    shape = _static_ids_shape(first)
    ids = sample_inputs(manifest["model"]["config"]["vocab_size"], int(manifest["max_context"]),
                        seq_len=shape[1] if shape else seq_len, batch=shape[0] if shape else 1, seed=seed)
    inputs, state = _entry_inputs(first, entry, ids, params)
    divergence = find_divergence(trace, inputs, params, graph=entry, state=state, atol=atol)
    if print_graph(art.program.graphs[entry]) == print_graph(program.graphs[entry]):
        notes.append(f"the recompile's @{entry} IR equals the artifact's")
        return divergence, notes
    notes.append(f"the recompile's @{entry} IR differs from the artifact's (another ds4c, or options its manifest "
                 "does not record); the artifact's own graph is compared with the recompile's too")
    if divergence is not None:
        return divergence, notes
    stored = ds4c.load(path, backend="reference")
    b_inputs, b_state = _entry_inputs(stored.program.graphs, entry, ids, stored.weights)
    return compare_graphs(art.program.graphs[entry], stored.program.graphs[entry], inputs, params, state, atol,
                          label=f"{Path(path).name} as stored vs recompiled",
                          b_feed=Feed(b_inputs, stored.weights, b_state)), notes


def _describe(manifest: dict[str, Any]) -> dict[str, str]:
    precision, source = manifest["precision"], manifest["model"].get("source") or {}
    return {"source": f"{source.get('kind')} '{source.get('name')}'", "target": manifest["target"]["name"], "precision": f"{precision['policy']} ({precision['compute_dtype']})",
            "max context": str(manifest["max_context"]), "pipeline": ",".join(manifest.get("pipeline") or []) or "none",
            "weights": manifest["weights"]["mode"]}


def numerics_for_artifacts(a: str | Path, b: str | Path, *, entry: str = "prefill", atol: float = 1e-4,
                           seq_len: int | None = None, seed: int = 0) -> tuple[Divergence | None, list[str]]:
    """Artifacts ``a`` and ``b`` of one model side by side on the same tokens, each on its own weights:
    (divergence of ``b`` from ``a`` or None, notes on what differs between them and what was left out)."""
    import ds4c

    check_options(entry=entry, atol=atol, seq_len=seq_len)
    ma, mb = ds4c.load(a, backend="reference"), ds4c.load(b, backend="reference")
    ca, cb = ma.manifest["model"]["config"], mb.manifest["model"]["config"]
    if ca != cb:
        fields = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        raise InputError(f"{a} and {b} compile different models (config fields differ: {', '.join(fields[:6])}); "
                         "compare artifacts of one model")
    for m, where in ((ma, a), (mb, b)):
        _need_entry(m.program.graphs, entry, f"artifact {where}")
    da, db = _describe(ma.manifest), _describe(mb.manifest)
    differ = [f"{k} {da[k]} vs {db[k]}" for k in da if da[k] != db[k]]
    notes = [f"{Path(a).name} vs {Path(b).name}: " + ("; ".join(differ) if differ else "same options")]
    context = min(ma.max_context, mb.max_context)
    check_options(entry=entry, atol=atol, seq_len=seq_len, max_context=context)
    shapes = {str(s) for s in (_static_ids_shape(ma.program.graphs), _static_ids_shape(mb.program.graphs)) if s}
    if len(shapes) > 1:
        raise InputError(f"{a} and {b} take prompts of different fixed shapes ({' vs '.join(sorted(shapes))}); "
                         "there is no input both run on")
    shape = _static_ids_shape(ma.program.graphs) or _static_ids_shape(mb.program.graphs)
    ids = sample_inputs(ma.vocab_size, context, seq_len=shape[1] if shape else seq_len,
                        batch=shape[0] if shape else 1, seed=seed)
    inputs, state = _entry_inputs(ma.program.graphs, entry, ids, ma.weights)
    b_inputs, b_state = _entry_inputs(mb.program.graphs, entry, ids, mb.weights)
    ga, gb = ma.program.graphs[entry], mb.program.graphs[entry]
    outs_a, _ = run_capturing(ga, inputs, ma.weights, state)
    outs_b, _ = run_capturing(gb, b_inputs, mb.weights, b_state)
    skipped = sorted(k for k in outs_a if k in outs_b and not comparable(outs_a[k], outs_b[k]))
    notes.append(f"compared on {ids.shape[1]} tokens" + (f"; left out, shapes differ: {', '.join(skipped)}"
                                                         if skipped else ""))
    return compare_graphs(ga, gb, inputs, ma.weights, state, atol, label=f"{Path(b).name} vs {Path(a).name}",
                          b_feed=Feed(b_inputs, mb.weights, b_state), comparable_only=True), notes


def bisect_model(model: Any, *, target: str = "cpu", pipeline: str | Sequence[str] = "default",
                 entry: str = "prefill", atol: float = 1e-4, seq_len: int | None = None,
                 max_context: int | None = None, seed: int = 0,
                 lowering: Mapping[str, bool] | None = None) -> dict[str, Any]:
    """Find the first rewrite after which the compiled graph no longer matches the traced one.

    The model is traced once; the pipeline then reruns with ``bisect_limit = N`` for O(log n) values of N
    (for a Triton ``target``, with its GPU lowering stage and the compile options ``lowering``), as
    ``ds4c compile --bisect N`` would run it.
    """
    import ds4c
    from ds4c.compiler import apply_lowering
    from ds4c.passes.manager import PassContext, PassManager, check_lowering_options, check_pipeline_options
    from ds4c.targets import get_target

    check_options(entry=entry, atol=atol, seq_len=seq_len, max_context=max_context)
    lowering_options = check_lowering_options(lowering)
    check_pipeline_options(pipeline, target=get_target(target))
    if is_artifact(model):
        raise InputError(f"{model} is an artifact: bisect reruns the passes over a fresh trace of a model; give the "
                         "model it was compiled from (`ds4c inspect` shows its source)")
    base = ds4c.compile(model, target=target, precision="fp32", pipeline="none", weights="embed",
                        max_context=max_context, progress=False, verify=False)
    params = base.weights or {}
    cfg = base.manifest["model"]["config"]
    _need_entry(base.program.graphs, entry, f"model {model}")
    check_options(entry=entry, atol=atol, seq_len=seq_len, max_context=base.manifest["max_context"])
    ids = sample_inputs(cfg["vocab_size"], base.manifest["max_context"], seq_len=seq_len, seed=seed)
    inputs, state = _entry_inputs(base.program.graphs, entry, ids, params)
    want, _ = run_capturing(base.program.graphs[entry], inputs, params, state)
    logs: dict[int | None, list] = {}

    def attempt(limit: int | None) -> tuple[int, bool]:
        ctx = PassContext(target=get_target(target), options={"max_context": base.manifest["max_context"],
                                                              **lowering_options}, bisect_limit=limit)
        prog = PassManager(pipeline, ctx=ctx).run(base.program)
        lowered = dict(params)
        apply_lowering(lowered, prog.attrs.get("weight_transforms") or [])
        got, _ = run_capturing(prog.graphs[entry], inputs, lowered, state)
        err = max((float((got[k].double() - want[k].double()).abs().max()) for k in want
                   if isinstance(got[k], torch.Tensor)), default=0.0)
        logs[limit] = ctx.rewrite_log
        return len(ctx.rewrite_log), err <= atol

    first_bad, runs = bisect_rewrites(attempt)
    out: dict[str, Any] = {"first_bad_rewrite": first_bad, "runs": runs, "total_rewrites": len(logs[None])}
    if first_bad is not None:
        index, pass_name, what, _ = logs[None][first_bad]
        out.update({"pass": pass_name, "rewrite": what})
    return out
