"""Presets: valid configs, deterministic seeded weights, sizes as shipped."""

import torch

from ds4c.frontend.trace import build_meta_model, param_spec
from ds4c.models.deepseek_v4 import ModelConfig
from ds4c.models.deepseek_v4.presets import PRESETS, init_preset_weights, preset_weight


def test_every_preset_is_a_valid_config():
    for name, cfg in PRESETS.items():
        c = ModelConfig.from_hf_dict(cfg, source=f"preset {name}")
        assert len(c.layer_types) == c.num_hidden_layers


def test_flash_and_pro_parameter_counts_match_the_model_card():
    # the model card's totals exclude the MTP block: Flash 284B, Pro 1.6T (DSV4_ARCHITECTURE.md §1)
    for name, total in (("flash", 284e9), ("pro", 1.6e12)):
        model = build_meta_model(ModelConfig.from_hf_dict(PRESETS[name]), 4096, torch.bfloat16)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - total) / total < 0.03, (name, n)


def test_weights_are_deterministic_and_order_independent():
    model = build_meta_model(ModelConfig.from_hf_dict(PRESETS["tiny"]), 64, torch.float32)
    spec = param_spec(model)
    a = dict(init_preset_weights(spec, seed=0))
    b = dict(init_preset_weights(dict(reversed(list(spec.items()))), seed=0))
    c = dict(init_preset_weights(spec, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    t = a["model.layers.0.mlp.gate.tid2eid"]
    assert t.dtype == torch.long and (t < 8).all() and all(len(set(r.tolist())) == t.shape[1] for r in t)
    assert torch.equal(preset_weight("x.weight", (3, 4), torch.float32, 5), preset_weight("x.weight", (3, 4),
                                                                                         torch.float32, 5))
