"""The CLI and Python API end to end on the embedded default model."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.debug import CompileTrace
from ds4c.ir import parse_graph, print_graph, verify_graph

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    out = d / "tiny.ds4"
    res = runner.invoke(app, ["compile", "tiny", "--target", "b200", "-o", str(out), "--max-context", "128",
                              "--dump-ir", str(d / "ir")])
    assert res.exit_code == 0, res.output
    return out, d


def test_targets_command():
    res = runner.invoke(app, ["targets"])
    assert res.exit_code == 0
    for name in ("h100", "h200", "b200", "b300", "gb200", "mi300x", "mi355x", "npu", "cpu"):
        assert name in res.output


def test_compile_dumps_ir_after_every_pass(tiny):
    _, d = tiny
    for entry in ("prefill", "decode"):
        files = sorted((d / "ir" / entry).iterdir())
        assert files[0].name == "00_input.ds4ir"
        for f in files:
            g = parse_graph(f.read_text())
            assert print_graph(g) == f.read_text()


def test_inspect_lists_layers_weights_and_state(tiny):
    out, _ = tiny
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "b200" in text and "pipeline" in text and "layers.1.compressed_kv" in text
    assert "CSA" in text and "HCA" in text and "sliding" in text and "hash MoE" in text
    # what the GPU lowering stage made, read from the artifact: 4 layers x (q, kv) norm+rope per entry point
    flat = " ".join(text.split())  # rich wraps long lines
    assert "lowering lower_packed_weights -> fuse_norm_rope -> fuse_paged_reads -> merge_sibling_linears" in flat, flat
    assert "rms_norm.rope×" in flat and "moe.packed×" in flat, flat
    # the GPU runtime's static buffer plan, predicted on meta tensors at the compile plan's sizes
    assert "GPU activations (the compiled plan, evaluated by the runtime at each call's sizes; here at the plan's): @prefill (B=1, S=128)" in flat, flat
    assert "@decode (B=1, S=128)" in flat and "results (" in flat


def test_run_command_prompt_ids_and_text(tiny):
    out, _ = tiny
    res = runner.invoke(app, ["run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    assert "generated ids:" in res.output
    res = runner.invoke(app, ["run", str(out), "--prompt", "hello", "-n", "3"])
    assert res.exit_code == 0, res.output and "text:" in res.output
    res = runner.invoke(app, ["run", str(out)])
    assert res.exit_code == 2


def test_python_api_generate_is_prefill_plus_decode(tiny):
    out, _ = tiny
    model = ds4c.load(out)
    ids = torch.randint(0, model.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    gen = model.generate(ids, max_new_tokens=6)
    assert gen.shape == (2, 27) and torch.equal(gen[:, :21], ids)
    # greedy tokens are the argmax of a full forward over the generated sequence
    full = model(gen[:, :-1])
    assert torch.equal(full[:, 20:].argmax(-1), gen[:, 21:])


def test_every_pipeline_graph_round_trips_and_verifies():
    trace = CompileTrace()
    ds4c.compile("tiny", target="cpu", max_context=64, instruments=[trace], progress=False)
    assert len(trace.snapshots) >= 2 * 4
    for snap in trace.snapshots:
        text = print_graph(snap.graph)
        assert print_graph(parse_graph(text)) == text, f"{snap.pass_name} @{snap.graph_name}"
        verify_graph(snap.graph)


def test_flash_slice_compiles_small_with_referenced_weights(tmp_path):
    art = ds4c.compile("flash-slice", target="h100", progress=False)
    w = art.manifest["weights"]
    assert w["mode"] == "reference" and w["source"]["kind"] == "preset"
    assert w["bytes"] > 15e9  # ~21 GB of weights once auto packs them for h100 (bf16: ~42 GB)...
    path = art.save(tmp_path / "fs.ds4")
    assert path.stat().st_size < 20e6  # ...that the artifact does not carry


def test_compile_lowering_options_reach_the_compiler(monkeypatch, tmp_path):
    """`--no-fuse-norm-rope`, `--no-fuse-paged-reads`, `--no-merge-linears`, `--no-merge-packed`, `--no-pdl`:
    the lowering's compile options."""
    seen = {}

    def fake_compile(model, **kwargs):
        seen.update(kwargs)
        raise ds4c.errors.Ds4cError("stop here")

    monkeypatch.setattr(ds4c, "compile", fake_compile)
    out = str(tmp_path / "t.ds4")
    runner.invoke(app, ["compile", "tiny", "--target", "h100", "-o", out])
    assert seen["lowering"] == {"fuse_norm_rope": True, "fuse_paged_reads": True, "merge_linears": True, "merge_packed": True, "pdl": True}
    runner.invoke(app, ["compile", "tiny", "--target", "h100", "-o", out, "--no-fuse-norm-rope", "--no-merge-packed"])
    assert seen["lowering"] == {"fuse_norm_rope": False, "fuse_paged_reads": True, "merge_linears": True, "merge_packed": False, "pdl": True}
    runner.invoke(app, ["compile", "tiny", "--target", "h100", "-o", out, "--no-pdl"])
    assert seen["lowering"] == {"fuse_norm_rope": True, "fuse_paged_reads": True, "merge_linears": True, "merge_packed": True, "pdl": False}
    runner.invoke(app, ["compile", "tiny", "--target", "h100", "-o", out, "--no-fuse-paged-reads"])
    assert seen["lowering"]["fuse_paged_reads"] is False
