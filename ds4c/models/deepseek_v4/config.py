"""DeepSeek-V4 model configuration, read from a transformers-style ``config.json`` dict.

``ModelConfig`` is a frozen record of every hyper-parameter the ds4c model reads. Parsing and
normalisation (defaults, legacy keys such as ``compress_ratios``, ``num_hash_layers``,
``qk_rope_head_dim``, ``rope_scaling`` / ``compress_rate_csa``) are delegated to
``transformers.DeepseekV4Config``, so ds4c reads a config exactly as the oracle does. Before that,
``from_hf_dict`` validates what transformers would accept silently (a Flash-sized default for a
missing ``hidden_size``, an unsupported architecture) and raises ``ConfigError`` naming the
source, the field and the fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ds4c.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v4",)
SUPPORTED_ARCHITECTURES = ("DeepseekV4ForCausalLM",)
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
MLP_LAYER_TYPES = ("hash_moe", "moe")
LEGACY_COMPRESS_RATIOS = (0, 4, 128)
# transformers builds its router scores with ACT2FN[scoring_func]; it has no "softmax" entry.
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")
# Without these a config.json would silently get V4-Flash's sizes from transformers' defaults.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                   "q_lora_rank", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
_POSITIVE_INT_FIELDS = (*REQUIRED_FIELDS, "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                        "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings")
# Epsilons, RoPE bases and scales: zero, negative or non-finite values trace and compile, then give
# NaN or meaningless logits (x / sqrt(0 + 0) in a norm of a zero row).
_POSITIVE_FLOAT_FIELDS = ("rms_norm_eps", "hc_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of a DeepSeek-V4 model, normalised as transformers normalises it."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    partial_rotary_factor: float
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    layer_types: list[str] = field(hash=False)
    compress_rates: dict[str, int] = field(hash=False)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    mlp_layer_types: list[str] = field(hash=False)
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    # {"main": {...}, "compress": {...}} as transformers nests it (YaRN lives in "compress")
    rope_parameters: dict[str, dict[str, Any]] = field(hash=False)
    max_position_embeddings: int
    num_key_value_heads: int = 1
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # kept for the manifest (what the checkpoint ships); ds4c's loader reads the tensors themselves
    quantization_config: dict[str, Any] | None = field(default=None, hash=False)

    # -- derived --------------------------------------------------------------------------------

    @property
    def qk_rope_head_dim(self) -> int:
        """Rotated channels per head (the trailing slice), as transformers derives it."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def compress_rate_csa(self) -> int:
        return int(self.compress_rates["compressed_sparse_attention"])

    @property
    def compress_rate_hca(self) -> int:
        return int(self.compress_rates["heavily_compressed_attention"])

    def compress_rate(self, layer: int) -> int:
        """Tokens per compressed entry of ``layer`` (0: a sliding-window-only layer)."""
        return self.rate_of(self.layer_types[layer])

    def rate_of(self, layer_type: str) -> int:
        """Tokens per compressed entry of a layer of ``layer_type`` (0: sliding-window only)."""
        return 0 if layer_type == "sliding_attention" else int(self.compress_rates[layer_type])

    @cached_property
    def hf(self) -> Any:
        """The equivalent ``transformers.DeepseekV4Config`` (RoPE tables are computed by transformers' code)."""
        from transformers import DeepseekV4Config

        return DeepseekV4Config(**_without(self.to_hf_dict(), ("model_type", "architectures")))

    # -- conversion -----------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Validate and normalise a transformers ``config.json`` dict; ``source`` names it in errors."""
        _check_identity(d, source)
        _check_raw_fields(d, source)
        from transformers import DeepseekV4Config

        kwargs = {k: v for k, v in d.items() if k not in _NOT_CONFIG_KWARGS}
        try:
            hf = DeepseekV4Config(**kwargs)
        except (TypeError, ValueError, KeyError, *_strict_field_errors()) as e:
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            hint = "; write floats with a decimal point (0.0, 1e-06)" if "expected float, got int" in detail else ""
            raise ConfigError(f"{source}: transformers' DeepseekV4Config rejects it: {detail}{hint}") from e
        quant = getattr(hf, "quantization_config", None)
        config = cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads, head_dim=hf.head_dim,
            partial_rotary_factor=float(hf.partial_rotary_factor), q_lora_rank=hf.q_lora_rank,
            o_groups=hf.o_groups, o_lora_rank=hf.o_lora_rank, sliding_window=hf.sliding_window,
            layer_types=list(hf.layer_types), compress_rates={k: int(v) for k, v in hf.compress_rates.items()},
            index_n_heads=hf.index_n_heads, index_head_dim=hf.index_head_dim, index_topk=hf.index_topk,
            n_routed_experts=hf.n_routed_experts, num_experts_per_tok=hf.num_experts_per_tok,
            moe_intermediate_size=hf.moe_intermediate_size, n_shared_experts=hf.n_shared_experts,
            scoring_func=hf.scoring_func, norm_topk_prob=bool(hf.norm_topk_prob),
            routed_scaling_factor=float(hf.routed_scaling_factor), mlp_layer_types=list(hf.mlp_layer_types),
            swiglu_limit=float(hf.swiglu_limit), hc_mult=hf.hc_mult, hc_sinkhorn_iters=hf.hc_sinkhorn_iters,
            hc_eps=float(hf.hc_eps), rms_norm_eps=float(hf.rms_norm_eps), rope_theta=float(hf.rope_theta),
            compress_rope_theta=float(hf.compress_rope_theta),
            rope_parameters={k: dict(v) for k, v in hf.rope_parameters.items() if isinstance(v, dict)},
            max_position_embeddings=hf.max_position_embeddings, num_key_value_heads=hf.num_key_value_heads,
            hidden_act=hf.hidden_act, tie_word_embeddings=bool(hf.tie_word_embeddings),
            num_nextn_predict_layers=hf.num_nextn_predict_layers, bos_token_id=hf.bos_token_id,
            eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id,
            quantization_config=dict(quant) if isinstance(quant, dict) else None,
        )
        _check_consistency(config, hf, source)
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """A JSON-serialisable ``config.json`` dict; ``from_hf_dict`` and ``DeepseekV4Config(**d)`` accept it."""
        out: dict[str, Any] = {"model_type": SUPPORTED_MODEL_TYPES[0], "architectures": list(SUPPORTED_ARCHITECTURES)}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name == "quantization_config" and value is None:
                continue
            out[name] = json.loads(json.dumps(value))  # deep copy; fails loudly if not JSON-serialisable
        return out


