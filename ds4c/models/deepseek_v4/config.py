"""DeepSeek-V4 model configuration, read from a transformers-style ``config.json`` dict.

Parsing and normalisation (legacy keys such as ``compress_ratios``, ``num_hash_layers``,
``rope_scaling``) are delegated to ``transformers.DeepseekV4Config`` so ds4c reads configs exactly
as the oracle does; ``ModelConfig`` validates first and raises errors that name the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ds4c.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v4",)
SUPPORTED_ARCHITECTURES = ("DeepseekV4ForCausalLM",)
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
_DROP = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "auto_map",
         "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict",
         "_experts_implementation", "_attn_implementation"}


@dataclass(frozen=True)
class ModelConfig:
    hf: Any  # transformers.DeepseekV4Config, normalised

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "hf"), name)

    @property
    def compress_rate_csa(self) -> int:
        return int(self.hf.compress_rates["compressed_sparse_attention"])

    @property
    def compress_rate_hca(self) -> int:
        return int(self.hf.compress_rates["heavily_compressed_attention"])

    def compress_rate(self, layer: int) -> int:
        t = self.hf.layer_types[layer]
        return 0 if t == "sliding_attention" else int(self.hf.compress_rates[t])

    @property
    def rope_dim(self) -> int:
        return int(self.hf.qk_rope_head_dim)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type is None and not archs:
            raise ConfigError(f"{source}: field 'model_type' is missing; DeepSeek-V4 checkpoints say "
                              f"\"model_type\": \"deepseek_v4\"")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: unsupported architecture: model_type '{model_type}' "
                              f"(architectures {archs}); ds4c compiles {', '.join(SUPPORTED_ARCHITECTURES)} "
                              f"(model_type 'deepseek_v4')")
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad:
            raise ConfigError(f"{source}: unsupported architecture {bad[0]}; ds4c compiles "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key in d and (not isinstance(d[key], int) or d[key] <= 0):
                raise ConfigError(f"{source}: field '{key}' must be a positive integer, got {d[key]!r}")
        for key, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
            for i, t in enumerate(d.get(key) or []):
                if t not in allowed:
                    raise ConfigError(f"{source}: field '{key}[{i}]' is '{t}'; allowed: {', '.join(allowed)}")
        from transformers import DeepseekV4Config

        kwargs = {k: v for k, v in d.items() if k not in _DROP and k != "model_type"}
        try:
            hf = DeepseekV4Config(**kwargs)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{source}: transformers' DeepseekV4Config rejects it: {e}") from e
        n = hf.num_hidden_layers
        if len(hf.layer_types) != n or len(hf.mlp_layer_types) != n:
            raise ConfigError(f"{source}: 'layer_types'/'mlp_layer_types' must list {n} layers "
                              f"(num_hidden_layers), got {len(hf.layer_types)}/{len(hf.mlp_layer_types)}")
        if hf.num_attention_heads % hf.o_groups:
            raise ConfigError(f"{source}: 'num_attention_heads' ({hf.num_attention_heads}) must be divisible by "
                              f"'o_groups' ({hf.o_groups})")
        if hf.num_key_value_heads != 1:
            raise ConfigError(f"{source}: 'num_key_value_heads' must be 1 (DeepSeek-V4 shares one K=V head), "
                              f"got {hf.num_key_value_heads}")
        if hf.qk_rope_head_dim % 2 or hf.qk_rope_head_dim > hf.head_dim:
            raise ConfigError(f"{source}: rope dims ({hf.qk_rope_head_dim}) must be even and <= head_dim")
        if hf.num_experts_per_tok > hf.n_routed_experts:
            raise ConfigError(f"{source}: 'num_experts_per_tok' ({hf.num_experts_per_tok}) exceeds "
                              f"'n_routed_experts' ({hf.n_routed_experts})")
        if hf.scoring_func not in ("sqrtsoftplus", "softmax", "sigmoid"):
            raise ConfigError(f"{source}: 'scoring_func' '{hf.scoring_func}' is not supported")
        return cls(hf)

    def to_hf_dict(self) -> dict[str, Any]:
        d = self.hf.to_dict()
        out = {k: v for k, v in d.items() if k not in _DROP}
        out["model_type"] = "deepseek_v4"
        out["architectures"] = list(SUPPORTED_ARCHITECTURES)
        json.dumps(out)  # must be JSON-serialisable: it goes into artifact manifests
        return out
