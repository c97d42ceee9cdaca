"""ds4c.Engine on a compiled artifact (``ds4c compile --serving``), CPU, reference backend.

The artifact's ``ragged_step`` / ``ragged_decode`` serve prompts of any lengths in one batch; each
request gets the tokens the artifact's dense path (prefill + decode, held to transformers by the
oracle tests) gives it alone. The manifest records the page layout and the pools plan_memory sized.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.errors import ConfigError, InputError, PassError
from ds4c.runtime.engine import Engine

runner = CliRunner()
PROMPTS = [[1, 2, 3], list(range(10, 50)), [7] * 70, [5, 9], list(range(100, 133))]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    art = ds4c.compile("tiny", target="cpu", max_context=256, serving={"max_running": 4, "max_chunk": 32},
                       progress=False)
    path = tmp_path_factory.mktemp("serving") / "tiny.ds4"
    art.save(path)
    return path, art.manifest


def test_engine_on_an_artifact_gives_each_prompt_its_dense_tokens(artifact):
    path, _ = artifact
    model = ds4c.load(path)
    alone = [model.generate([p], max_new_tokens=9)[0, len(p):].tolist() for p in PROMPTS]
    engine = ds4c.Engine(path)
    reqs = [engine.submit(p, ds4c.SamplingParams(max_new_tokens=9)) for p in PROMPTS]
    engine.run_until_idle()
    assert [r.output_ids for r in reqs] == alone
    stats = engine.stats()
    assert stats["finished"] == len(PROMPTS) and stats["steps"] > 1
    assert all(p["used"] == 0 for p in stats["pages"].values())
    # a ragged list through generate runs on the engine and gives lists back
    out = model.generate(PROMPTS, max_new_tokens=9)
    assert [o[len(p):] for o, p in zip(out, PROMPTS, strict=True)] == alone


def test_manifest_records_layout_and_pools(artifact):
    _, manifest = artifact
    serving = manifest["serving"]
    assert set(manifest["entry_points"]) >= {"ragged_step", "ragged_decode", "prefill", "decode"}
    lay = serving["layout"]
    assert lay["max_context"] == 256 and lay["max_chunk"] == 32 and lay["comp_page"] % 16 == 0
    pages = serving["pages"]
    cfg = manifest["model"]["config"]
    # window page bytes: every layer's [Pw, head_dim] rows (fp32 on the cpu target)
    assert pages["page_bytes"]["window"] == cfg["num_hidden_layers"] * lay["window_page"] * cfg["head_dim"] * 4
    # no HBM to fill on the host CPU: room for max_running requests of max_context
    assert pages["pages"]["slots"] == 5
    assert pages["pages"]["compressed"] == 4 * math.ceil(256 / lay["comp_page"]) + 1
    assert pages["capacity"]["requests_at_max_context"] == 4
    plans = manifest["memory_plan"]
    assert plans["ragged_step"]["sizes"]["N"] == serving["batch"]["max_step_tokens"]
    assert plans["ragged_step"]["sizes"]["PC"] == pages["pages"]["compressed"]


def test_cli_runs_a_ragged_batch_and_inspect_shows_pools(artifact):
    path, _ = artifact
    res = runner.invoke(app, ["run", str(path), "--prompt-ids", "1,2,3;4,5", "-n", "4"])
    assert res.exit_code == 0, res.output
    assert "generated ids (row 0)" in res.output and "generated ids (row 1)" in res.output
    res = runner.invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "serving" in res.output and "compressed" in res.output and "requests" in res.output


def test_state_budget_resizes_pools_and_a_too_small_one_is_refused(artifact):
    path, manifest = artifact
    model = ds4c.load(path)
    per_page = manifest["serving"]["pages"]["page_bytes"]
    engine = Engine(model, state_budget=100 * per_page["compressed"] + 10 * per_page["slots"] + 60 * per_page["window"])
    assert engine.pools.compressed.capacity > manifest["serving"]["pages"]["pages"]["compressed"]
    with pytest.raises(InputError, match="state_budget.*needs"):
        Engine(model, state_budget=per_page["compressed"])


def test_engine_refuses_what_it_cannot_serve():
    with pytest.raises(InputError, match="--serving"):
        Engine(SimpleNamespace(manifest={"model": {}}))
    with pytest.raises(InputError, match="artifact path"):
        Engine(object())
    with pytest.raises(InputError, match=r"in-memory Artifact .*art.save"):  # ds4c.compile's result, not loaded
        Engine(ds4c.compile("tiny", target="cpu", max_context=32, serving=True, progress=False))
    broken = {"model": {}, "serving": {"layout": {"window": 8, "window_page": "4"}}}
    with pytest.raises(InputError, match="layout fields.*comp_page"):
        Engine(SimpleNamespace(manifest=broken))
    with pytest.raises(ConfigError, match="unknown serving option"):
        ds4c.compile("tiny", target="cpu", serving={"pages": 3}, progress=False)
    with pytest.raises(ConfigError, match="max_running"):
        ds4c.compile("tiny", target="cpu", serving={"max_running": 0}, progress=False)
    res = runner.invoke(app, ["compile", "tiny", "--target", "cpu", "--serving-opt", "max_running"])
    assert res.exit_code != 0 and "KEY=INTEGER" in res.output


def test_a_ragged_batch_without_serving_entry_points_says_how(tmp_path):
    art = ds4c.compile("tiny", target="cpu", max_context=32, progress=False)
    model = ds4c.CompiledModel(art.manifest, art.program, art.weights or {}, torch.device("cpu"))
    with pytest.raises(InputError, match="--serving"):
        model.generate([[1, 2], [3]], max_new_tokens=2)


def test_serving_graphs_fuse_like_decode(artifact):
    """Per layer, the serving graphs hold the fused ops @decode holds (attention of the layer's own
    kind, decided from the pool its keys are gathered from; compress, indexer.topk, moe, mhc)."""
    from ds4c.inspect import ops_by_layer

    path, _ = artifact
    graphs = ds4c.load(path).program.graphs

    # paged: the serving graphs' addressing; rope.table: tables per distinct positions (a serving
    # step's compressors have their entries' positions, a dense step one shared position);
    # compress.rows: a serving compressor's ring rows (a dense step keeps its window in the state)
    def fused(name, skip=("aten.", "sym.", "state.", "paged.", "rope.table", "compress.rows")):
        return {layer: {k: v for k, v in c.items() if not k.startswith(skip)}
                for layer, c in ops_by_layer(graphs[name]).items()}

    want = fused("decode")
    assert want[1].get("attention.csa") == 1 and want[2].get("attention.hca") == 1
    assert fused("ragged_step") == want
    assert fused("ragged_decode") == want
    # every pool is written in place (lower_paged_state): window 1, HCA 3, CSA 5 per layer
    writes = {layer: c.get("state.write", 0) for layer, c in ops_by_layer(graphs["ragged_step"]).items()
              if layer is not None}
    assert writes == {0: 1, 1: 5, 2: 3, 3: 5}
    assert not any(op.name == "aten.index_put.default" for op in graphs["ragged_step"].ops)


def test_bench_serve_reports_the_engine_against_static_batches(artifact, tmp_path):
    import json

    from ds4c.bench.serve import make_workload

    path, _ = artifact
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "serve", str(path), "--requests", "6", "--concurrency", "3",
                              "--prompt-len", "4:40", "--output-len", "2:6", "--compare", "static,transformers",
                              "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "engine / static output tokens/s" in res.output and "engine / transformers output tokens/s" in res.output
    report = json.loads(out.read_text())
    want = make_workload(6, "4:40", "2:6", 512, max_context=256, concurrency=3).output_tokens
    for name in ("engine", "static", "transformers"):
        r = report[name]
        assert r["requests"] == 6 and r["output_tokens"] == want, name
        assert r["ttft_s"]["p50"] > 0 and r["tpot_s"]["p99"] >= r["tpot_s"]["p50"] > 0
    assert report["engine"]["preemptions"] == 0 and report["engine"]["pages_peak"]["slots"] >= 1
    # decode-only steps against the HBM bound of the batch they ran
    eng = report["engine"]
    assert 1 <= eng["decode_batch"] <= 3 and eng["decode_vs_bound"] > 0 and "of the HBM bound" in res.output
    assert eng["decode_hbm_bound"]["step_bytes"] > sum(t.numel() for t in ds4c.load(path).weights.values())
    # steps that held prompt chunks: at least one per request (chunks mixed with decodes), timed
    assert 1 <= eng["prompt_steps"] <= eng["steps"] and eng["prompt_step_s"] > 0
    assert "steps with prompt chunks" in res.output and "prompt_steps" not in report["static"]
    assert eng["overlap"] == {"on": False, "overlapped_steps": 0}  # off by default on the CPU
    res = runner.invoke(app, ["bench", "serve", str(path), "--requests", "3", "--concurrency", "3", "--compare", "none",
                              "--prompt-len", "4:8", "--output-len", "8:8", "--overlap", "--json", str(out)])
    assert res.exit_code == 0, res.output
    over = json.loads(out.read_text())["engine"]["overlap"]
    assert over["on"] and over["overlapped_steps"] > 0
    res = runner.invoke(app, ["bench", "serve", str(path), "--requests", "3", "--rate", "500", "--compare", "none",
                              "--prompt-len", "4:8", "--output-len", "2:3", "--trust-binaries"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["bench", "serve", str(path), "--prompt-len", "200:250", "--output-len", "64:64"])
    assert res.exit_code != 0 and "max_context" in res.output
    res = runner.invoke(app, ["bench", "serve", str(path), "--prompt-len", "x"])
    assert res.exit_code != 0 and "LOW:HIGH" in res.output


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_baseline_that_runs_out_of_device_memory_is_reported_and_the_engine_kept(artifact, tmp_path, monkeypatch,
                                                                                    wrapped):
    """(On an H100 the static baseline of a 64-request trace ran out of memory after the engine's
    run, and the whole report was lost; again on 2026-12-07 with the error as the executor raises
    it: an IRError naming the op, caused by the out-of-memory error.)"""
    import json

    import ds4c.bench.serve as bench
    from ds4c.errors import IRError

    def no_memory(*args, **kwargs):
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 29.91 GiB.")
        if wrapped:
            raise IRError("graph @prefill_last: op #46 aten.reshape.default -> %reshape_2 failed: CUDA out of "
                          "memory") from oom
        raise oom

    monkeypatch.setattr(bench, "run_static", no_memory)
    path, _ = artifact
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "serve", str(path), "--requests", "3", "--concurrency", "3",
                              "--prompt-len", "4:8", "--output-len", "2:3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["engine"]["requests"] == 3 and "static" not in report
    assert report["baseline_errors"]["static"].startswith("out of device memory: CUDA out of memory")
    assert "static: not measured" in res.output


def test_bench_serve_shared_prefix_and_sessions_with_and_without_the_prefix_cache(artifact, tmp_path):
    import json

    from ds4c.bench.serve import make_workload

    path, _ = artifact
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "serve", str(path), "--requests", "4", "--concurrency", "4", "--turns", "3",
                              "--shared-prefix", "60", "--prompt-len", "4:12", "--output-len", "3:5",
                              "--compare", "nocache,static", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    work = make_workload(4, "4:12", "3:5", 512, max_context=256, concurrency=4, shared_prefix="60", turns=3)
    assert work.total_requests == 12 and report["workload"]["shareable_tokens"] == work.shareable() > 3 * 60
    assert "static" not in report  # padded batches cannot continue sessions
    cached, plain = report["engine"], report["nocache"]
    assert cached["requests"] == plain["requests"] == 12 and cached["output_tokens"] == work.output_tokens
    assert cached["prompt_tokens"] == plain["prompt_tokens"]
    assert plain["prompt_tokens_computed"] == plain["prompt_tokens"] and plain["prefix_hit_tokens"] == 0
    saved = plain["prompt_tokens_computed"] - cached["prompt_tokens_computed"]
    assert saved == cached["prefix_hit_tokens"] > 0.5 * work.shareable()
    assert "TTFT p50 without / with the prefix cache" in res.output and "shareable by construction" in res.output


def test_a_tampered_serving_record_is_refused_by_field(artifact):
    import copy

    from ds4c.errors import ArtifactError

    path, manifest = artifact
    model = ds4c.load(path)
    cases = {
        "serving.batch": lambda s: s["batch"].pop("max_running"),
        "serving.rates": lambda s: s["rates"].update(x=-1),
        "serving.pools[0]": lambda s: s["pools"][0].update(dtype="load"),  # not a torch attribute to call
        "serving.pools[1]": lambda s: s["pools"][1].update(shape=[4, -2]),
        "serving.pages.pages": lambda s: s["pages"]["pages"].update(window=1),
        "serving.inputs": lambda s: s["inputs"].pop("ragged_decode"),
    }
    for field, tamper in cases.items():
        bad = copy.deepcopy(manifest)
        tamper(bad["serving"])
        fake = SimpleNamespace(manifest=bad, device=model.device, vocab_size=model.vocab_size)
        with pytest.raises(ArtifactError, match=field.replace("[", r"\[").replace("]", r"\]")):
            Engine(fake)


def test_the_prefix_cache_adds_its_window_history_to_the_planned_pools(artifact):
    import math

    path, _ = artifact
    model = ds4c.load(path)
    plain = Engine(model)
    cached = Engine(model, prefix_cache=True)
    history = cached.stats()["prefix_cache"]["history"]
    extra = cached.max_running * (math.ceil(history / cached.layout.window_page) + 1)
    assert cached.pools.window.capacity == plain.pools.window.capacity + extra
    prompt = list(range(20, 90))
    want = plain.generate([prompt], ds4c.SamplingParams(max_new_tokens=5))
    assert cached.generate([prompt], ds4c.SamplingParams(max_new_tokens=5)) == want
    assert cached.generate([prompt[:60] + [3, 4]], ds4c.SamplingParams(max_new_tokens=5)) == \
        plain.generate([prompt[:60] + [3, 4]], ds4c.SamplingParams(max_new_tokens=5))
    assert cached.stats()["prefix_cache"]["hit_tokens"] > 0


def test_buckets_pad_steps_without_changing_tokens(artifact):
    """Steps padded to a bucket (what a CUDA graph of that bucket runs: padding rows and sequences
    over the trash page and slot), decode-only and with prompt chunks, give every request its
    tokens; trash full of NaN reaches no real row."""
    from ds4c.runtime.engine import CompiledStepRunner

    path, _ = artifact
    model = ds4c.load(path)
    want = Engine(model).generate(PROMPTS, ds4c.SamplingParams(max_new_tokens=9))
    runner = CompiledStepRunner(model, decode_buckets=[3, 8], step_buckets=[40, 64, 200])
    for t in runner.state.values():
        if t.is_floating_point():
            t[0] = float("nan")
    seen = []
    run = runner.run
    runner.run = lambda batch: seen.append(batch.tokens) or run(batch)
    engine = Engine(runner, max_running=4)
    assert engine.generate(PROMPTS, ds4c.SamplingParams(max_new_tokens=9)) == want
    assert {1, 2, 4} & set(seen), "no decode step of a size the buckets pad"
    assert any(n > 4 for n in seen), "no step with prompt chunks"
    assert runner.step_seqs == 5 and runner.step_buckets == [40, 64, 200]
    stats = engine.stats()
    assert stats["decode_graphs"] == stats["step_graphs"] == []  # graphs are captured on CUDA only
    with pytest.raises(InputError, match="decode_buckets"):
        CompiledStepRunner(model, decode_buckets=[0])


def test_a_padded_step_writes_what_the_step_writes_and_only_trash_besides(artifact):
    """``pad_step``: the artifact's ragged_step over a batch padded to a bucket gives the batch's
    logits and pools; the padding rows and sequences changed nothing but the trash page and slot."""
    from ds4c.runtime.engine import CompiledStepRunner
    from ds4c.runtime.pages import RequestPages
    from ds4c.runtime.step_batch import Chunk, build_step, pad_step, padded_sizes

    path, _ = artifact
    model = ds4c.load(path)
    runner = CompiledStepRunner(model)
    chunks = []
    for n in (7, 1, 12):
        pages = RequestPages(runner.layout, runner.pools)
        assert pages.grow(n)
        chunks.append(Chunk(pages, list(range(3, 3 + n)), 0))
    batch = build_step(chunks, runner.rates)
    padded = pad_step(batch, 40, 6, runner.rates)
    assert padded.tokens == 40 and padded.seq_first.shape[0] == 6
    assert padded.emit_csa.shape[0] == padded_sizes(40, 6, runner.rates)["Ec"]
    assert pad_step(batch, 22, 6, runner.rates) is None  # 20 rows + 3 padding sequences need 23
    entry = model._entry("ragged_step")
    torch.manual_seed(0)
    pools = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in runner.state.items()}

    def run(b):
        out = entry.run(dict(zip(runner.inputs["ragged_step"], b.args(), strict=True)), model.weights,
                        {k: v.clone() for k, v in pools.items()})
        return out.pop("logits"), out

    want_logits, want = run(batch)
    got_logits, got = run(padded)
    assert torch.allclose(got_logits[:batch.logit_rows.shape[0]], want_logits, atol=1e-5)
    for k, v in want.items():  # page / slot 0 is trash
        # GEMMs over 40 rows round differently from 20 (~1e-6); a padding write would be O(1)
        assert torch.allclose(got[k][1:], v[1:], atol=1e-5), (k, (got[k][1:] - v[1:]).abs().max())


def test_padding_rows_route_alike(artifact):
    """The padding rows of a padded step (token 0, all at position 0 of a trash sequence) reach
    every MoE with the same input, so a learned-routing MoE reads one padding row's experts, not
    top-k more per padding row (a speculative small bucket of one request pads 1 real row to 8)."""
    from ds4c.ir.interpreter import ReferenceExecutor
    from ds4c.runtime.engine import CompiledStepRunner
    from ds4c.runtime.pages import RequestPages
    from ds4c.runtime.step_batch import Chunk, build_step, pad_step

    path, _ = artifact
    model = ds4c.load(path)
    runner = CompiledStepRunner(model)
    pages = RequestPages(runner.layout, runner.pools)
    assert pages.grow(9)
    batch = build_step([Chunk(pages, list(range(3, 12)), 0)], runner.rates)
    padded = pad_step(batch, 16, 2, runner.rates)  # 9 real rows, 7 padding rows in one padding sequence
    graph = model.program.graphs["ragged_step"]
    values = {}

    def keep(i, op, outs):
        for r, o in zip(op.results, outs, strict=False):
            values[r.name] = o

    ReferenceExecutor(graph, "cpu", on_op=keep).run(dict(zip(runner.inputs["ragged_step"], padded.args(), strict=True)),
                                                     model.weights, {k: v.clone() for k, v in runner.state.items()})
    moes = [op for op in graph.ops if op.name == "moe"]
    assert moes
    # the last layer's MoE runs on the logits rows only (hoist_row_gather): 2 here, not 16
    assert values[moes[-1].args[0].name].shape[1] == padded.logit_rows.shape[0] == 2
    for op in moes[:-1]:
        x = values[op.args[0].name].reshape(16, -1)
        # every padding row alike (to CPU GEMM rounding, which differs by row placement: ~1e-6;
        # at positions 0, 1, .. as before they differed by O(1)), and unlike the real rows
        assert torch.allclose(x[9:], x[9:10].expand(7, -1), atol=1e-5), op.args[0].name
        assert not torch.allclose(x[8], x[9], atol=1e-2)


def test_the_transformers_peer_holds_the_artifacts_weights(artifact):
    """``bench serve --compare transformers`` runs transformers' DeepseekV4ForCausalLM with the
    artifact's weights (streamed from its preset seed): same logits as the artifact."""
    from ds4c.bench.peers import transformers_model

    path, manifest = artifact
    hf = transformers_model(manifest, torch.device("cpu"))
    ids = [[5, 9, 33, 2, 17, 100, 7, 64, 3, 11]]
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits
    got = ds4c.load(path)(ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    bad = {**manifest, "model": {**manifest["model"], "source": {"kind": "module", "name": "x"}}}
    with pytest.raises(InputError, match="cannot be rebuilt in transformers"):
        transformers_model(bad, torch.device("cpu"))


def test_pools_that_do_not_fit_the_device_are_a_clear_error(artifact, monkeypatch):
    """(On an H100 the planned pools did not fit beside the loaded flash-slice: a CUDA OOM
    traceback.) The error says how big they are and how to give them less."""
    from ds4c.runtime.engine import CompiledStepRunner

    def no_memory(self, record, pages):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 23.19 GiB.")

    monkeypatch.setattr(CompiledStepRunner, "_pool_tensor", no_memory)
    path, _ = artifact
    with pytest.raises(InputError, match=r"the serving pools \(.* GB: .* window, .* compressed pages, .* slots\) do "
                                         r"not fit .* state_budget=BYTES\) / --state-budget"):
        ds4c.Engine(str(path))


def test_a_closed_engine_gives_its_pools_back_even_if_something_holds_it(artifact):
    """(On an H100 the first engine of `bench serve --compare nocache` kept its 32 GB of pools while
    the second asked for its own.) close() frees the pools in place and refuses new requests."""
    import gc
    import weakref

    from ds4c.runtime.sampling import SamplingParams

    path, _ = artifact
    engine = ds4c.Engine(str(path), prefix_cache=True)
    pool = weakref.ref(next(iter(engine.runner.state.values())))
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=3))
    waiting = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3))
    engine.close()
    gc.collect()
    assert pool() is None and waiting.finished and waiting.error == "the engine was closed"
    with pytest.raises(InputError, match="closed"):
        engine.submit([1, 2, 3])


