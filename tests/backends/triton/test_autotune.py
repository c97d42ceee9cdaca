"""Autotuning: the coordinate-descent search, the tuning file (bound to program, device, Triton)
and the tuned configurations reaching the launchers. On CPU the step timer is replaced by a model
of the step time; on a GPU ``ds4c tune`` times CUDA-graph replays."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.backends.triton.kernels.configs import moe_decode_config
from ds4c.backends.triton.kernels.linear import gemv_config
from ds4c.runtime.autotune import FORMAT, load_tuning, program_key, restrict, search, tune, tuning_path
from tests.backends.triton.conftest import CTX, kernel_context

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fake_step(table):
    """A step time that prefers 32-column GEMV tiles, no K split and 128-column MoE down tiles."""
    g, m = table.get("gemv", {}), table.get("moe_decode", {})
    return 1.0 - 0.1 * (g.get("block_n") == 32) - 0.05 * (g.get("split") == 1) - 0.2 * (m.get("block_n_down") == 128)


def test_search_finds_the_best_per_field():
    table, report = search(fake_step)
    assert table == {"gemv": {"block_n": 32, "split": 1}, "moe_decode": {"block_n_down": 128}}
    assert report["baseline_s"] == 1.0 and report["best_s"] == pytest.approx(0.65)
    assert len(report["trials"]) > 10


def test_only_restricts_the_search_to_named_tunables(tiny):
    only = restrict("row_gemv.prefetch, moe_decode")
    assert only == {"row_gemv": {"prefetch": (None, 0)}, "moe_decode": restrict(None)["moe_decode"]}
    table, report = search(fake_step, only)
    assert table == {"moe_decode": {"block_n_down": 128}}
    assert all(set(t["table"]) <= {"row_gemv", "moe_decode"} for t in report["trials"])
    with pytest.raises(ds4c.errors.InputError, match=r"no tunable 'row_gemv.bogus'.*row_gemv.prefetch"):
        restrict("row_gemv.bogus")
    from ds4c.cli import app

    res = CliRunner().invoke(app, ["tune", str(tiny), "--only", "nothing"])
    assert res.exit_code != 0 and "no tunable 'nothing'" in res.output, res.output


def test_tuned_values_reach_the_config_functions():
    ctx = kernel_context(gemv={"block_n": 32, "split": 1, "bogus": 3}, moe_decode={"block_n_down": 128})
    assert ctx.tuned("gemv") == {"block_n": 32, "split": 1}  # fields outside TUNABLE are dropped
    cfg = gemv_config(1, 4096, 4096, torch.bfloat16, 132, **ctx.tuned("gemv"))
    assert cfg.block_n == 32 and cfg.k_split == 4096
    assert moe_decode_config(torch.bfloat16, ctx).block_n_down == 128
    # near miss: the target's defaults without a table
    assert CTX.tuned("gemv") == {} and moe_decode_config(torch.bfloat16, CTX).block_n_down == 64
    assert gemv_config(1, 4096, 4096, torch.bfloat16, 132).block_n == 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "t.ds4"
    ds4c.compile("tiny", target="h100", precision="fp32", max_context=48, progress=False).save(path)
    return path


def test_tune_writes_a_bound_file_and_tuned_kernels_stay_exact(tiny):
    model = ds4c.load(tiny, device=DEVICE, backend="kernels", cuda_graphs=False)
    res = tune(model, artifact=tiny, measure=fake_step)
    data = json.loads(tuning_path(tiny).read_text())
    assert data["format"] == FORMAT and data["table"] == res["table"] == model.tuning
    # the launchers get it: every executor holds the model's kernel context, with the table
    assert all(ex.context is model.kernel_context for ex in model._executors.values())
    assert {f: model.kernel_context.tuned(f) for f in res["table"]} == res["table"]
    assert data["program"] == program_key(model.manifest)
    assert not tuning_path(tiny).with_name(tuning_path(tiny).name + ".tmp").exists()
    table, status = load_tuning(tiny, model.manifest, torch.device(DEVICE))
    assert table == res["table"] and status.startswith("applied")
    # tuned tiles, same numbers (fp32): prefill and a decode step against the reference backend
    ref = ds4c.load(tiny, backend="reference")
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    want, st = ref.prefill(ids)
    got, kst = model.prefill(ids.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    tok = want[:, -1:].argmax(-1)
    torch.testing.assert_close(model.decode(tok.to(DEVICE), 9, kst)[0].cpu(), ref.decode(tok, 9, st)[0],
                               rtol=1e-4, atol=1e-4)


def test_tuning_file_for_another_program_or_triton_is_ignored(tiny, tmp_path):
    model = ds4c.load(tiny, backend="reference")
    other = tmp_path / "x.tune.json"
    good = {"format": FORMAT, "program": program_key(model.manifest), "device": "cpu",
            "triton": __import__("triton").__version__, "table": {"gemv": {"block_n": 32}}}
    other.write_text(json.dumps({**good, "program": "h100:0000"}))
    table, status = load_tuning(tiny, model.manifest, torch.device("cpu"), other)
    assert table is None and "another program" in status
    other.write_text(json.dumps({**good, "triton": "0.0"}))
    table, status = load_tuning(tiny, model.manifest, torch.device("cpu"), other)
    assert table is None and "triton" in status
    other.write_text("{not json")
    assert "not readable JSON" in load_tuning(tiny, model.manifest, torch.device("cpu"), other)[1]
    other.write_text(json.dumps(good))
    assert load_tuning(tiny, model.manifest, torch.device("cpu"), other)[0] == {"gemv": {"block_n": 32}}


def test_tune_needs_a_kernel_backend_and_a_gpu(tiny):
    with pytest.raises(ds4c.errors.InputError, match="kernel backend"):
        tune(ds4c.load(tiny, backend="reference"))
    if not torch.cuda.is_available():
        with pytest.raises(ds4c.errors.InputError, match="CUDA-graph"):
            tune(ds4c.load(tiny, backend="kernels"))
        from ds4c.cli import app

        res = CliRunner().invoke(app, ["tune", str(tiny)])
        assert res.exit_code != 0 and "no CUDA device" in res.output, res.output


def test_candidates_are_timed_without_the_loaded_table_and_failures_are_skipped(tiny):
    model = ds4c.load(tiny, device=DEVICE, backend="kernels", cuda_graphs=False)
    model.tuning = {"gemv": {"block_n": 128}}  # as if a tuning file had been applied at load

    def measure(table):
        assert model.tuning is None  # the loaded table would override every candidate
        if table.get("moe_decode", {}).get("num_stages") == 5:
            raise RuntimeError("out of resource: shared memory")
        return fake_step(table)

    res = tune(model, measure=measure)
    assert res["backend"] == "kernels" and model.tuning == res["table"] == {
        "gemv": {"block_n": 32, "split": 1}, "moe_decode": {"block_n_down": 128}}
    assert any("out of resource" in t.get("error", "") for t in res["trials"])
