"""Small DeepSeek-V4 configs for oracle tests, and transformers models with random weights.

Every config crosses many compression boundaries within a few dozen tokens (CSA m=4, HCA m'=8
or 16) and exceeds its sliding window. The indexer has 8 heads: with fewer, ReLU makes many
index scores exactly 0 and top-k ties break differently between any two implementations
(transformers itself gives different picks for prefill and decode then).
"""

from __future__ import annotations

import math

import torch

_BASE = dict(
    model_type="deepseek_v4", vocab_size=160, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16,
    n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3, index_n_heads=8,
    index_head_dim=16, index_topk=2, num_nextn_predict_layers=0, max_position_embeddings=4096,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
)

SMALL_CONFIGS: dict[str, dict] = {
    # Flash-like order: sliding, CSA, HCA; one hash layer
    "mixed": dict(_BASE, num_hidden_layers=3,
                  layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
                  mlp_layer_types=["hash_moe", "moe", "moe"]),
    # CSA-heavy, 4 streams, two hash layers, wider top-k and more experts
    "csa_heavy": dict(_BASE, num_hidden_layers=4, hc_mult=4, hc_sinkhorn_iters=5, n_routed_experts=8,
                      num_experts_per_tok=3, index_topk=3, sliding_window=6,
                      compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                      layer_types=["compressed_sparse_attention", "compressed_sparse_attention", "sliding_attention",
                                   "heavily_compressed_attention"],
                      mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]),
    # Pro-like start: HCA first, 3 streams, YaRN on the compressed layers
    "hca_first": dict(_BASE, num_hidden_layers=3, hc_mult=3, sliding_window=5, index_topk=4,
                      layer_types=["heavily_compressed_attention", "heavily_compressed_attention",
                                   "compressed_sparse_attention"],
                      mlp_layer_types=["hash_moe", "moe", "moe"],
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                    "beta_fast": 32, "beta_slow": 1}),
    # half the head dim rotated, groups of 1 head, 4 streams
    "wide_rope": dict(_BASE, num_hidden_layers=4, hc_mult=4, partial_rotary_factor=0.5, o_groups=4, o_lora_rank=8,
                      sliding_window=7, index_topk=5,
                      layer_types=["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                                   "heavily_compressed_attention"],
                      mlp_layer_types=["hash_moe", "moe", "moe", "moe"]),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Well-scaled random weights for every parameter, plus random tid2eid and routing bias."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif leaf in ("fn", "hc_fn"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif leaf in ("base", "hc_base", "sinks", "position_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif leaf in ("scale", "hc_scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
                table = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(cfg.vocab_size)])
                gate.tid2eid.copy_(table)
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.copy_(0.3 * torch.randn(gate.e_score_correction_bias.shape, generator=g))
    return model


def make_hf_model(cfg: dict, seed: int = 0):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    d = {k: v for k, v in cfg.items() if k != "model_type"}
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**d)).eval()
    return randomize_(model, seed)