# -- validation --------------------------------------------------------------------------------------

# Keys of a config.json that are not DeepseekV4Config constructor arguments (or that we set ourselves).
_NOT_CONFIG_KWARGS = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map",
                      "torch_dtype", "dtype", "_attn_implementation_autoset", "_attn_implementation",
                      "_experts_implementation", "output_attentions", "output_hidden_states", "return_dict"}


def _strict_field_errors() -> tuple[type[Exception], ...]:
    """What transformers' strict config dataclasses raise for a field of the wrong type (a JSON
    ``0`` where a float is declared), where its huggingface_hub has them."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub: TypeError / ValueError only
        return ()
    return (StrictDataclassError,)


def _without(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _check_identity(d: Any, source: str) -> None:
    supported = f"ds4c compiles {', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'deepseek_v4')"
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type is None:
        raise ConfigError(f"{source}: field 'model_type' is missing; {supported}: add \"model_type\": \"deepseek_v4\"")
    archs = d.get("architectures") or []  # transformers writes null for a config never saved with a model
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: unsupported architecture: model_type '{model_type}' "
                          f"(architectures {archs}); {supported}")
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: field 'architectures' must be a list of class names, got {archs!r}")
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise ConfigError(f"{source}: unsupported architecture {bad[0]!r} in field 'architectures'; {supported}")


def _check_raw_fields(d: dict[str, Any], source: str) -> None:
    missing = [k for k in REQUIRED_FIELDS if k not in d]
    if missing:
        raise ConfigError(f"{source}: required field '{missing[0]}' is missing (all of {', '.join(missing)} are); "
                          "a DeepSeek-V4 config.json states every size explicitly")
    for key in _POSITIVE_INT_FIELDS:
        if key in d and (isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] <= 0):
            raise ConfigError(f"{source}: field '{key}' must be a positive integer, got {d[key]!r}")
    # transformers maps legacy per-layer ratios to layer types through the release values only
    for i, r in enumerate(d.get("compress_ratios") or []):
        if r not in LEGACY_COMPRESS_RATIOS:
            raise ConfigError(f"{source}: field 'compress_ratios[{i}]' is {r!r}; legacy ratios must be one of "
                              f"{', '.join(map(str, LEGACY_COMPRESS_RATIOS))} (SWA, CSA, HCA): give other rates "
                              "as 'layer_types' plus 'compress_rates'")
    for key, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
        values = d.get(key)
        if values is None:
            continue
        if not isinstance(values, list):
            raise ConfigError(f"{source}: field '{key}' must be a list with one entry per layer, got {values!r}")
        for i, t in enumerate(values):
            if t not in allowed:
                raise ConfigError(f"{source}: field '{key}[{i}]' is {t!r}; allowed: {', '.join(allowed)}")
        if isinstance(d.get("num_hidden_layers"), int) and len(values) < d["num_hidden_layers"]:
            raise ConfigError(f"{source}: field '{key}' lists {len(values)} layers but 'num_hidden_layers' is "
                              f"{d['num_hidden_layers']}; give one entry per layer")


def _check_consistency(c: ModelConfig, hf: Any, source: str) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    if c.num_attention_heads % c.o_groups:
        fail(f"'num_attention_heads' ({c.num_attention_heads}) must be divisible by 'o_groups' ({c.o_groups}): "
             "the grouped output projection splits heads into equal groups")
    if c.num_key_value_heads != 1:
        fail(f"'num_key_value_heads' must be 1 (DeepSeek-V4 shares one K=V head), got {c.num_key_value_heads}")
    rope = c.qk_rope_head_dim
    if rope <= 0 or rope % 2 or rope > c.head_dim:
        fail(f"'partial_rotary_factor' ({c.partial_rotary_factor}) gives {rope} rotated dims; they must be even, "
             f"positive and <= 'head_dim' ({c.head_dim})")
    if rope > c.index_head_dim:
        fail(f"'index_head_dim' ({c.index_head_dim}) must be >= the rotated dims ({rope}): the indexer rotates "
             "the same trailing slice")
    if c.num_experts_per_tok > c.n_routed_experts:
        fail(f"'num_experts_per_tok' ({c.num_experts_per_tok}) exceeds 'n_routed_experts' ({c.n_routed_experts})")
    if c.scoring_func not in SCORING_FUNCS:
        fail(f"'scoring_func' {c.scoring_func!r} is not supported (transformers has no such router score); "
             f"use one of {', '.join(SCORING_FUNCS)}")
    if c.hidden_act != "silu":
        fail(f"'hidden_act' must be 'silu' (the SwiGLU experts), got {c.hidden_act!r}")
    if c.n_shared_experts != 1:
        fail(f"'n_shared_experts' must be 1: transformers builds exactly one shared expert of width "
             f"'moe_intermediate_size', so a checkpoint with {c.n_shared_experts} would not load")
    if not c.norm_topk_prob:
        fail("'norm_topk_prob' must be true: transformers (the reference ds4c matches) always normalises the "
             "selected routing weights")
    if getattr(hf, "mlp_bias", False) or getattr(hf, "attention_bias", False):
        fail("'mlp_bias' and 'attention_bias' must be false: DeepSeek-V4 projections have no bias")
    for kind in LAYER_TYPES[1:]:
        rate = c.compress_rates.get(kind)
        if not isinstance(rate, int) or rate <= 0:
            fail(f"'compress_rates[\"{kind}\"]' must be a positive integer, got {rate!r}")
    if set(c.rope_parameters) != {"main", "compress"}:
        fail(f"'rope_parameters' must have 'main' and 'compress' entries, got {sorted(c.rope_parameters)}")
    if not math.isfinite(c.swiglu_limit) or c.swiglu_limit <= 0:
        fail(f"'swiglu_limit' must be a positive number, got {c.swiglu_limit}")
    for key in _POSITIVE_FLOAT_FIELDS:
        value = getattr(c, key)
        if not math.isfinite(value) or value <= 0:
            fail(f"'{key}' must be a positive, finite number, got {value}; DeepSeek-V4 configs use e.g. "
                 f"{_TYPICAL[key]}")
    if c.num_nextn_predict_layers < 0:
        fail(f"'num_nextn_predict_layers' must be 0 or more, got {c.num_nextn_predict_layers}")


_TYPICAL = {"rms_norm_eps": "1e-6", "hc_eps": "1e-6", "rope_theta": "10000", "compress_rope_theta": "160000",
            "routed_scaling_factor": "1.5"}
