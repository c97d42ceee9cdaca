"""Presets: valid transformers configs, the shipped layer schedules and sizes, deterministic seeded weights."""

import hashlib
import subprocess
import sys

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from ds4c.frontend.trace import build_meta_model, param_spec
from ds4c.models.deepseek_v4 import ModelConfig
from ds4c.models.deepseek_v4.presets import PRESETS, init_preset_weights, preset_weight


def test_every_preset_is_a_valid_transformers_config():
    for name, cfg in PRESETS.items():
        hf = DeepseekV4Config(**cfg)
        assert len(hf.layer_types) == len(hf.mlp_layer_types) == hf.num_hidden_layers, name
        c = ModelConfig.from_hf_dict(cfg, source=f"preset {name}")
        assert c.layer_types == hf.layer_types
        assert "rope_scaling" not in cfg and "compress_ratios" not in cfg and "num_hash_layers" not in cfg, name


def _norm(rope):
    return {kind: {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in p.items() if k != "type"}
            for kind, p in rope.items()}


def test_shipped_schedules_and_rope_match_the_legacy_release_keys():
    # DSV4_ARCHITECTURE.md §1.2: compress_ratios Flash [0,0]+[4,128]*20+[4], Pro [128,128]+[4,128]*29+[4]
    legacy = dict(rope_scaling={"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                                "beta_fast": 32, "beta_slow": 1}, num_hash_layers=3)
    for name, ratios in (("flash", [0, 0] + [4, 128] * 20 + [4]), ("pro", [128, 128] + [4, 128] * 29 + [4])):
        cfg = {k: v for k, v in PRESETS[name].items()
               if k not in ("layer_types", "mlp_layer_types", "rope_parameters")}
        old = DeepseekV4Config(**cfg, **legacy, compress_ratios=ratios)
        new = DeepseekV4Config(**PRESETS[name])
        assert new.layer_types == old.layer_types and new.mlp_layer_types == old.mlp_layer_types, name
        assert _norm(new.rope_parameters) == _norm(old.rope_parameters), name
        assert new.mlp_layer_types[:4] == ["hash_moe"] * 3 + ["moe"]
    slice_ = DeepseekV4Config(**PRESETS["flash-slice"])
    flash = DeepseekV4Config(**PRESETS["flash"])
    assert slice_.layer_types == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    assert {k: v for k, v in slice_.to_dict().items() if "layer" not in k} == \
        {k: v for k, v in flash.to_dict().items() if "layer" not in k}


def test_flash_and_pro_parameter_counts_match_the_model_card():
    # Model card: Flash 284B, Pro 1.6T total. DSV4_ARCHITECTURE.md §1.1 shows these exclude the MTP block;
    # we count transformers' parameters (main model: embed, 43/61 blocks, head; no MTP, no tid2eid buffer):
    # Flash 284.33e9, Pro 1.573e12.
    for name, total, tol in (("flash", 284e9, 0.005), ("pro", 1.6e12, 0.03)):
        with torch.device("meta"):
            model = DeepseekV4ForCausalLM(DeepseekV4Config(**PRESETS[name]))
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - total) / total < tol, (name, n)


def _tiny_spec():
    return param_spec(build_meta_model(ModelConfig.from_hf_dict(PRESETS["tiny"]), 64, torch.float32))


def test_weights_are_deterministic_and_order_independent():
    spec = _tiny_spec()
    a = dict(init_preset_weights(spec, seed=0))
    b = dict(init_preset_weights(dict(reversed(list(spec.items()))), seed=0))
    c = dict(init_preset_weights(spec, seed=1))
    assert list(a) == list(spec)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    for k, (shape, _) in spec.items():
        assert tuple(a[k].shape) == tuple(shape) and torch.isfinite(a[k].float()).all(), k
    t = a["model.layers.0.mlp.gate.tid2eid"]
    assert t.dtype == torch.long and (t >= 0).all() and (t < 8).all()
    assert all(len(set(r.tolist())) == t.shape[1] for r in t)
    assert torch.equal(preset_weight("x.weight", (3, 4), torch.float32, 5, "cpu"),
                       preset_weight("x.weight", (3, 4), torch.float32, 5, "cpu"))


def _digest(weights) -> str:
    h = hashlib.sha256()
    for k, v in weights:
        h.update(k.encode())
        h.update(v.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_weights_are_identical_across_processes():
    here = _digest(init_preset_weights(_tiny_spec(), seed=7))
    script = ("from tests.models.test_presets import _digest, _tiny_spec\n"
              "from ds4c.models.deepseek_v4.presets import init_preset_weights\n"
              "print(_digest(init_preset_weights(_tiny_spec(), seed=7)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == here
