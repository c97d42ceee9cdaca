"""DeepSeek's original release format: tensor names, which tensors ship quantised, and a writer.

One table, ``LAYER_NAMES`` / ``MODEL_NAMES``, pairs every release name with its transformers name
(from transformers' ``conversion_mapping.py`` entry for ``deepseek_v4``; a test checks the two
agree tensor by tensor). Both directions read it: the loader (``checkpoint.py``) and the writer below.

Release naming: ``embed.weight``, ``layers.N.attn.wq_a.weight``, ``layers.N.ffn.experts.E.w1.weight``,
``hc_head_fn``, ... Routed experts are one tensor per expert (w1 = gate, w3 = up, w2 = down); transformers
stacks them into ``mlp.experts.gate_up_proj`` [E, 2I, D] (gate rows first, then up) and
``mlp.experts.down_proj`` [E, D, I].

Precision as shipped (DSV4_ARCHITECTURE.md §6): FP8 e4m3 with 128x128 UE8M0 block scales for the
attention projections (wq_a, wq_b, wkv, wo_a, wo_b, indexer wq_b) and the shared expert; MXFP4
(e2m1 packed two per int8 byte, UE8M0 scale per 32 inputs) for routed experts (FP8 in -Base);
bf16 for the embedding, head, norms, compressor wkv/wgate, indexer weights_proj and router
weight; fp32 for mHC parameters, attention sinks, compressor ape and the router bias; int64 tid2eid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ds4c.quant.formats import FP8_BLOCK, MX_BLOCK, quant_fp8_block, quant_mxfp4

# (release name inside a block, transformers name inside ``model.layers.N``, release dtype class)
# dtype class: "fp8" = FP8 linear in the release, "bf16", "fp32", "int" = kept as is.
LAYER_NAMES: list[tuple[str, str, str]] = [
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight", "fp8"),
    ("attn.q_norm.weight", "self_attn.q_a_norm.weight", "bf16"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight", "fp8"),
    ("attn.wkv.weight", "self_attn.kv_proj.weight", "fp8"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight", "bf16"),
    ("attn.wo_a.weight", "self_attn.o_a_proj.weight", "fp8"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight", "fp8"),
    ("attn.attn_sink", "self_attn.sinks", "fp32"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias", "fp32"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight", "bf16"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight", "bf16"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight", "bf16"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias", "fp32"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight", "bf16"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight", "bf16"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight", "bf16"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight", "fp8"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight", "bf16"),
    ("ffn.gate.weight", "mlp.gate.weight", "bf16"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias", "fp32"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid", "int"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight", "fp8"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight", "fp8"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight", "fp8"),
    ("attn_norm.weight", "input_layernorm.weight", "bf16"),
    ("ffn_norm.weight", "post_attention_layernorm.weight", "bf16"),
    ("hc_attn_fn", "attn_hc.fn", "fp32"),
    ("hc_attn_base", "attn_hc.base", "fp32"),
    ("hc_attn_scale", "attn_hc.scale", "fp32"),
    ("hc_ffn_fn", "ffn_hc.fn", "fp32"),
    ("hc_ffn_base", "ffn_hc.base", "fp32"),
    ("hc_ffn_scale", "ffn_hc.scale", "fp32"),
]
MODEL_NAMES: list[tuple[str, str, str]] = [
    ("embed.weight", "model.embed_tokens.weight", "bf16"),
    ("norm.weight", "model.norm.weight", "bf16"),
    ("head.weight", "lm_head.weight", "bf16"),
    ("hc_head_fn", "model.hc_head.hc_fn", "fp32"),
    ("hc_head_base", "model.hc_head.hc_base", "fp32"),
    ("hc_head_scale", "model.hc_head.hc_scale", "fp32"),
]
# The MTP block's own tensors (release ``mtp.N.<name>``, ds4c ``mtp.N.<name>``; shared/DSV4_ARCHITECTURE.md
# section 7); its attention, MoE, norms and mHC are named as a layer's (LAYER_NAMES).
MTP_NAMES: list[tuple[str, str, str]] = [
    ("e_proj.weight", "e_proj.weight", "fp8"),
    ("h_proj.weight", "h_proj.weight", "fp8"),
    ("enorm.weight", "enorm.weight", "bf16"),
    ("hnorm.weight", "hnorm.weight", "bf16"),
    ("norm.weight", "norm.weight", "bf16"),
    ("hc_head_fn", "hc_head.hc_fn", "fp32"),
    ("hc_head_base", "hc_head.hc_base", "fp32"),
    ("hc_head_scale", "hc_head.hc_scale", "fp32"),
]
# Other spellings accepted when loading: transformers' save_pretrained reverses its own mapping
# and writes the attention's kv_norm as ``attn.norm`` (its regex ``.norm.`` -> ``.kv_norm.``
# also covers the compressors' norms); DeepSeek's release spells it ``attn.kv_norm``.
LAYER_ALIASES: dict[str, str] = {"attn.norm.weight": "attn.kv_norm.weight"}
# routed experts: release w1 (gate) and w3 (up) -> gate_up_proj rows [0, I) and [I, 2I); w2 -> down_proj
EXPERT_PARTS = ("w1", "w3", "w2")

_LAYER_TO_HF = {ds: hf for ds, hf, _ in LAYER_NAMES}
_LAYER_TO_DS = {hf: ds for ds, hf, _ in LAYER_NAMES}
_MTP_TO_HF = {**_LAYER_TO_HF, **{ds: hf for ds, hf, _ in MTP_NAMES}}
_MTP_TO_DS = {**_LAYER_TO_DS, **{hf: ds for ds, hf, _ in MTP_NAMES}}
_MODEL_TO_HF = {ds: hf for ds, hf, _ in MODEL_NAMES}
_MODEL_TO_DS = {hf: ds for ds, hf, _ in MODEL_NAMES}
_RELEASE_CLASS = {ds: c for ds, _, c in LAYER_NAMES + MODEL_NAMES}
_MTP_CLASS = {**{ds: c for ds, _, c in LAYER_NAMES}, **{ds: c for ds, _, c in MTP_NAMES}}
# a block: ``layers.N`` (ds4c: ``model.layers.N``) or the MTP block ``mtp.N`` (ds4c: ``mtp.N``)
_DS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_DS_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_MTP = re.compile(r"^mtp\.(\d+)\.(.+)$")
DS_EXPERT = re.compile(r"^(?P<block>layers\.(?P<layer>\d+)|mtp\.\d+)\.ffn\.experts\.(?P<expert>\d+)\."
                       r"(?P<part>w[123])\.weight$")
_HF_EXPERTS = re.compile(r"^(model\.layers\.\d+|mtp\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _hf_block(ds_block: str) -> str:
    """``layers.3`` -> ``model.layers.3``; ``mtp.0`` stays."""
    return ds_block if ds_block.startswith("mtp.") else f"model.{ds_block}"


def deepseek_to_hf_name(name: str) -> str | None:
    """Release name (``layers.3.attn.wq_a.weight``, ``mtp.0.e_proj.weight``) -> ds4c's (transformers')
    name, None if it is not one. Routed experts map to their stacked tensor (``...mlp.experts.gate_up_proj``)."""
    if name in _MODEL_TO_HF:
        return _MODEL_TO_HF[name]
    m = DS_EXPERT.match(name)
    if m:
        which = "down_proj" if m["part"] == "w2" else "gate_up_proj"
        return f"{_hf_block(m['block'])}.mlp.experts.{which}"
    m = _DS_LAYER.match(name)
    if m and LAYER_ALIASES.get(m[2], m[2]) in _LAYER_TO_HF:
        return f"model.layers.{m[1]}.{_LAYER_TO_HF[LAYER_ALIASES.get(m[2], m[2])]}"
    m = _DS_MTP.match(name)
    if m and LAYER_ALIASES.get(m[2], m[2]) in _MTP_TO_HF:
        return f"mtp.{m[1]}.{_MTP_TO_HF[LAYER_ALIASES.get(m[2], m[2])]}"
    return None


def hf_to_deepseek_name(name: str) -> str | None:
    """ds4c (transformers) name -> release name, None if it is not one (or is a stacked expert
    tensor: those are one release tensor per expert, see ``expert_release_names``)."""
    if name in _MODEL_TO_DS:
        return _MODEL_TO_DS[name]
    m = _HF_LAYER.match(name)
    if m and m[2] in _LAYER_TO_DS:
        return f"layers.{m[1]}.{_LAYER_TO_DS[m[2]]}"
    m = _HF_MTP.match(name)
    if m and m[2] in _MTP_TO_DS:
        return f"mtp.{m[1]}.{_MTP_TO_DS[m[2]]}"
    return None


def is_hf_name(name: str) -> bool:
    return hf_to_deepseek_name(name) is not None or _HF_EXPERTS.match(name) is not None


def expert_release_names(hf_name: str, n_experts: int) -> dict[str, list[str]]:
    """``model.layers.N.mlp.experts.gate_up_proj`` -> {"w1": [per expert], "w3": [...]}; down_proj -> {"w2": ...}."""
    m = _HF_EXPERTS.match(hf_name)
    if not m:
        raise ValueError(f"'{hf_name}' is not a stacked routed-expert tensor")
    parts = ("w2",) if m[2] == "down_proj" else ("w1", "w3")
    block = m[1].removeprefix("model.")
    return {p: [f"{block}.ffn.experts.{e}.{p}.weight" for e in range(n_experts)] for p in parts}


def release_dtype_class(release_name: str) -> str:
    """"fp8", "fp4" (routed experts), "bf16", "fp32" or "int": how DeepSeek ships this tensor."""
    if DS_EXPERT.match(release_name):
        return "fp4"
    m = _DS_MTP.match(release_name)
    if m:
        return _MTP_CLASS.get(m[2], "fp32")
    m = _DS_LAYER.match(release_name)
    return _RELEASE_CLASS.get(m[2] if m else release_name, "fp32")


def scale_name(weight_name: str) -> str:
    """``x.weight`` -> ``x.scale`` (the release's name for block scales)."""
    return weight_name.removesuffix(".weight") + ".scale"


def release_config(config: Mapping[str, Any], *, fp8: bool, fp4_experts: bool) -> dict[str, Any]:
    """The config.json DeepSeek ships: transformers keys plus the quantisation record."""
    out = dict(config)
    for key in ("quantization_config", "expert_dtype"):
        out.pop(key, None)
    if fp8:
        out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "scale_fmt": "ue8m0", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    if fp4_experts:
        out["expert_dtype"] = "fp4"
    return out


def _release_tensors(name: str, t: torch.Tensor, cls: str, *, fp8: bool, fp4_experts: bool):
    """(release name, tensor) pairs for one 2-D/1-D weight of dtype class ``cls``."""
    if cls == "fp4" and fp4_experts and t.shape[-1] % MX_BLOCK == 0:
        q, s = quant_mxfp4(t)
        return [(name, q.view(torch.int8)), (scale_name(name), s)]
    if cls in ("fp8", "fp4") and fp8:
        q, s = quant_fp8_block(t)
        return [(name, q), (scale_name(name), s)]
    if fp8 and cls in ("bf16", "fp8", "fp4"):
        return [(name, t.to(torch.bfloat16).contiguous())]
    if fp8 and cls == "fp32":
        return [(name, t.float().contiguous())]
    return [(name, t.contiguous())]


def write_deepseek_checkpoint(hf_state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                              out_dir: str | Path, *, fp8: bool = True, fp4_experts: bool = True,
                              shard_bytes: int | None = None) -> Path:
    """Write a transformers-named state dict in DeepSeek's release naming and precision.

    ``fp8=True``: FP8 linears with 128x128 UE8M0 scales, bf16/fp32 elsewhere as shipped;
    ``fp8=False``: every non-expert tensor keeps its dtype (lossless). ``fp4_experts``: routed
    experts as MXFP4 (else FP8 when ``fp8``, else unchanged). ``shard_bytes``: split into
    ``model-0000i-of-0000n.safetensors`` files of about that size plus
    ``model.safetensors.index.json``; else one ``model.safetensors``. Writes ``config.json``.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_state_dict.items():
        t = t.detach().cpu()
        if _HF_EXPERTS.match(name):
            parts = expert_release_names(name, t.shape[0])
            half = t.shape[1] // 2
            for part, names in parts.items():
                for e, ds in enumerate(names):
                    mat = t[e] if part == "w2" else (t[e, :half] if part == "w1" else t[e, half:])
                    tensors.update(_release_tensors(ds, mat, "fp4", fp8=fp8, fp4_experts=fp4_experts))
            continue
        ds = hf_to_deepseek_name(name)
        if ds is None:
            raise ValueError(f"'{name}' is not a DeepSeek-V4 transformers parameter name; pass the state_dict() "
                             "of a transformers DeepseekV4ForCausalLM")
        tensors.update(_release_tensors(ds, t, release_dtype_class(ds), fp8=fp8, fp4_experts=fp4_experts))
    (out_dir / "config.json").write_text(json.dumps(release_config(config, fp8=fp8, fp4_experts=fp4_experts),
                                                    indent=1))
    if not shard_bytes:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out_dir
