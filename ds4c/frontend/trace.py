"""Build ds4c's export-friendly model on the meta device and trace both entry points into IR.

Weights stay on the meta device (compiling ``pro`` never materialises 1.6T parameters); only the
small buffers the model computes at construction (RoPE tables) are real, and they become ``const``
inputs of the graphs.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ds4c.errors import IRError
from ds4c.frontend.fx_import import import_exported_program
from ds4c.ir.graph import Program


@dataclass(frozen=True)
class EntryPointInfo:
    inputs: list[str]
    outputs: list[str]
    state: list[dict[str, Any]]


def build_meta_model(config: Any, max_context: int, dtype: torch.dtype, *, mtp: bool = False) -> torch.nn.Module:
    from ds4c.models.deepseek_v4 import DeepseekV4Model

    with torch.device("meta"):
        model = DeepseekV4Model(config, max_context, mtp=mtp)
    # Parameters (not buffers) take the compute dtype; RoPE buffers keep their own.
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model.eval()


def param_spec(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every weight the checkpoint must provide: the model's state_dict minus non-persistent buffers."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


# Traces kept per process: (config, max_context, dtype, per_kind) -> (graphs, attrs). A trace
# depends on nothing else (weights stay on the meta device), and torch.export is most of a small
# model's compile time (tiny: ~20 of ~25 s on a 2-core CPU), so compiling one model for several
# targets or precisions in one process traces it once. The cache and every caller hold shallow
# copies of the graphs (ops and values are immutable; passes return new graphs) and own attrs.
TRACE_CACHE_SIZE = 8
_TRACES: OrderedDict[tuple, tuple[dict[str, Any], dict[str, Any]]] = OrderedDict()


def _cached(key: tuple, disk_key: str, build) -> Program:
    """The program of ``key``: from this process's cache, else the disk cache, else ``build()``."""
    from ds4c.frontend import trace_cache

    if key in _TRACES:
        _TRACES.move_to_end(key)
        graphs, attrs = _TRACES[key]
        return Program({n: g.copy() for n, g in graphs.items()}, copy.deepcopy(attrs))
    program = trace_cache.load(disk_key)
    if program is None:
        program = build()
        trace_cache.store(disk_key, program)
    _TRACES[key] = ({n: g.copy() for n, g in program.graphs.items()}, copy.deepcopy(program.attrs))
    while len(_TRACES) > TRACE_CACHE_SIZE:
        _TRACES.popitem(last=False)
    return program


def trace_program(config: Any, max_context: int, dtype: torch.dtype = torch.float32, *,
                  per_kind: bool = True) -> tuple[Program, torch.nn.Module]:
    """Trace prefill and decode into a Program; returns it with the (meta) model it describes.

    With ``per_kind`` (default) a model whose layers repeat kinds is traced as a proxy holding one
    layer per kind, and each entry point is stitched back to all layers (``ds4c.frontend.stitch``):
    torch.export's cost then grows with the number of kinds, not of layers. A trace of the same
    (config, max_context, dtype) earlier in the process is reused (``_TRACES``), and one of an
    earlier process is read back from disk (``ds4c.frontend.trace_cache``).
    """
    from ds4c.frontend import trace_cache

    model = build_meta_model(config, max_context, dtype)
    key = (repr(config), int(max_context), str(dtype), per_kind)
    disk_key = trace_cache.trace_key(config, max_context, dtype, per_kind)
    return _cached(key, disk_key, lambda: _trace_program(config, model, max_context, dtype, per_kind)), model


