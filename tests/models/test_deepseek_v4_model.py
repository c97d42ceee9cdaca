"""ds4c's DeepSeek-V4 (explicit state, two entry points) equals transformers' DeepseekV4ForCausalLM.

The oracle is transformers' eager model in fp32 with random, well-scaled weights (tests/hf_configs.py):
prefill == its full forward, prefill + decode == a longer prefill, greedy decoding == its
``generate``; both entry points export with dynamic shapes and without data-dependent ops.
"""

from __future__ import annotations

import json

import pytest
import torch

from ds4c.errors import ConfigError, InputError
from ds4c.models.deepseek_v4 import DeepseekV4Model, ModelConfig, StateSpec, export_entry_points
from ds4c.models.deepseek_v4.model import ENTRY_PARAM_PREFIX
from ds4c.models.deepseek_v4.presets import PRESETS
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

# Not a multiple of any compression rate: the last compressed buffer slot is a partial window.
MAX_CONTEXT = 50
TOL = 1e-4
# aten ops whose output shape or control flow depends on tensor values: none may be exported
DATA_DEPENDENT_OPS = {"nonzero", "item", "_local_scalar_dense", "index_add", "index_add_", "masked_select",
                      "unique", "_unique2", "bincount", "histc"}


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def pair(request):
    name = request.param
    hf = make_hf_model(SMALL_CONFIGS[name], seed=1234)
    ours = DeepseekV4Model(ModelConfig.from_hf_dict(SMALL_CONFIGS[name], source=name), MAX_CONTEXT).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return name, hf, ours


