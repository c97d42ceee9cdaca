"""Per-kind tracing + stitching gives the graph a whole-model trace gives, and the same numbers."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import pytest
import torch

from ds4c.errors import IRError
from ds4c.frontend.stitch import proxy_plan, stitch_graph
from ds4c.frontend.trace import param_spec, trace_program
from ds4c.ir.interpreter import run_graph
from ds4c.ir.printer import print_graph
from ds4c.models.deepseek_v4 import ModelConfig
from ds4c.models.deepseek_v4.presets import PRESETS, init_preset_weights


def _config(**changes) -> ModelConfig:
    cfg = ModelConfig.from_hf_dict(PRESETS["tiny"])
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _structure(graph) -> dict[str, str]:
    """Per output, a hash of the whole expression computing it (op names, attributes, types,
    operands; graph inputs by name): equal iff the computations are equal, whatever the op order
    or SSA spelling."""
    memo = {gi.value: "in:" + gi.value.name for gi in graph.inputs}

    def enc(a):
        if isinstance(a, list | tuple):
            return "[" + ",".join(enc(x) for x in a) + "]"
        return memo.get(a, repr(a)) if hasattr(a, "type") else repr(a)

    for op in graph.ops:
        h = hashlib.sha256(f"{op.name}|{enc(list(op.args))}|{sorted((k, enc(v)) for k, v in op.kwargs.items())}|"
                           f"{[str(r.type) for r in op.results]}".encode()).hexdigest()[:24]
        for j, r in enumerate(op.results):
            memo[r] = f"{h}.{j}"
    return {name: memo[v] for name, v in graph.outputs}


def test_tiny_layer_kinds_repeat():
    plan = proxy_plan(_config())
    assert plan is not None
    proxy, kinds = plan
    assert proxy.num_hidden_layers == 3 and kinds == [0, 1, 2, 1]


@pytest.fixture(scope="module")
def traces():
    cfg = _config()
    stitched, model = trace_program(cfg, 64, per_kind=True)
    whole, _ = trace_program(cfg, 64, per_kind=False)
    return stitched, whole, model


@pytest.mark.parametrize("entry", ["prefill", "decode"])
def test_stitched_graph_equals_whole_trace(traces, entry):
    stitched, whole, _ = traces
    a, b = stitched.graphs[entry], whole.graphs[entry]
    assert [n for n, _ in a.outputs] == [n for n, _ in b.outputs]
    # same inputs (torch.export lists parameters before buffers; the stitched graph goes layer by layer)
    assert sorted((i.kind, i.value.name, str(i.value.type)) for i in a.inputs) == \
        sorted((i.kind, i.value.name, str(i.value.type)) for i in b.inputs)
    assert [i.value.name for i in a.inputs if i.kind == "input"] == [i.value.name for i in b.inputs if i.kind == "input"]
    assert _structure(a) == _structure(b)
    # tensor ops one for one; scalar size arithmetic export shares across layers may be repeated
    # per layer copy (cse merges it)
    tensor_ops = lambda g: {k: n for k, n in g.op_counts().items() if not k.startswith("sym.")}  # noqa: E731
    assert tensor_ops(a) == tensor_ops(b)
    print_graph(a)  # prints (unique SSA names)


def test_stitched_program_runs_like_whole_trace(traces):
    stitched, whole, model = traces
    weights = dict(init_preset_weights(param_spec(model), seed=3))
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(0))
    out_a = run_graph(stitched.graphs["prefill"], {"input_ids": ids}, weights)
    out_b = run_graph(whole.graphs["prefill"], {"input_ids": ids}, weights)
    assert out_a.keys() == out_b.keys()
    for k in out_a:
        torch.testing.assert_close(out_a[k], out_b[k], rtol=0, atol=0)


def test_interleaved_layers_are_refused(traces):
    _, whole, _ = traces
    g = whole.graphs["decode"]  # as a "proxy" where every layer is its own kind
    assert len(stitch_graph(g, [0, 1, 2, 3], 4).ops) >= len(g.ops) - 16
    ops = list(g.ops)
    # move an op of layer 0 behind layer 1's first op
    i0 = next(i for i, op in enumerate(ops) if op.loc and op.loc.startswith("model.layers.0.self_attn.q_a_proj"))
    i1 = next(i for i, op in enumerate(ops) if op.loc and op.loc.startswith("model.layers.1"))
    ops.insert(i1 + 1, ops.pop(i0))
    with pytest.raises(IRError, match="inside layer|segment|interleaved|before it is defined"):
        stitch_graph(g.copy(ops=ops), [0, 1, 2, 3], 4)


def test_a_trace_is_reused_within_the_process(traces, monkeypatch, tmp_path):
    """Tracing the same config, context and dtype again returns the first trace (torch.export is
    most of a small model's compile time) with attrs of its own; another context traces anew."""
    import ds4c.frontend.trace as trace_mod
    from ds4c.ir.graph import Program

    monkeypatch.setenv("DS4C_CACHE_DIR", str(tmp_path))  # an empty disk cache (tests/frontend/test_trace_cache.py)

    stitched, _, _ = traces
    calls = []  # max_context of every real trace; other tests of this process may have traced 48 already
    monkeypatch.setattr(trace_mod, "_TRACES", OrderedDict((k, v) for k, v in trace_mod._TRACES.items() if k[1] == 64))
    monkeypatch.setattr(trace_mod, "_trace_program", lambda *a: calls.append(a[2]) or Program({}, {"max_context": a[2]}))
    again, model = trace_program(_config(), 64, per_kind=True)
    assert calls == [] and param_spec(model) == param_spec(traces[2])
    assert {n: print_graph(g) for n, g in again.graphs.items()} == {n: print_graph(g) for n, g in stitched.graphs.items()}
    again.attrs["state"].clear()
    assert stitched.attrs["state"] and trace_program(_config(), 64)[0].attrs["state"] == stitched.attrs["state"]
    other, _ = trace_program(_config(), 48, per_kind=True)
    assert calls == [48] and other.attrs["max_context"] == 48