def trace_serving(config: Any, max_context: int, layout: Any, dtype: torch.dtype = torch.float32, *,
                  per_kind: bool = True, mtp: bool = False) -> Program:
    """Trace the serving entry points ``ragged_step`` and ``ragged_decode`` (``DeepseekV4Model.step``
    and ``decode_step`` over the paged pools of ``layout``, a ``PageLayout``) into a Program of their
    own, with ``attrs["serving"]`` (layout, compression rates, inputs, pools) and per-graph dim
    names; per-kind tracing, stitching and caching as ``trace_program``."""
    from ds4c.frontend import trace_cache

    model = build_meta_model(config, max_context, dtype, mtp=mtp)
    model.paged_state_specs(layout, 2, 2, 2)  # refuses a layout the model cannot use, before tracing
    extra = f"serving:{layout!r}" + (":mtp" if mtp else "")
    key = (repr(config), int(max_context), str(dtype), per_kind, extra)
    disk_key = trace_cache.trace_key(config, max_context, dtype, per_kind, extra)
    return _cached(key, disk_key, lambda: _trace_serving(config, model, max_context, dtype, layout, per_kind))


def _trace_serving(config: Any, model: torch.nn.Module, max_context: int, dtype: torch.dtype, layout: Any,
                   per_kind: bool) -> Program:
    from ds4c.frontend.stitch import proxy_plan, stitch_graph
    from ds4c.models.deepseek_v4.model import (
        DECODE_STEP_INPUTS,
        MTP_STEP_INPUTS,
        STEP_DIMS,
        STEP_INPUTS,
        pool_dim,
    )

    mtp = model.has_mtp
    plan = proxy_plan(config) if per_kind else None
    if plan is None:
        graphs = _trace_serving_graphs(model, layout)
    else:
        proxy_config, kind_of_layer = plan
        proxy = _trace_serving_graphs(build_meta_model(proxy_config, max_context, dtype, mtp=mtp), layout)
        # the MTP block's graph holds no main-model layer: nothing to stitch
        graphs = {name: g if name == "mtp_step" else stitch_graph(g, kind_of_layer, proxy_config.num_hidden_layers)
                  for name, g in proxy.items()}
    specs = model.paged_state_specs(layout, 2, 2, 2)
    pool_names = [s.name for s in specs]
    heads = ["logits", "hidden"] if mtp else ["logits"]
    for name, g in graphs.items():
        if name == "mtp_step":
            continue
        got = [n for n, _ in g.outputs]
        if got != [*heads, *pool_names]:
            raise IRError(f"traced graph @{name} returns {got[:4]}..., expected {', '.join(heads)} and the pools in order")
    pools = {s.name: [pool_dim(s.name)] for s in specs}
    kinds = {"PW": "window", "PC": "compressed", "SLOTS": "slots"}

    def records(state_specs) -> list[dict[str, Any]]:
        return [{"name": s.name, "pool": kinds[pool_dim(s.name)], "shape": [pool_dim(s.name), *s.shape[1:]],
                 "dtype": str(s.dtype).removeprefix("torch.")} for s in state_specs]

    attrs = {
        "graph_dim_names": {
            "ragged_step": {**{n: [STEP_DIMS[n]] for n in STEP_INPUTS}, **pools},
            "ragged_decode": {**{n: ["R"] for n in DECODE_STEP_INPUTS}, **pools},
        },
        "serving": {
            "layout": layout.record(),
            "rates": model.compression_rates(),
            "inputs": {"ragged_step": list(STEP_INPUTS), "ragged_decode": list(DECODE_STEP_INPUTS)},
            "pools": records(specs),
        },
        "max_context": max_context,
        "model_config": {"hc_sinkhorn_iters": config.hc_sinkhorn_iters, "hc_mult": config.hc_mult,
                         "swiglu_limit": config.swiglu_limit},
    }
    if mtp:
        mtp_specs = model.mtp_state_specs(layout, 2)
        attrs["graph_dim_names"]["mtp_step"] = {"hidden": ["N"], **{n: [STEP_DIMS[n]] for n in MTP_STEP_INPUTS},
                                                **{s.name: [pool_dim(s.name)] for s in mtp_specs}}
        attrs["serving"]["mtp"] = {"inputs": ["hidden", *MTP_STEP_INPUTS], "pools": records(mtp_specs),
                                   "hidden": [config.hc_mult, config.hidden_size],
                                   "dtype": str(dtype).removeprefix("torch.")}
    return Program(graphs, attrs)


