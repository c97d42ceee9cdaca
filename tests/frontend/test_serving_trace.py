"""The serving entry points traced into IR (#26 step 4): ``ragged_step`` and ``ragged_decode``.

The traced graphs run by the reference interpreter equal the eager ``DeepseekV4Model.step`` (which
tests/models/test_paged_step.py holds to the dense model); per-kind tracing + stitching gives the
graph a whole-model trace gives; the graphs verify, print and parse back; their dims get the
serving names (N tokens, R sequences, L logit rows, E emitters, PW/PC/SLOTS pool pages).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from ds4c.frontend.trace import param_spec, trace_serving
from ds4c.ir.interpreter import run_graph
from ds4c.ir.parser import parse_graph
from ds4c.ir.printer import print_graph
from ds4c.ir.verifier import verify_graph
from ds4c.models.deepseek_v4 import DeepseekV4Model, ModelConfig
from ds4c.models.deepseek_v4.paged import PageLayout
from ds4c.models.deepseek_v4.presets import PRESETS, init_preset_weights
from ds4c.passes.canonicalize_shapes import canonicalize_shapes
from ds4c.passes.manager import PassContext
from ds4c.runtime.pages import Pools, RequestPages
from ds4c.runtime.step_batch import Chunk, build_step
from tests.frontend.test_stitch import _structure

MAX_CONTEXT = 128


def _config() -> ModelConfig:
    return ModelConfig.from_hf_dict(PRESETS["tiny"])


def _layout(cfg: ModelConfig) -> PageLayout:
    return PageLayout(window=cfg.sliding_window, window_page=4, comp_page=32, max_context=MAX_CONTEXT, max_chunk=24)


@pytest.fixture(scope="module")
def traced():
    cfg = _config()
    stitched = trace_serving(cfg, MAX_CONTEXT, _layout(cfg), per_kind=True)
    model = DeepseekV4Model(cfg, MAX_CONTEXT).eval()
    weights = dict(init_preset_weights(param_spec(model), seed=4))
    model.load_state_dict(weights, strict=True)
    return stitched, model, weights


def _steps(model: DeepseekV4Model, layout: PageLayout, pools: Pools, seed: int):
    """Three steps of three sequences (chunked prefill, then decodes), as StepBatches."""
    rng = random.Random(seed)
    reqs = [RequestPages(layout, pools) for _ in range(3)]
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(n)] for n in (23, 5, 17)]
    done = [0, 0, 0]
    for _ in range(3):
        chunks = []
        for r, p, i in zip(reqs, prompts, range(3), strict=True):
            n = min(rng.randint(1, 12), len(p) - done[i]) or 1
            if done[i] + n > len(p):
                p.append(rng.randrange(model.config.vocab_size))
            assert r.grow(done[i] + n)
            chunks.append(Chunk(r, p[done[i]:done[i] + n], done[i], logits="all"))
            done[i] += n
        yield build_step(chunks, model.compression_rates())


def test_traced_ragged_step_runs_like_the_eager_step(traced):
    program, model, weights = traced
    layout = _layout(model.config)
    sizes = dict(window_pages=40, comp_pages=12, slots=5)
    specs = model.paged_state_specs(layout, *sizes.values())
    state = {s.name: torch.randn(s.shape, generator=torch.Generator().manual_seed(1)) for s in specs}
    eager = tuple(state[s.name] for s in specs)
    graph = program.graphs["ragged_step"]
    names = program.attrs["serving"]["inputs"]["ragged_step"]
    for batch in _steps(model, layout, Pools(sizes["window_pages"], sizes["comp_pages"], sizes["slots"]), seed=2):
        out = run_graph(graph, dict(zip(names, batch.args(), strict=True)), weights, state)
        with torch.no_grad():
            want = model.step(*batch.args(), *eager)
        torch.testing.assert_close(out["logits"], want[0], rtol=0, atol=1e-5)
        for s, w in zip(specs, want[1:], strict=True):
            torch.testing.assert_close(out[s.name], w, rtol=0, atol=1e-5)
        state, eager = {s.name: out[s.name] for s in specs}, want[1:]


def test_traced_ragged_decode_runs_like_the_eager_decode_step(traced):
    program, model, weights = traced
    layout = _layout(model.config)
    pools = Pools(40, 12, 5)
    specs = model.paged_state_specs(layout, 40, 12, 5)
    state = tuple(torch.randn(s.shape, generator=torch.Generator().manual_seed(2)) for s in specs)
    reqs = [RequestPages(layout, pools) for _ in range(3)]
    for r, end in zip(reqs, (9, 16, 23), strict=True):
        assert r.grow(end)
    b = build_step([Chunk(r, [7 + i], r.end - 1) for i, r in enumerate(reqs)], model.compression_rates())
    inputs = {"input_ids": b.input_ids, "positions": b.positions, "window_table": b.window_table,
              "comp_table": b.comp_table, "slot": b.slot}
    out = run_graph(program.graphs["ragged_decode"], inputs, weights, {s.name: t for s, t in zip(specs, state, strict=True)})
    with torch.no_grad():
        want = model.decode_step(*inputs.values(), *state)
    torch.testing.assert_close(out["logits"], want[0], rtol=0, atol=1e-5)
    assert out["logits"].shape == (3, model.config.vocab_size)


def test_serving_trace_attributes(traced):
    program, model, _ = traced
    serving = program.attrs["serving"]
    layout = _layout(model.config)
    assert serving["layout"]["window_slots"] == layout.window_slots and serving["rates"] == model.compression_rates()
    specs = model.paged_state_specs(layout, 2, 2, 2)
    assert [p["name"] for p in serving["pools"]] == [s.name for s in specs]
    assert {p["pool"] for p in serving["pools"]} == {"window", "compressed", "slots"}
    for name, g in program.graphs.items():
        verify_graph(g)
        assert [n for n, _ in g.outputs] == ["logits", *[s.name for s in specs]], name
        assert [i.value.name for i in g.inputs if i.kind == "state"] == [s.name for s in specs]
        again = parse_graph(print_graph(g), constants={i.value.name: None for i in g.inputs if i.kind == "const"})
        assert print_graph(again) == print_graph(g)


def test_serving_dims_are_named(traced):
    program, _, _ = traced
    ctx = PassContext(program_attrs=program.attrs)
    g = canonicalize_shapes(program.graphs["ragged_step"], ctx)
    types = {i.value.name: str(i.value.type) for i in g.inputs if i.kind != "param"}
    assert types["input_ids"] == "i64[N]" and types["seq_first"] == "i64[R]" and types["logit_rows"] == "i64[L]"
    assert types["emit_csa"] == "i64[Ec]" and types["emit_hca"] == "i64[Eh]"
    assert types["layers.0.window_kv_pool"].startswith("f32[PW,")
    assert types["layers.1.compressed_kv_pool"].startswith("f32[PC,")
    assert types["layers.1.compressor_ring"].startswith("f32[SLOTS,")
    assert dict(g.outputs)["logits"].type.shape[0] == "L"
    d = canonicalize_shapes(program.graphs["ragged_decode"], ctx)
    assert {i.value.name: str(i.value.type) for i in d.inputs}["positions"] == "i64[R]"


@pytest.mark.slow
def test_stitched_serving_trace_equals_whole_trace(traced):
    stitched, _, _ = traced
    cfg = _config()
    whole = trace_serving(cfg, MAX_CONTEXT, _layout(cfg), per_kind=False)
    for name in ("ragged_step", "ragged_decode"):
        a, b = stitched.graphs[name], whole.graphs[name]
        assert [n for n, _ in a.outputs] == [n for n, _ in b.outputs]
        assert _structure(a) == _structure(b), name


def test_a_layout_the_model_cannot_use_is_refused_before_tracing():
    cfg = _config()
    bad = dataclasses.replace(_layout(cfg), comp_page=6)
    with pytest.raises(ValueError, match="not a multiple"):
        trace_serving(cfg, MAX_CONTEXT, bad)