def _ids(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _decode_steps(model: DeepseekV4Model, ids: torch.Tensor, start: int, state: tuple) -> tuple[torch.Tensor, tuple]:
    """Decode ids[:, start:] one token at a time; the logits of every step, concatenated."""
    steps = []
    for p in range(start, ids.shape[1]):
        out = model.decode(ids[:, p:p + 1], torch.tensor(p), *state)
        steps.append(out[0])
        state = out[1:]
    return torch.cat(steps, dim=1), state


@torch.no_grad()
def test_prefill_equals_transformers_forward(pair):
    name, hf, ours = pair
    ids = _ids(2, MAX_CONTEXT, hf.config.vocab_size, seed=7)  # the whole context: every buffer slot used
    want = hf(ids).logits
    got = ours.prefill(ids)[0]
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _err(got, want) <= TOL, name


@torch.no_grad()
def test_prefill_then_decode_equals_longer_prefill(pair):
    name, hf, ours = pair
    n, m = 19, 14  # aligned with neither the compression rates nor the sliding window
    ids = _ids(2, n + m, hf.config.vocab_size, seed=3)
    full = ours.prefill(ids)
    out = ours.prefill(ids[:, :n])
    steps, state = _decode_steps(ours, ids, n, out[1:])
    assert _err(torch.cat([out[0], steps], dim=1), full[0]) <= TOL, name
    # The state after decoding equals the state after prefilling the same tokens, except in the
    # compressor tail slots not yet refilled in the current window (decode leaves the previous
    # window's tokens there; they are overwritten before the window closes, so never read).
    for spec, a, b in zip(ours.state_specs(2), state, full[1:], strict=True):
        if spec.name.endswith(("_kv_state", "_score_state")):
            filled = (n + m) % spec.shape[1]
            a, b = a[:, :filled], b[:, :filled]
        assert _err(torch.nan_to_num(a), torch.nan_to_num(b)) <= TOL, f"{name}: {spec.name}"


@torch.no_grad()
def test_decode_from_empty_state_equals_prefill(pair):
    name, hf, ours = pair
    ids = _ids(1, 11, hf.config.vocab_size, seed=5)
    empty = tuple(torch.full(s.shape, s.fill, dtype=s.dtype) for s in ours.state_specs(1))
    got, _ = _decode_steps(ours, ids, 0, empty)
    assert _err(got, ours.prefill(ids)[0]) <= TOL, name


@torch.no_grad()
def test_greedy_generation_equals_transformers_generate(pair):
    name, hf, ours = pair
    ids = _ids(1, 13, hf.config.vocab_size, seed=11)
    hf.generation_config.eos_token_id = None  # compare all 32 tokens, not a stop at EOS
    want = hf.generate(ids, max_new_tokens=32, do_sample=False)
    out = ours.prefill(ids)
    logits, state, tokens = out[0], out[1:], [ids]
    for p in range(ids.shape[1], ids.shape[1] + 32):
        tokens.append(logits[:, -1:].argmax(-1))
        if p < ids.shape[1] + 31:
            out = ours.decode(tokens[-1], torch.tensor(p), *state)
            logits, state = out[0], out[1:]
    assert torch.cat(tokens, dim=1).tolist() == want.tolist(), name


def test_state_specs_layout():
    model = DeepseekV4Model(ModelConfig.from_hf_dict(SMALL_CONFIGS["mixed"]), MAX_CONTEXT)
    specs = model.state_specs(3)
    assert all(isinstance(s, StateSpec) for s in specs)
    got = {s.name: (s.shape, s.fill) for s in specs}
    inf = float("-inf")
    # layer 0 sliding; layer 1 CSA (m=4, overlap: two halves, plus the indexer); layer 2 HCA (m'=8)
    assert got == {
        "layers.0.window_kv": ((3, 8, 32), 0.0),
        "layers.1.window_kv": ((3, 8, 32), 0.0),
        "layers.1.compressed_kv": ((3, 13, 32), 0.0),
        "layers.1.compressor_kv_state": ((3, 4, 64), 0.0),
        "layers.1.compressor_score_state": ((3, 4, 64), inf),
        "layers.1.compressor_prev_kv": ((3, 4, 32), 0.0),
        "layers.1.compressor_prev_score": ((3, 4, 32), inf),
        "layers.1.indexer_keys": ((3, 13, 16), 0.0),
        "layers.1.indexer_compressor_kv_state": ((3, 4, 32), 0.0),
        "layers.1.indexer_compressor_score_state": ((3, 4, 32), inf),
        "layers.1.indexer_compressor_prev_kv": ((3, 4, 16), 0.0),
        "layers.1.indexer_compressor_prev_score": ((3, 4, 16), inf),
        "layers.2.window_kv": ((3, 8, 32), 0.0),
        "layers.2.compressed_kv": ((3, 7, 32), 0.0),
        "layers.2.compressor_kv_state": ((3, 8, 32), 0.0),
        "layers.2.compressor_score_state": ((3, 8, 32), inf),
    }
    assert [s.name for s in specs][:3] == ["layers.0.window_kv", "layers.1.window_kv", "layers.1.compressed_kv"]
    out = model.eval().prefill(torch.zeros(3, 5, dtype=torch.long))
    assert [tuple(t.shape) for t in out[1:]] == [s.shape for s in specs]
    with pytest.raises(InputError, match="max_context=50"):
        model.prefill(torch.zeros(1, MAX_CONTEXT + 1, dtype=torch.long))


def test_parameter_names_equal_transformers_and_meta_construction():
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    for name, cfg in SMALL_CONFIGS.items():
        hf = make_hf_model(cfg, seed=0)
        ours = DeepseekV4Model(ModelConfig.from_hf_dict(cfg), MAX_CONTEXT)
        want = {k: (tuple(v.shape), v.dtype) for k, v in hf.state_dict().items()}
        assert {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()} == want, name
    # a full-size config builds on the meta device; RoPE tables are real and equal transformers'
    config = ModelConfig.from_hf_dict(PRESETS["flash"])
    with torch.device("meta"):
        big = DeepseekV4Model(config, max_context=1 << 20)
    assert big.lm_head.weight.is_meta and big.model.layers[42].mlp.experts.gate_up_proj.shape == (256, 4096, 4096)
    ref = DeepseekV4RotaryEmbedding(DeepseekV4Config(**{k: v for k, v in PRESETS["flash"].items()
                                                         if k != "model_type"}))
    for kind in ("main", "compress"):
        table = getattr(big.model.rotary, f"{kind}_inv_freq")
        assert table.device.type == "cpu" and torch.equal(table, getattr(ref, f"{kind}_inv_freq")), kind
    specs = {s.name: s.shape for s in big.state_specs(1)}
    assert specs["layers.2.compressed_kv"] == (1, 1 << 18, 512) and specs["layers.3.compressed_kv"] == (1, 8192, 512)


@torch.no_grad()
def test_entry_points_export_with_dynamic_shapes():
    cfg = SMALL_CONFIGS["mixed"]
    hf = make_hf_model(cfg, seed=1234)
    ours = DeepseekV4Model(ModelConfig.from_hf_dict(cfg), MAX_CONTEXT).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    eps = export_entry_points(ours)
    for entry, ep in eps.items():
        targets = {s.target for s in ep.graph_signature.input_specs if s.kind.name in ("PARAMETER", "BUFFER")
                   and s.persistent is not False}
        assert targets == {ENTRY_PARAM_PREFIX + k for k in hf.state_dict()}, entry  # transformers' names
        ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        data_dependent = {o for o in ops if o.startswith("aten.") and o.split(".")[1] in DATA_DEPENDENT_OPS}
        assert not data_dependent, f"{entry}: {data_dependent}"
    ids = _ids(3, 23, cfg["vocab_size"], seed=2)  # batch and length other than the examples
    want = ours.prefill(ids)
    got = eps["prefill"].module()(ids)
    assert all(_err(torch.nan_to_num(a), torch.nan_to_num(b)) <= 1e-5 for a, b in zip(got, want, strict=True))
    tok = _ids(3, 1, cfg["vocab_size"], seed=4)
    want = ours.decode(tok, torch.tensor(23), *want[1:])
    got = eps["decode"].module()(tok, torch.tensor(23), *got[1:])
    assert all(_err(torch.nan_to_num(a), torch.nan_to_num(b)) <= 1e-5 for a, b in zip(got, want, strict=True))


# -- ModelConfig ---------------------------------------------------------------------------------------

def test_config_round_trip_and_transformers_accepts_it():
    from transformers import DeepseekV4Config

    for name, cfg in [*SMALL_CONFIGS.items(), ("flash", PRESETS["flash"])]:
        c = ModelConfig.from_hf_dict(cfg, source=name)
        d = c.to_hf_dict()
        d = json.loads(json.dumps(d))  # it goes into artifact manifests
        assert ModelConfig.from_hf_dict(d) == c, name
        hf = DeepseekV4Config(**d)
        assert hf.layer_types == c.layer_types and hf.rope_parameters == c.hf.rope_parameters, name
        assert hf.qk_rope_head_dim == c.qk_rope_head_dim, name


def test_config_legacy_keys_equal_modern_ones():
    base = {k: v for k, v in SMALL_CONFIGS["hca_first"].items()
            if k not in ("layer_types", "mlp_layer_types", "partial_rotary_factor", "compress_rates")}
    # transformers maps legacy ratios through the release values (0/4/128) to layer types; the
    # small rates come from the legacy scalar keys
    legacy = dict(base, compress_ratios=[128, 128, 4], num_hash_layers=1, qk_rope_head_dim=8,
                  compress_rate_csa=4, compress_rate_hca=8)
    assert ModelConfig.from_hf_dict(legacy) == ModelConfig.from_hf_dict(SMALL_CONFIGS["hca_first"])
    c = ModelConfig.from_hf_dict(SMALL_CONFIGS["hca_first"])
    assert c.rope_parameters["compress"]["rope_type"] == "yarn" and c.rope_parameters["main"]["rope_type"] == "default"
    assert c.compress_rate(0) == 8 and c.compress_rate(2) == 4 and c.qk_rope_head_dim == 8


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, r"unsupported architecture.*llama.*DeepseekV4ForCausalLM"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, r"unsupported architecture 'DeepseekV3ForCausalLM'.*architectures"),
    ({"model_type": None}, r"'model_type' is missing"),
    ({"hidden_size": None}, r"required field 'hidden_size' is missing"),
    ({"hidden_size": 0}, r"'hidden_size' must be a positive integer"),
    ({"o_groups": 3}, r"'num_attention_heads' \(4\) must be divisible by 'o_groups' \(3\)"),
    ({"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, r"'layer_types\[1\]'"),
    ({"mlp_layer_types": ["moe"]}, r"'mlp_layer_types' lists 1 layers"),
    ({"num_experts_per_tok": 9}, r"'num_experts_per_tok' \(9\) exceeds 'n_routed_experts' \(4\)"),
    ({"scoring_func": "softmax"}, r"'scoring_func'.*sqrtsoftplus"),
    ({"num_key_value_heads": 2}, r"'num_key_value_heads' must be 1"),
    ({"partial_rotary_factor": 17 / 32}, r"'partial_rotary_factor'"),
    ({"compress_ratios": [0, 8, 4]}, r"'compress_ratios\[1\]' is 8"),
])
def test_config_errors_name_source_and_field(change, match):
    d = dict(SMALL_CONFIGS["mixed"], **change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_hf_dict(d, source="ckpt/config.json")
    assert str(info.value).startswith("ckpt/config.json: ")
