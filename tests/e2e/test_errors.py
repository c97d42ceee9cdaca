"""Bad input: a clear error naming the file / field / tensor, and no partial output."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.errors import ArtifactError, CheckpointError, ConfigError, InputError, TargetError
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

runner = CliRunner()
CFG = SMALL_CONFIGS[sorted(SMALL_CONFIGS)[0]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    make_hf_model(CFG, seed=0).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("art") / "tiny.ds4"
    ds4c.compile("tiny", target="cpu", max_context=64).save(path)
    return path


def _compile_fails(args, out, match):
    res = runner.invoke(app, ["compile", *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert match in " ".join(res.output.split()), res.output
    assert not out.exists()
    assert not list(out.parent.glob(".*tmp*")) and not list(out.parent.glob("*.tmp"))


def test_missing_config_json(tmp_path, ckpt):
    d = tmp_path / "noconfig"
    shutil.copytree(ckpt, d)
    (d / "config.json").unlink()
    _compile_fails([str(d), "--target", "cpu"], tmp_path / "o.ds4", "config.json")
    with pytest.raises(ConfigError, match="config.json"):
        ds4c.compile(d, target="cpu")


def test_unsupported_architecture(tmp_path, ckpt):
    d = tmp_path / "llama"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    _compile_fails([str(d), "--target", "cpu"], tmp_path / "o.ds4", "llama")


def _rewrite_weights(src, dst, edit):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor(tmp_path, ckpt):
    d = tmp_path / "missing"
    _rewrite_weights(ckpt, d, lambda t: t.pop("model.norm.weight"))
    _compile_fails([str(d), "--target", "cpu", "--weights", "embed"], tmp_path / "o.ds4", "model.norm.weight")


def test_extra_tensor(tmp_path, ckpt):
    d = tmp_path / "extra"
    _rewrite_weights(ckpt, d, lambda t: t.__setitem__("model.bogus.weight", torch.zeros(3)))
    _compile_fails([str(d), "--target", "cpu", "--weights", "embed"], tmp_path / "o.ds4", "model.bogus.weight")


def test_misshaped_tensor(tmp_path, ckpt):
    d = tmp_path / "shape"
    _rewrite_weights(ckpt, d, lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)))
    _compile_fails([str(d), "--target", "cpu", "--weights", "embed"], tmp_path / "o.ds4", "model.norm.weight")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        ds4c.compile(d, target="cpu", weights="embed")


def test_bad_checkpoint_fails_before_tracing(tmp_path, ckpt, monkeypatch):
    # the headers are checked against the model's parameters first: no trace, no passes
    d = tmp_path / "missing"
    popped = []
    _rewrite_weights(ckpt, d, lambda t: popped.append(t.pop(next(k for k in sorted(t) if k.startswith("model.layers.0.attn.") and k.endswith(".weight")))))

    def no_trace(*args, **kwargs):
        raise AssertionError("traced a checkpoint whose headers are wrong")
    monkeypatch.setattr("ds4c.compiler.trace_program", no_trace)
    with pytest.raises(CheckpointError, match="missing"):
        ds4c.compile(d, target="cpu", weights="embed")
    assert popped


def test_unknown_target_lists_valid_ones(tmp_path):
    _compile_fails(["tiny", "--target", "tpu9000"], tmp_path / "o.ds4", "b200")
    with pytest.raises(TargetError, match="h100"):
        ds4c.compile("tiny", target="tpu9000")


def test_token_ids_out_of_range(artifact):
    model = ds4c.load(artifact)
    with pytest.raises(InputError, match=f"token id {model.vocab_size} is out of range"):
        model([[1, 2, model.vocab_size]])
    with pytest.raises(InputError, match="token id -1"):
        model.generate([[-1, 2]], max_new_tokens=2)
    res = runner.invoke(app, ["run", str(artifact), "--prompt-ids", f"1,{model.vocab_size + 5}"])
    assert res.exit_code == 2 and "out of range" in res.output


def test_missing_entry_point_is_named(artifact):
    model = ds4c.load(artifact)
    del model._executors["prefill"]  # as an artifact imported from a decode-only ONNX file has it
    with pytest.raises(InputError, match="no 'prefill' entry point .* --entry prefill"):
        model([[1, 2, 3]])


def test_context_longer_than_compiled_maximum(artifact):
    model = ds4c.load(artifact)
    with pytest.raises(InputError, match="exceeds the compiled maximum of 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(InputError, match="--max-context"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_truncated_artifact(artifact, tmp_path):
    bad = tmp_path / "trunc.ds4"
    data = artifact.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="trunc.ds4"):
        ds4c.load(bad)
    res = runner.invoke(app, ["run", str(bad), "--prompt-ids", "1,2"])
    assert res.exit_code == 2


def _rewrite_member(src, dst, name, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, edit(data) if info.filename == name else data)


def test_tampered_artifact_fails_checksum(artifact, tmp_path):
    bad = tmp_path / "tampered.ds4"
    _rewrite_member(artifact, bad, "ir/decode.ds4ir", lambda d: d[:-2] + b"x}\n")
    with pytest.raises(ArtifactError, match="ir/decode.ds4ir"):
        ds4c.load(bad)


def test_newer_format_version_refused(artifact, tmp_path):
    bad = tmp_path / "newer.ds4"

    def newer(data):
        m = json.loads(data)
        m["format_version"] = m["format_version"] + 1
        return json.dumps(m).encode()

    _rewrite_member(artifact, bad, "manifest.json", newer)
    with pytest.raises(ArtifactError, match="newer"):
        ds4c.load(bad)
