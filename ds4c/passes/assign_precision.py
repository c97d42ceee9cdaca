"""assign_precision: choose a storage format per unit (linear, expert group, embedding).

Needs: ``ctx.options["precision"]`` (a policy of ds4c.quant.policy or a table file) and, to
measure, ``ctx.options["calibration"]`` (ds4c.quant.calibration.Calibration). Guarantees: the
graph is unchanged; ``program.attrs["precision"]`` holds the decision for every entry point (made
once, on the first graph): ``assignment`` (param -> format, for every param to be packed),
``activations`` (param -> the activation format its GEMM multiplies in, where not the compute
dtype: FP8 for FP8 linears and FP8 experts on targets with FP8 tensor cores, MXFP4 for MXFP4
linears on FP4 ones) and ``units`` (per unit: format, bytes, measured errors, why).
quantize_weights applies it.

Each unit's error per candidate format is measured alone (ds4c.quant.sensitivity), with its
input quantised too where the format's GEMM would multiply quantised activations. When the weights
fit in memory: by its effect on the model's output, the KL divergence of the next-token
distributions on calibration tokens (given, or generated from the model), one forward per
(unit, format) up to MAX_EFFECT_TRIALS, else by the NSR of the unit's own output on their
activations; otherwise on samples of the weights (a few experts, a slab of rows) drawn from the
source. ``error_bound`` bounds the sum over units (KL in nats, or NSR).

    before/after (IR unchanged), program.attrs["precision"]["units"][k]:
    {"unit": "model.layers.1.mlp.experts", "format": "mxfp4", "bytes": 17408, "error": 0.013, ...}
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ds4c.ir.graph import Graph
from ds4c.passes.manager import PassContext, register_pass
from ds4c.quant.calibration import Calibration, sample_shape
from ds4c.quant.formats import FORMATS, get_format
from ds4c.quant.policy import (
    ACTIVATION_FORMATS,
    AUTO_MENU,
    DEFAULT_ERROR_BOUND,
    DEFAULT_KL_BOUND,
    POLICIES,
    activation_format,
    choose,
    load_table,
)
from ds4c.quant.sensitivity import activation_errors, model_tokens, output_effects, weight_errors
from ds4c.quant.units import Unit, find_units

_LAYER = re.compile(r"layers\.\d+\.")  # a unit's role: its parameter names without the layer index
CALIBRATION_SEQUENCES = 2
CALIBRATION_LENGTH = 64
# (unit, format) trials measured by their effect on the model's output (a forward each); beyond
# it, by the NSR of each unit's own output (one forward in all)
MAX_EFFECT_TRIALS = 512
OUTPUT_KL = "output KL"


def _compute_name(graph: Graph) -> str:
    for v in graph.inputs_of_kind("param"):
        if v.type.dtype.is_floating_point and v.type.dtype.itemsize >= 2:
            return "fp32" if v.type.dtype == torch.float32 else "bf16"
    return "bf16"


def _measure(graph: Graph, units: list[Unit], cal: Calibration, formats: list[str], max_context: int,
             act_of) -> tuple[dict[str, dict[str, float]], str]:
    fmts = [get_format(f) for f in formats]
    runnable = not graph.inputs_of_kind("state") and [v.name for v in graph.inputs_of_kind("input")] == ["input_ids"]
    if cal.materialised and runnable:
        weights = cal.weights()
        tokens = cal.tokens
        if tokens is None:
            vocab = int(dict(graph.outputs)["logits"].type.shape[-1])
            tokens = model_tokens(graph, weights, vocab, sequences=CALIBRATION_SEQUENCES,
                                  length=max(2, min(CALIBRATION_LENGTH, max_context)))
        if len(units) * len(fmts) <= MAX_EFFECT_TRIALS:  # one forward each: the effect on the output
            return output_effects(graph, units, weights, tokens, fmts, act_of), OUTPUT_KL
        return activation_errors(graph, units, weights, tokens, fmts, act_of), "activations"
    errors, how = {}, set()
    gen = torch.Generator().manual_seed(0)
    for u in units:
        role = tuple(_LAYER.sub("layers.*.", p) for p in u.params), tuple(tuple(s) for s in u.shapes), tuple(formats)
        if cal.iid_by_role and role in cal.errors_cache:
            errors[u.name], kind = cal.errors_cache[role]
            how.add(kind)
            continue
        samples = [cal.sample(p, sample_shape(s)) if cal.sample else None for p, s in zip(u.params, u.shapes,
                                                                                         strict=True)]
        if any(s is None for s in samples):
            # no data to look at: the same shapes of Gaussian weights (what the format does to typical data)
            samples = [torch.randn(sample_shape(s), generator=gen) for s in u.shapes]
            how.add("estimated")
        else:
            how.add("weight samples")
        errors[u.name] = weight_errors(samples, fmts)
        cal.errors_cache[role] = (errors[u.name], "estimated" if "estimated" in how else "weight samples")
    return errors, "+".join(sorted(how)) or "not measured"


@register_pass("assign_precision")
def assign_precision(graph: Graph, ctx: PassContext) -> Graph:
    policy = ctx.options.get("precision")
    if policy is None or "precision" in ctx.program_attrs:
        return graph
    target = ctx.target
    compute = _compute_name(graph)
    units = find_units(graph)
    cal: Calibration | None = ctx.options.get("calibration")
    mode = ctx.options.get("activations") or "native"
    keeps_compute = policy in ("fp32", "bf16") or (policy == "auto" and target.backend == "reference")
    errors: dict[str, dict[str, float]] = {}
    measured = "not measured"
    if cal is not None and not keeps_compute and units:
        formats = list(AUTO_MENU)
        if policy not in POLICIES:
            formats += [f for _, f in load_table(policy) if f in FORMATS and f not in formats]
        def act_of(unit: Unit, fmt: str) -> str | None:  # activation format the unit's GEMM would multiply in
            act = activation_format(fmt, unit.kind, target, compute, mode)
            return None if act == compute else act

        errors, measured = _measure(graph, units, cal, formats, int(ctx.options.get("max_context") or 64), act_of)
    # the bound is on the sum of the chosen units' errors: KL in nats where the effect on the output
    # was measured, NSR otherwise
    bound = float(ctx.options.get("error_bound") or (DEFAULT_KL_BOUND if measured == OUTPUT_KL
                                                    else DEFAULT_ERROR_BOUND))
    choices = choose(units, errors, policy, target, compute, arrival=cal.arrival if cal else {}, bound=bound,
                     measured=measured, activations=mode)
    assignment = {p: c.format for c in choices if c.format != compute for p in c.params}
    used = {c.activations for c in choices}
    activations = {p: c.activations for c in choices if c.activations != compute for p in c.params}
    record: dict[str, Any] = {
        "policy": policy,
        "compute_dtype": compute,
        "error_bound": bound,
        "total_error": sum(c.error or 0.0 for c in choices),
        "measured": measured,
        "assignment": assignment,
        "activations": activations,
        "activation_mode": mode,
        "units": [c.to_dict() for c in choices],
        "activation_quantization": {k: v for k, v in ACTIVATION_FORMATS.items() if k in used},
    }
    ctx.program_attrs["precision"] = record
    return graph
