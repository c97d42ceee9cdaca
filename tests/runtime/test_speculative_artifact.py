"""Speculative decoding from a compiled artifact (#28): `ds4c compile --serving --speculative K` of a
checkpoint whose MTP block is trained (tests/mtp_model.py, saved in transformers' naming with its
``mtp.0.*`` tensors), run by ds4c.Engine and `ds4c bench serve --speculative K`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from ds4c.runtime.sampling import SamplingParams
from tests.hf_configs import SMALL_CONFIGS
from tests.mtp_model import MAX_CONTEXT, mtp_model
from tests.quant.synthetic_language import bigram_batch


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, successor = mtp_model(150)
    ckpt = tmp_path_factory.mktemp("mtp_ckpt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    config = dict(SMALL_CONFIGS["mixed"], num_nextn_predict_layers=1, architectures=["DeepseekV4ForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path_factory.mktemp("art") / "mixed_mtp.ds4"
    result = CliRunner().invoke(app, ["compile", str(ckpt), "--target", "cpu", "--precision", "fp32", "--max-context",
                                      str(MAX_CONTEXT), "--serving", "--serving-opt", "window_page=4", "--serving-opt",
                                      "comp_page=16", "--serving-opt", "max_chunk=32", "--serving-opt",
                                      "max_running=12", "--speculative", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out, model, successor


def test_compiled_speculation_gives_plain_greedy_tokens_and_accepts(artifact):
    path, model, successor = artifact
    compiled = ds4c.load(path)
    assert compiled.manifest["serving"]["mtp"]["pools"][0]["name"] == "mtp.0.window_kv_pool"
    g = torch.Generator().manual_seed(4)
    prompts = [bigram_batch(successor, 1, n, g)[0].tolist() for n in (1, 9, 33, 70, 130)]
    outs, lengths = {}, {}
    for k in (0, 3):
        engine = ds4c.Engine(compiled, speculative=k, pages={"window": 300, "compressed": 120, "slots": 13})
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=40)) for p in prompts]
        engine.run_until_idle()
        outs[k], lengths[k] = [r.output_ids for r in reqs], engine.stats()["acceptance_length"]
        engine.close()
    assert outs[3] == outs[0]
    assert lengths[3] >= 2.0


def test_bench_serve_reports_the_acceptance_length(artifact, tmp_path):
    path, _, _ = artifact
    report = tmp_path / "spec.json"
    result = CliRunner().invoke(app, ["bench", "serve", str(path), "--requests", "6", "--concurrency", "3",
                                      "--prompt-len", "8:40", "--output-len", "8:24", "--compare", "none",
                                      "--speculative", "3", "--json", str(report)])
    assert result.exit_code == 0, result.output
    spec = json.loads(report.read_text())["engine"]["speculative"]
    assert spec["drafts"] == 3 and spec["acceptance_length"] >= 1.0


def test_compile_refuses_speculative_without_serving_or_mtp():
    from ds4c.errors import ConfigError

    with pytest.raises(ConfigError, match="add --serving"):
        ds4c.compile("tiny", target="cpu", speculative=2, progress=False)
    from tests.hf_configs import make_hf_model

    with pytest.raises(ConfigError, match="no MTP block"):
        ds4c.compile(make_hf_model(SMALL_CONFIGS["mixed"]), target="cpu", serving=True, speculative=2, progress=False)
