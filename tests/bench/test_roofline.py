"""The decode roofline (ds4c.bench.roofline) on numbers checked by hand."""

import torch

from ds4c.bench.roofline import decode_bytes, decode_state_bytes

CFG = {"n_routed_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, "sliding_window": 16, "index_topk": 3,
       "index_head_dim": 4, "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
       "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]}


def test_state_bytes_per_layer_kind():
    # context 64: window 16 rows x 8 everywhere; CSA 16 entries: top 3 x 8 + 16 x 4 indexer; HCA 2 x 8
    rows = 16 * 8 + (16 * 8 + 3 * 8 + 16 * 4) + (16 * 8 + 2 * 8)
    assert decode_state_bytes(CFG, 64, itemsize=2) == 2 * rows
    assert decode_state_bytes(CFG, 8, itemsize=1) == 8 * 8 + (8 * 8 + 2 * 8 + 2 * 4) + 8 * 8  # short: window = 8


def test_weight_bytes_count_the_experts_a_batch_can_pick():
    params = {"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 10, dtype=torch.bfloat16),
              "model.layers.0.mlp.shared_experts.up_proj.weight": torch.zeros(10, dtype=torch.bfloat16),
              "model.embed_tokens.weight": torch.zeros(100, 2, dtype=torch.float32)}
    # batch 1: 2 of 4 experts (40 of 80 bytes), the shared expert (20), one embedding row (8), + state
    assert decode_bytes(params, CFG, 1, 5) == 40 + 20 + 8 + 5
    # batch 2: expected distinct experts 4 * (1 - (1/2)^2) = 3
    assert decode_bytes(params, CFG, 2, 0) == 60 + 20 + 16
