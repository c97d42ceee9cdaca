"""Write a transformers-named DeepSeek-V4 state dict in DeepSeek's original release format.

Naming as in the release (``embed.weight``, ``layers.N.attn.wq_a.weight``, ``layers.N.ffn.experts.E.w1.weight``);
precision as shipped: FP8 e4m3 with 128x128 UE8M0 block scales for the attention and
shared-expert linears, MXFP4 for routed experts (or FP8 with ``fp4_experts=False``); embedding,
head, norms, mHC, sinks, compressors, indexer weights_proj and router stay in bf16/fp32.
Used to test the loader against exactly what DeepSeek publishes, and by users converting back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ds4c.frontend.checkpoint import deepseek_to_hf_name
from ds4c.frontend.formats import quant_fp8_block, quant_mxfp4

# transformers leaf -> release leaf, inverse of DEEPSEEK_RENAMES (verified by round trip in tests)
_REVERSE: list[tuple[str, str]] = [
    (r"^model\.", ""),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.kv_norm\.", ".KVNORM."),  # placeholder: main kv_norm keeps its name, compressor norms become .norm.
    (r"\.position_bias$", ".ape"),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
]

FP8_LEAVES = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")


def hf_to_deepseek_name(name: str) -> str:
    out = name
    shared = re.search(r"\.shared_experts\.(gate_proj|up_proj|down_proj)\.", out)
    if shared:
        out = out.replace(shared.group(0), ".shared_experts." + {"gate_proj": "w1", "down_proj": "w2",
                                                                    "up_proj": "w3"}[shared.group(1)] + ".")
    for pat, rep in _REVERSE:
        out = re.sub(pat, rep, out)
    # kv_norm: the attention's own keeps 'kv_norm'; compressors' norms are '.norm.' in the release
    if ".KVNORM." in out:
        out = out.replace(".KVNORM.", ".norm." if ".compressor." in out else ".kv_norm.")
    return out


def _is_fp8_linear(ds_name: str) -> bool:
    if not ds_name.endswith(".weight"):
        return False
    parts = ds_name.split(".")
    leaf = parts[-2]
    if ".compressor." in ds_name and leaf in ("wkv", "wgate"):
        return False  # compressor projections ship in bf16
    if ".indexer.weights_proj" in ds_name:
        return False
    if ".shared_experts." in ds_name:
        return True
    return leaf in FP8_LEAVES


def write_deepseek_checkpoint(hf_state: Mapping[str, torch.Tensor], config: Mapping[str, Any], out_dir: str | Path, *,
                              fp8: bool = True, fp4_experts: bool = True, shard_bytes: int | None = None) -> Path:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_state.items():
        t = t.detach().cpu()
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = hf_to_deepseek_name(name.rsplit(".", 1)[0] + ".x")[: -len(".x")]
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    half = t.shape[1] // 2
                    parts = {"w1": t[e, :half], "w3": t[e, half:]}
                else:
                    parts = {"w2": t[e]}
                for w, mat in parts.items():
                    key = f"{prefix}.{e}.{w}.weight"
                    if fp4_experts and mat.shape[-1] % 32 == 0:
                        q, s = quant_mxfp4(mat)
                        tensors[key], tensors[key[: -len('.weight')] + ".scale"] = q.view(torch.int8), s
                    elif fp8:
                        q, s = quant_fp8_block(mat)
                        tensors[key], tensors[key[: -len('.weight')] + ".scale"] = q, s
                    else:
                        tensors[key] = mat.to(torch.bfloat16)
            continue
        ds = hf_to_deepseek_name(name)
        if deepseek_to_hf_name(ds) != name:
            raise ValueError(f"name mapping does not round-trip: {name} -> {ds} -> {deepseek_to_hf_name(ds)}")
        if fp8 and _is_fp8_linear(ds) and t.dim() == 2:
            q, s = quant_fp8_block(t)
            tensors[ds], tensors[ds[: -len('.weight')] + ".scale"] = q, s
        elif t.is_floating_point() and t.dtype != torch.float32:
            tensors[ds] = t.contiguous()
        else:
            tensors[ds] = t.contiguous()
    (out_dir / "config.json").write_text(json.dumps(dict(config), indent=1))
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
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out_dir
