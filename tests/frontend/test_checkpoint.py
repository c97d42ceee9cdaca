"""Loading checkpoints: transformers' save_pretrained output, sharded, DeepSeek release naming with FP8/FP4."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ds4c.errors import CheckpointError, ConfigError
from ds4c.frontend.checkpoint import deepseek_to_hf_name, load_checkpoint, read_config
from ds4c.frontend.deepseek_format import hf_to_deepseek_name, write_deepseek_checkpoint
from ds4c.frontend.formats import dequant_fp8_block, dequant_mxfp4, quant_fp8_block, quant_mxfp4
from tests.hf_configs import SMALL_CONFIGS, make_hf_model


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model(SMALL_CONFIGS["mixed"], 3)


def _spec(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def test_save_pretrained_sharded_round_trip(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    got = load_checkpoint(tmp_path, _spec(hf_model))
    for k, v in hf_model.state_dict().items():
        assert torch.equal(got[k], v), k


def test_names_round_trip_between_namings(hf_model):
    for k in hf_model.state_dict():
        if "experts.gate_up_proj" in k or "experts.down_proj" in k:
            continue
        assert deepseek_to_hf_name(hf_to_deepseek_name(k)) == k


def test_deepseek_release_format_dequantises_exactly(hf_model, tmp_path):
    sd = hf_model.state_dict()
    write_deepseek_checkpoint(sd, hf_model.config.to_dict(), tmp_path, fp8=True, fp4_experts=True, shard_bytes=150_000)
    got = load_checkpoint(tmp_path, _spec(hf_model))
    # an FP8 linear equals its own quantise -> dequantise
    w = sd["model.layers.0.self_attn.q_a_proj.weight"]
    torch.testing.assert_close(got["model.layers.0.self_attn.q_a_proj.weight"], dequant_fp8_block(*quant_fp8_block(w)),
                               rtol=0, atol=0)
    # experts: gate (w1) and up (w3) halves of expert 2, MXFP4
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
    half = gu.shape[1] // 2
    torch.testing.assert_close(got["model.layers.1.mlp.experts.gate_up_proj"][2, half:],
                               dequant_mxfp4(*quant_mxfp4(gu[2, half:])), rtol=0, atol=0)
    # bf16/fp32 tensors (norms, mHC, router, compressors) are untouched
    for k in ("model.layers.1.self_attn.compressor.kv_proj.weight", "model.layers.0.attn_hc.fn",
              "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.mlp.gate.tid2eid", "lm_head.weight"):
        assert torch.equal(got[k], sd[k]), k


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="missing config.json"):
        read_config(tmp_path)


def _one_file(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    return next(tmp_path.glob("*.safetensors"))


def test_missing_extra_misshaped_tensors(hf_model, tmp_path):
    from safetensors.torch import load_file, save_file

    spec = _spec(hf_model)
    f = _one_file(hf_model, tmp_path / "a")
    base = load_file(f)

    def write(edit):
        t = dict(base)
        edit(t)
        save_file(t, f, metadata={"format": "pt"})

    write(lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing, e.g. \['model.norm.weight'\]"):
        load_checkpoint(f.parent, spec)
    write(lambda t: t.__setitem__("model.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.bogus.weight'"):
        load_checkpoint(f.parent, spec)
    write(lambda t: t.__setitem__("model.norm.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model.norm.weight' has shape \[3\]"):
        load_checkpoint(f.parent, spec)


def test_fp8_without_scale_and_truncated_file_and_bad_index(hf_model, tmp_path):
    spec = _spec(hf_model)
    d = tmp_path / "ds"
    write_deepseek_checkpoint(hf_model.state_dict(), hf_model.config.to_dict(), d)
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    t = load_file(f)
    t.pop("layers.0.attn.wq_a.scale")
    save_file(t, f)
    with pytest.raises(CheckpointError, match="layers.0.attn.wq_a.weight' has no 'layers.0.attn.wq_a.scale'"):
        load_checkpoint(d, spec)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(d, spec)
    s = tmp_path / "sharded"
    hf_model.save_pretrained(s, max_shard_size="100KB")
    idx = json.loads((s / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "nope.safetensors"
    (s / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_checkpoint(s, spec)
    shutil.rmtree(s)


def test_loading_streams_without_doubling_memory(tmp_path):
    """Peak RSS growth while loading stays well below twice the checkpoint size."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import resource, torch
        from safetensors.torch import save_file
        from ds4c.frontend.checkpoint import load_checkpoint
        names = {{f"model.layers.{{i}}.w": (4096, 4096) for i in range(6)}}  # 6 x 64 MiB fp32
        save_file({{k: torch.ones(s) for k, s in names.items()}}, "{tmp_path}/model.safetensors")
        import gc; gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = load_checkpoint("{tmp_path}", {{k: (s, torch.float32) for k, s in names.items()}}, dtype=torch.bfloat16)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    (tmp_path / "config.json").write_text("{}")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    growth = int(res.stdout.strip().splitlines()[-1])
    ckpt = 6 * 4096 * 4096 * 4
    assert growth < 1.0 * ckpt, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {ckpt / 2**20:.0f} MiB checkpoint"
