"""Every error the CLI can meet is one line that says the fix, never a traceback; options are
checked before the slow work (tracing) starts."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app, main
from ds4c.errors import InputError
from ds4c.models.deepseek_v4.presets import PRESETS

runner = CliRunner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "tiny.ds4"
    ds4c.compile("tiny", target="cpu", max_context=32, progress=False).save(path)
    return path


@pytest.fixture
def no_trace(monkeypatch):
    """Compiles in the test fail before tracing (the slow part), or the test fails."""

    def trace(*args, **kwargs):
        raise AssertionError("traced although an option was impossible")

    monkeypatch.setattr("ds4c.compiler.trace_program", trace)


def one_line_error(res, *fixes: str) -> str:
    """The command failed with status 2 and one line: ``error: ...`` naming each of ``fixes``."""
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for fix in fixes:
        assert fix in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("args", "fixes"), [
    (["--device", "tpu"], ["unknown device 'tpu'", "use cpu or cuda"]),
    (["--device", "meta"], ["use cpu or cuda"]),
    (["--backend", "foo"], ["unknown backend 'foo'", "reference"]),
    (["--prompt-ids", ""], ["--prompt-ids is empty", "e.g. --prompt-ids 1,2,3"]),
    (["--prompt-ids", "a,b"], ["comma-separated integer token ids", "1,2,3"]),
    (["--prompt-ids", "99999999999999999999999"], ["token ids"]),
    (["--prompt-ids", "1,2;3"], ["different lengths in one batch (2, 1 tokens)", "must have equal length", "one at a time"]),
    (["--prompt-ids", "1,2;"], ["empty row"]),
    (["--prompt", ""], ["--prompt is empty", "--prompt-ids 1,2,3"]),
    (["--prompt-ids", "1,2", "-n", "-1"], ["max_new_tokens must be >= 0"]),
    (["--prompt-ids", "1,2", "-n", "40"], ["recompile with --max-context 42"]),
])
def test_run_errors_are_one_line(artifact, args, fixes):
    base = ["run", str(artifact)] + ([] if any(a.startswith("--prompt") for a in args) else ["--prompt-ids", "1,2"])
    one_line_error(runner.invoke(app, base + args), *fixes)


def test_run_triton_backends_need_a_gpu(artifact, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend in ("kernels", "compiled"):
        res = runner.invoke(app, ["run", str(artifact), "--prompt-ids", "1,2", "--backend", backend])
        one_line_error(res, f"backend '{backend}'", "--device cuda", "--backend reference")


def test_run_a_batch_of_equal_rows(artifact):
    res = runner.invoke(app, ["run", str(artifact), "--prompt-ids", "1,2;3,4", "-n", "2"])
    assert res.exit_code == 0, res.output
    assert "prompt ids (row 0): [1, 2]" in res.output and "prompt ids (row 1): [3, 4]" in res.output


def test_python_generate_refuses_ragged_and_empty_prompts(artifact):
    model = ds4c.load(artifact)
    with pytest.raises(InputError, match="padded batches must have equal length"):
        model.generate([[1, 2, 3], [4, 5]], max_new_tokens=2)
    with pytest.raises(InputError, match="the prompt is empty"):
        model.generate([[]], max_new_tokens=2)
    with pytest.raises(InputError, match="token ids"):
        model([[2**70]])


def test_prefill_only_artifact_says_what_it_can_do(artifact):
    model = ds4c.load(artifact)
    del model.program.graphs["decode"]  # as an artifact imported from one ONNX export has it
    with pytest.raises(InputError, match=r"no @decode entry point .*--max-new-tokens 1"):
        model.generate([[1, 2, 3]], max_new_tokens=4)
    assert model.generate([[1, 2, 3]], max_new_tokens=1).shape == (1, 4)


@pytest.mark.parametrize(("args", "fixes"), [
    (["--hbm-budget", "inf"], ["--hbm-budget 'inf'", "40GB"]),
    (["--hbm-budget", "nan"], ["positive, finite"]),
    (["--hbm-budget", "-5GB"], ["positive, finite"]),
    (["--print-after", "fuse_moee"], ["--print-after fuse_moee: no such pass", "fuse_moe"]),
    (["--stop-after", "cse2"], ["--stop-after cse2: no such pass", "canonicalize_shapes"]),
    (["--bisect", "-1"], ["--bisect -1", "0 or more"]),
    (["--max-context", "100000"], ["max_position_embeddings", "4096"]),
    (["--target", "tpu"], ["unknown target 'tpu'", "b200"]),
    (["--precision", "fp9"], ["unknown precision 'fp9'", "mxfp4-experts"]),
    (["--activations", "some"], ["native, compute"]),
])
def test_compile_refuses_impossible_options_before_tracing(tmp_path, no_trace, args, fixes):
    out = tmp_path / "o.ds4"
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "-o", str(out), *args]), *fixes)
    assert not out.exists()


def test_compile_refuses_bad_precision_tables_before_tracing(tmp_path, no_trace):
    out = tmp_path / "o.ds4"
    missing = tmp_path / "missing.json"
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "--precision", str(missing),
                                       "-o", str(out)]), "cannot read it", "JSON object")
    unknown_format = tmp_path / "fp5.json"
    unknown_format.write_text(json.dumps({"*": "fp5"}))
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "--precision", str(unknown_format),
                                       "-o", str(out)]), "unknown format 'fp5'", "known:")
    no_unit = tmp_path / "attn.json"  # units are the projections, not the attention block
    no_unit.write_text(json.dumps({"model.layers.*.self_attn": "fp8"}))
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "--precision", str(no_unit),
                                       "-o", str(out)]), "'model.layers.*.self_attn' matches no unit", "q_a_proj")
    assert not out.exists()


def test_compile_refuses_unwritable_paths_before_tracing(tmp_path, artifact, no_trace):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "-o", str(tmp_path)]),
                   "is a folder", str(tmp_path / "model.ds4"))
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "-o", str(a_file / "o.ds4")]),
                   f"{a_file} is a file, not a folder")
    one_line_error(runner.invoke(app, ["compile", "tiny", "--target", "cpu", "--dump-ir", str(a_file),
                                       "-o", str(tmp_path / "o.ds4")]), "--dump-ir", "give a folder")
    one_line_error(runner.invoke(app, ["compile", str(artifact), "--target", "cpu", "-o", str(tmp_path / "o.ds4")]),
                   "is a ds4c artifact", "ds4c run")
    assert a_file.read_text() == "x" and not (tmp_path / "o.ds4").exists()


@pytest.mark.parametrize(("field", "value", "fix"), [
    ("rms_norm_eps", 0.0, "'rms_norm_eps' must be a positive, finite number"),
    ("rms_norm_eps", 0, "write floats with a decimal point"),
    ("rope_theta", -1.0, "'rope_theta' must be a positive"),
    ("num_attention_heads", 0, "'num_attention_heads' must be a positive integer"),
    ("hidden_size", -64, "'hidden_size' must be a positive integer"),
    ("max_position_embeddings", 0, "'max_position_embeddings' must be a positive integer"),
])
def test_impossible_config_values_fail_before_tracing(tmp_path, no_trace, field, value, fix):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**PRESETS["tiny"], field: value}))
    line = one_line_error(runner.invoke(app, ["compile", str(ckpt), "--target", "cpu", "-o", str(tmp_path / "o.ds4")]),
                          fix)
    assert "config.json" in line


def test_other_commands_refuse_bad_paths_and_numbers(tmp_path, artifact):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(runner.invoke(app, ["inspect", str(artifact), "--plots", str(a_file)]), "give a folder")
    one_line_error(runner.invoke(app, ["export", str(artifact), "-f", "onnx", "-o", str(tmp_path)]),
                   "is a folder", "model.onnx")
    one_line_error(runner.invoke(app, ["tune", str(artifact), "--batch", "0"]), "--batch must be 1 or more")
    one_line_error(runner.invoke(app, ["run", str(tmp_path / "none.ds4"), "--prompt-ids", "1"]), "ds4c compile")
    one_line_error(runner.invoke(app, ["inspect", str(a_file)]), "not a ds4c artifact")


@pytest.mark.parametrize(("args", "fixes"), [
    (["debug", "numerics", "tiny", "--entry", "bogus"], ["--entry bogus: choose prefill or decode"]),
    (["debug", "numerics", "tiny", "--seq-len", "0"], ["--seq-len 0"]),
    (["debug", "numerics", "tiny", "--entry", "decode", "--seq-len", "1"], ["at least 2 tokens"]),
    (["debug", "numerics", "tiny", "--seq-len", "100", "--max-context", "32"], ["--seq-len 100 exceeds", "32"]),
    (["debug", "numerics", "tiny", "--atol", "-1"], ["tolerance of 0 or more"]),
    (["debug", "numerics", "tiny", "--against", "x.ds4"], ["--against compares two artifacts"]),
    (["debug", "numerics", "tiny", "--pipeline", "cse,bogus"], ["unknown pass 'bogus'", "fuse_moe"]),
    (["debug", "bisect", "tiny", "--entry", "bogus"], ["choose prefill or decode"]),
    (["debug", "numerics", "tiny", "--target", "bogus"], ["unknown target 'bogus'", "h100"]),
    (["debug", "bisect", "tiny", "--target", "bogus"], ["unknown target 'bogus'", "h100"]),
])
def test_debug_options_fail_before_compiling(no_trace, args, fixes):
    one_line_error(runner.invoke(app, args), *fixes)


def test_debug_bisect_of_an_artifact_names_what_to_give(artifact, no_trace):
    one_line_error(runner.invoke(app, ["debug", "bisect", str(artifact)]), "is an artifact", "ds4c inspect")
    # an artifact is debugged for the target it was compiled for
    one_line_error(runner.invoke(app, ["debug", "numerics", str(artifact), "--target", "h100"]), "is an artifact",
                   "--target")


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["ds4c", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    return done.value.code, captured.out + captured.err


def test_main_turns_usage_errors_into_one_line(monkeypatch, capsys):
    for argv, fix in ((["cache", "--bogus"], "`ds4c cache --help`"), (["run"], "Missing argument"),
                      (["run", "x.ds4", "-n", "many"], "--max-new-tokens")):
        code, text = _main(monkeypatch, capsys, *argv)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fix in lines[0], text


def test_main_keeps_the_traceback_of_a_bug(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in ds4c")

    monkeypatch.setattr("ds4c.targets.list_targets", broken)
    monkeypatch.setattr(sys, "argv", ["ds4c", "targets"])
    with pytest.raises(ZeroDivisionError):
        main()


def test_main_help_still_works(monkeypatch, capsys):
    code, text = _main(monkeypatch, capsys, "--help")
    assert code == 0 and "compile" in text and "debug" in text
    code, text = _main(monkeypatch, capsys, "debug")  # a group without a command: its help
    assert code == 2 and "numerics" in text


def test_errors_from_python_stay_typed(artifact):
    with pytest.raises(InputError, match="unknown device"):
        ds4c.load(artifact, device="tpu")
    with pytest.raises(InputError, match="ROCm"):
        ds4c.load(artifact, device=torch.device("meta"))


@pytest.mark.slow
def test_readme_onnx_round_trip_runs_or_says_what_it_is(artifact, tmp_path):
    """README: export to ONNX, compile the ONNX file back; the artifact it gives has the export's one
    entry point and static shapes, which `ds4c run` says instead of failing in its graph."""
    onnx, again = tmp_path / "tiny.onnx", tmp_path / "again.ds4"
    assert runner.invoke(app, ["export", str(artifact), "--format", "onnx", "-o", str(onnx)]).exit_code == 0
    res = runner.invoke(app, ["compile", str(onnx), "--target", "cpu", "-o", str(again)])
    assert res.exit_code == 0, res.output
    sixteen = ",".join(str(i) for i in range(1, 17))
    res = runner.invoke(app, ["run", str(again), "--prompt-ids", sixteen, "-n", "1"])
    assert res.exit_code == 0 and "generated ids: [" in res.output, res.output
    one_line_error(runner.invoke(app, ["run", str(again), "--prompt-ids", "1,2,3"]),
                   "takes exactly 1 x 16 token ids", "tiny.onnx')", "give 16 ids")
    one_line_error(runner.invoke(app, ["run", str(again), "--prompt-ids", sixteen]),
                   "no @decode entry point", "--max-new-tokens 1")


def test_trust_export_refuses_a_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DS4C_HOME", str(tmp_path / "home"))
    one_line_error(runner.invoke(app, ["trust", "export", "-o", str(tmp_path)]), "is a folder", "signing-key.pub")
    one_line_error(runner.invoke(app, ["trust", "export", "-o", str(tmp_path / "no" / "k.pub")]), "does not exist")