def test_serving_pools_leave_room_for_the_largest_step_arena(tmp_path):
    """The pools take the budget left after the weights and the largest activation arena of the
    engine's steps, so weights + pools + any step's arena fit the device (a big token budget per
    step made the plan overcommit the target before)."""
    budget = 64 << 20
    art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=128, progress=False,
                       kernel_binaries=False, hbm_budget=budget,
                       serving={"max_running": 4, "max_chunk": 128, "max_step_tokens": 2048})
    pages = art.manifest["serving"]["pages"]
    plans = art.manifest["memory_plan"]
    arenas = {name: plans[name]["arena_bytes"] for name in ("ragged_step", "ragged_decode")}
    assert pages["activations"] == max(arenas.values()) > 4 << 20  # a step of 2048 tokens: MBs of activations
    for name in arenas:
        assert plans[name]["device_bytes"] <= budget, name
    # the pools fill what is left: less than one compressed page of the budget goes unused
    assert budget - plans["ragged_step"]["device_bytes"] < pages["page_bytes"]["compressed"]
    art.save(tmp_path / "a.ds4")
    res = runner.invoke(app, ["inspect", str(tmp_path / "a.ds4")], terminal_width=400)
    assert res.exit_code == 0 and "less the largest step's activations" in " ".join(res.output.split())


@pytest.mark.slow
def test_flash_slice_serves_a_million_token_context_on_an_h100():
    """A full-width serving compile at V4's 1M-token context (meta weights): each step's
    activations stay a few GB, so the pools keep the HBM. The indexer and attention read keys at
    their page-table rows, the indexer finding them through the table itself
    (``fuse_paged_reads``): a per-token copy of every key ([N, C, d] per CSA indexer, [N, W + C, D]
    per HCA layer) made the 2048-token step's activations outgrow the budget and the compile fail,
    as it still does with the copies (``fuse_paged_reads`` off)."""
    def pages(**lowering) -> dict:
        art = ds4c.compile("flash-slice", target="h100", precision="bf16", weights="reference", progress=False,
                           kernel_binaries=False, max_context=1 << 20, serving=True, lowering=lowering)
        return art.manifest["serving"]["pages"]

    long = pages()
    assert long["fitted"] and long["activations"] < 3e9 and long["capacity"]["requests_at_max_context"] >= 8
    with pytest.raises(PassError, match="state budget of -"):  # the copies' activations outgrow the HBM
        pages(fuse_paged_reads=False)
