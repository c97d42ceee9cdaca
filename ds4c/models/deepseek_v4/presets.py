"""Built-in model presets and their deterministic random weights.

- ``tiny`` (default): small, mixes every layer kind (sliding, CSA, HCA; hash and learned routing),
  compiles and runs in seconds on a CPU.
- ``flash-slice``: DeepSeek-V4-Flash widths, 3 layers (sliding, CSA, HCA) — for GPU benchmarks.
- ``flash`` / ``pro``: the shipped V4-Flash / V4-Pro configs (43 / 61 layers).

Weights of a preset come from a seed: tensor ``name`` is drawn from a generator seeded with
sha256(f"{seed}:{name}"), so any subset, in any order, on any device, is reproducible, and an
artifact can reference "preset tiny, seed 0" instead of embedding 39 GB.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import torch

_FLASH = dict(
    model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], vocab_size=129280, hidden_size=4096,
    moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512,
    partial_rotary_factor=64 / 512, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_routed_experts=256,
    n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus", norm_topk_prob=True,
    routed_scaling_factor=1.5, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
    sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512, max_position_embeddings=1048576,
    rope_theta=10000.0, compress_rope_theta=160000.0,
    # sliding layers: plain RoPE theta 1e4; layers with a compressor: YaRN theta 1.6e5, no mscale
    rope_parameters={
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 64 / 512},
        "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "partial_rotary_factor": 64 / 512,
                     "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32.0,
                     "beta_slow": 1.0, "attention_factor": 1.0},
    },
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
    layer_types=["sliding_attention"] * 2 + ["compressed_sparse_attention", "heavily_compressed_attention"] * 20
    + ["compressed_sparse_attention"],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40,
    num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)

_PRO = dict(
    _FLASH, hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61, num_attention_heads=128,
    q_lora_rank=1536, o_groups=16, n_routed_experts=384, routed_scaling_factor=2.5, index_topk=1024,
    layer_types=["heavily_compressed_attention"] * 2
    + ["compressed_sparse_attention", "heavily_compressed_attention"] * 29 + ["compressed_sparse_attention"],
    mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 58,
)

_FLASH_SLICE = dict(
    _FLASH, num_hidden_layers=3,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
)

_TINY = dict(
    model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], vocab_size=512, hidden_size=64,
    moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
    partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
    swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, sliding_window=16,
    index_n_heads=8, index_head_dim=16, index_topk=8, max_position_embeddings=4096, rope_theta=10000.0,
    compress_rope_theta=160000.0, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
    tie_word_embeddings=False,
)

PRESETS: dict[str, dict] = {"tiny": _TINY, "flash-slice": _FLASH_SLICE, "flash": _FLASH, "pro": _PRO}
DEFAULT_PRESET = "tiny"


_CHUNK_ELEMS = 1 << 26


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def preset_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                  device: str | torch.device = "cpu", *, vocab_experts: tuple[int, int] | None = None,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One weight, deterministic in (seed, name), scaled by its role so activations stay O(1).

    A routed-expert stack ([E, ...], ``experts.`` in the name) is drawn one expert at a time, each
    from its own seed: ``rows = (start, stop)`` gives experts ``start .. stop - 1`` alone (a rank's
    shard), equal to those rows of the whole stack, without drawing the others."""
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, name))
    leaf = name.rsplit(".", 1)[-1]
    per_expert = is_expert_stack(name, shape)
    if rows is not None and not per_expert:
        raise ValueError(f"preset_weight: rows= is for routed-expert stacks, not {name} {list(shape)}")
    first, last = rows if rows is not None else (0, shape[0] if per_expert else 0)

    def fill(flat: torch.Tensor, std: float, mean: float) -> None:
        step = max(1, _CHUNK_ELEMS // max(1, flat.shape[1]))
        for i in range(0, flat.shape[0], step):
            part = flat[i:i + step]
            part.copy_(torch.randn(part.shape, generator=g, device=device, dtype=torch.float32) * std + mean)

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        # Large tensors are drawn a slab at a time straight into the target dtype, so generating
        # a 16 GiB expert stack needs no 32 GiB fp32 temporary on the device.
        out = torch.empty((last - first, *shape[1:]) if per_expert else shape, dtype=dtype, device=device)
        if out.numel() == 0:
            return out
        if per_expert:
            for e in range(first, last):
                g.manual_seed(tensor_seed(seed, f"{name}[{e}]"))
                fill(out[e - first].view(shape[1], -1), std, mean)
            return out
        fill(out.view(shape[0], -1) if len(shape) > 1 else out.view(1, -1), std, mean)
        return out

    if leaf == "tid2eid":
        vocab, k = shape
        experts = vocab_experts[1] if vocab_experts else max(k, 2 * k)
        # k distinct experts per token: the k smallest of random keys
        keys = torch.rand((vocab, experts), generator=g, device=device)
        return keys.topk(k, dim=-1, largest=False).indices.to(torch.long)
    if "norm" in name:
        return normal(0.05, 1.0)
    if leaf in ("fn", "hc_fn"):
        return normal(0.02)
    if leaf in ("base", "hc_base", "sinks", "position_bias"):
        return normal(0.5)
    if leaf in ("scale", "hc_scale"):
        return normal(0.1, 1.0)
    if leaf == "e_score_correction_bias":
        return normal(0.1)
    if "embed" in name:
        return normal(1.0)
    fan_in = shape[-1] if len(shape) else 1
    return normal(1.0 / math.sqrt(fan_in))


def is_expert_stack(name: str, shape: tuple[int, ...]) -> bool:
    """A routed experts' weight stack [E, rows, cols] (drawn per expert: ``preset_weight``)."""
    return len(shape) == 3 and ".experts." in f".{name}"


def init_preset_weights(expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]], seed: int,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        shard: Mapping[str, list[dict[str, int]]] | None = None,
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Generate every expected weight (floating ones in ``dtype``), one at a time. ``shard``:
    name -> slices (ds4c.passes.shard_experts) of a rank: those tensors come as the rank's slices,
    an expert stack's experts drawn alone (the whole stack is never made)."""
    from ds4c.distributed.shards import leading_rows, slice_tensor

    shard = shard or {}
    experts = None
    for name, (shape, _) in expected.items():
        if name.endswith("experts.gate_up_proj"):
            experts = (0, shape[0])
            break
    for name, (shape, want) in expected.items():
        dt = want if not want.is_floating_point else dtype
        rows, slices = leading_rows(shard.get(name, []))
        if rows is not None and not is_expert_stack(name, tuple(shape)):  # drawn whole, then cut
            rows, slices = None, list(shard[name])
        t = preset_weight(name, tuple(shape), dt, seed, device, vocab_experts=experts, rows=rows)
        yield name, slice_tensor(t, slices, name).clone() if slices else t
