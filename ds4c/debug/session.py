"""Drivers behind ``ds4c debug``: compile with a trace, make inputs, find divergences, bisect."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ds4c.debug.numerics import Divergence, bisect_rewrites, compare_graphs, find_divergence, run_capturing
from ds4c.debug.trace import CompileTrace
from ds4c.errors import Ds4cError


def sample_inputs(vocab_size: int, max_context: int, *, seq_len: int | None = None, batch: int = 1,
                  seed: int = 0) -> torch.Tensor:
    n = seq_len or min(max_context, 64)
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


def numerics_for_model(model: Any, *, target: str = "cpu", pipeline: str | Sequence[str] = "default",
                       entry: str = "prefill", atol: float = 1e-4, seq_len: int | None = None,
                       max_context: int | None = None, seed: int = 0) -> tuple[Divergence | None, CompileTrace]:
    import ds4c

    trace = CompileTrace()
    art = ds4c.compile(model, target=target, precision="fp32", pipeline=pipeline, instruments=[trace],
                       weights="embed", max_context=max_context, progress=False, verify=False)
    params = art.weights or {}
    cfg = art.manifest["model"]["config"]
    ids = sample_inputs(cfg["vocab_size"], art.manifest["max_context"], seq_len=seq_len, seed=seed)
    first = {g: trace.stages(g)[0].graph for g in trace.graph_names}
    inputs, state = _entry_inputs(first, entry, ids, params)
    return find_divergence(trace, inputs, params, graph=entry, state=state, atol=atol), trace


def numerics_for_artifacts(a: str | Path, b: str | Path, *, entry: str = "prefill", atol: float = 1e-4,
                           seq_len: int | None = None, seed: int = 0) -> Divergence | None:
    import ds4c

    ma, mb = ds4c.load(a), ds4c.load(b)
    if ma.manifest["model"]["config"] != mb.manifest["model"]["config"]:
        raise Ds4cError(f"{a} and {b} compile different models; compare artifacts of one model")
    ids = sample_inputs(ma.vocab_size, min(ma.max_context, mb.max_context), seq_len=seq_len, seed=seed)
    inputs, state = _entry_inputs(ma.program.graphs, entry, ids, ma.weights)
    return compare_graphs(ma.program.graphs[entry], mb.program.graphs[entry], inputs, ma.weights, state, atol,
                          label=f"{Path(b).name} vs {Path(a).name}")


def bisect_model(model: Any, *, target: str = "cpu", pipeline: str | Sequence[str] = "default",
                 entry: str = "prefill", atol: float = 1e-4, seq_len: int | None = None,
                 max_context: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Find the first rewrite after which the compiled graph no longer matches the traced one.

    The model is traced once; the pipeline then reruns with ``bisect_limit = N`` for O(log n) values of N.
    """
    import ds4c
    from ds4c.passes.manager import PassContext, PassManager
    from ds4c.targets import get_target

    base = ds4c.compile(model, target=target, precision="fp32", pipeline="none", weights="embed",
                        max_context=max_context, progress=False, verify=False)
    params = base.weights or {}
    cfg = base.manifest["model"]["config"]
    ids = sample_inputs(cfg["vocab_size"], base.manifest["max_context"], seq_len=seq_len, seed=seed)
    inputs, state = _entry_inputs(base.program.graphs, entry, ids, params)
    want, _ = run_capturing(base.program.graphs[entry], inputs, params, state)
    logs: dict[int | None, list] = {}

    def attempt(limit: int | None) -> tuple[int, bool]:
        ctx = PassContext(target=get_target(target), options={"max_context": base.manifest["max_context"]},
                          bisect_limit=limit)
        prog = PassManager(pipeline, ctx=ctx).run(base.program)
        got, _ = run_capturing(prog.graphs[entry], inputs, params, state)
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