def _trace_serving_graphs(model: torch.nn.Module, layout: Any) -> dict[str, Any]:
    from ds4c.models.deepseek_v4.model import (
        DECODE_STEP_INPUTS,
        MTP_STEP_INPUTS,
        STEP_INPUTS,
        export_serving_entry_points,
    )

    eps = export_serving_entry_points(model, layout)
    pools = [s.name for s in model.paged_state_specs(layout, 2, 2, 2)]
    heads = ["logits", "hidden"] if model.has_mtp else ["logits"]
    graphs = {name: import_exported_program(eps[name], name, input_names=list(inputs), state_names=pools,
                                            decompose=False, output_names=[*heads, *pools],
                                            param_prefix=_prefix(eps[name]))
              for name, inputs in (("ragged_step", STEP_INPUTS), ("ragged_decode", DECODE_STEP_INPUTS))}
    if model.has_mtp:
        mtp_pools = [s.name for s in model.mtp_state_specs(layout, 2)]
        graphs["mtp_step"] = import_exported_program(eps["mtp_step"], "mtp_step",
                                                     input_names=["hidden", *MTP_STEP_INPUTS], state_names=mtp_pools,
                                                     decompose=False, output_names=["logits", "hidden", *mtp_pools],
                                                     param_prefix=_prefix(eps["mtp_step"]))
    return graphs


def _trace_program(config: Any, model: torch.nn.Module, max_context: int, dtype: torch.dtype,
                   per_kind: bool) -> Program:
    from ds4c.frontend.stitch import proxy_plan, stitch_graph

    plan = proxy_plan(config) if per_kind else None
    if plan is None:
        graphs = _trace_graphs(model)
    else:
        proxy_config, kind_of_layer = plan
        proxy = _trace_graphs(build_meta_model(proxy_config, max_context, dtype))
        graphs = {name: stitch_graph(g, kind_of_layer, proxy_config.num_hidden_layers) for name, g in proxy.items()}
    specs = model.state_specs(1)
    state_names = [s.name for s in specs]
    for name, g in graphs.items():
        got = [n for n, _ in g.outputs]
        if got != ["logits", *state_names]:
            raise IRError(f"traced graph @{name} returns {got[:4]}..., expected logits and the model state in order")
    attrs = {
        "dim_names": {"input_ids": ["B", "S"], **{n: ["B"] for n in state_names}},
        "state": [{"name": s.name, "shape": ["B", *s.shape[1:]], "dtype": str(s.dtype).removeprefix("torch."),
                   "fill": s.fill} for s in specs],
        "max_context": max_context,
        # facts fusion patterns check against (e.g. a Sinkhorn chain must have the model's length)
        "model_config": {"hc_sinkhorn_iters": config.hc_sinkhorn_iters, "hc_mult": config.hc_mult,
                         "swiglu_limit": config.swiglu_limit},
    }
    return Program(graphs, attrs)


def _trace_graphs(model: torch.nn.Module) -> dict[str, Any]:
    from ds4c.models.deepseek_v4 import export_entry_points

    eps = export_entry_points(model)
    state_names = [s.name for s in model.state_specs(1)]
    return {
        "prefill": import_exported_program(eps["prefill"], "prefill", input_names=["input_ids"], state_names=[], decompose=False,
                                           output_names=["logits", *state_names], param_prefix=_prefix(eps["prefill"])),
        "decode": import_exported_program(eps["decode"], "decode", input_names=["input_ids", "position"], decompose=False,
                                          state_names=state_names, output_names=["logits", *state_names],
                                          param_prefix=_prefix(eps["decode"])),
    }


def _prefix(ep: torch.export.ExportedProgram) -> str:
    """The attribute path under which the wrapper holds the model ('model.' for PrefillEntry(model))."""
    names = [s.target for s in ep.graph_signature.input_specs if s.target]
    from ds4c.models.deepseek_v4 import model as model_mod

    prefix = getattr(model_mod, "ENTRY_PARAM_PREFIX", "")
    if prefix and all(n.startswith(prefix) for n in names):
        return prefix
    return ""
