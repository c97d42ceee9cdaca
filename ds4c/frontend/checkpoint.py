"""Checkpoint directories: ``config.json`` + ``*.safetensors`` (single or sharded with an index),
in transformers' naming or in DeepSeek's original release naming (FP8 block-scaled linears,
MXFP4-packed routed experts, dequantised here).

Tensors are read memory-mapped (``safetensors.safe_open``) and converted one at a time straight
into the destination dtype/device, so loading never holds two copies of the checkpoint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import CheckpointError, ConfigError
from ds4c.frontend.formats import dequant_fp8_block, dequant_mxfp4

INDEX = "model.safetensors.index.json"
Spec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]

# DeepSeek release naming -> transformers naming, applied in order (transformers' conversion_mapping
# for deepseek_v4). Experts (w1/w3 -> gate_up_proj, w2 -> down_proj) are merged separately.
DEEPSEEK_RENAMES: list[tuple[str, str]] = [
    (r"\.attn\.", ".self_attn."),
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight", "embed_tokens.weight"),
    (r"^head\.weight", "lm_head.weight"),
    (r"^hc_head_fn", "hc_head.hc_fn"),
    (r"^hc_head_base", "hc_head.hc_base"),
    (r"^hc_head_scale", "hc_head.hc_scale"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"),
    (r"\.hc_attn_base", ".attn_hc.base"),
    (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"),
    (r"\.hc_ffn_base", ".ffn_hc.base"),
    (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),
    (r"\.ape", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_COMPILED = [(re.compile(a), b) for a, b in DEEPSEEK_RENAMES]


def deepseek_to_hf_name(name: str) -> str:
    """Any on-disk name (release naming, transformers naming, or the mix ``save_pretrained`` writes)
    -> the transformers module name."""
    out = name.removeprefix("model.")
    for pat, rep in _COMPILED:
        out = pat.sub(rep, out)
    if not out.startswith("lm_head."):
        out = "model." + out
    return out


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: not a directory; pass a checkpoint directory with config.json")
    if not path.is_file():
        raise ConfigError(f"{path}: missing config.json; a checkpoint directory needs config.json next to its "
                          "*.safetensors (e.g. from save_pretrained)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or re-save the config") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return cfg


class _Files:
    """Which file holds which tensor; files opened lazily, memory-mapped."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.dir = directory
        self._open = safe_open
        self.handles: dict[Path, Any] = {}
        self.where: dict[str, Path] = {}
        index = directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e}); it needs a 'weight_map' object") from None
            for name, fname in weight_map.items():
                f = directory / fname
                if not f.is_file():
                    raise CheckpointError(f"{index}: tensor '{name}' is in '{fname}', which does not exist")
                self.where[name] = f
            for f in set(self.where.values()):
                keys = set(self._handle(f).keys())
                for name, ff in self.where.items():
                    if ff == f and name not in keys:
                        raise CheckpointError(f"{index}: says '{name}' is in {f.name}, but that file does not hold it")
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no *.safetensors files; save the model with safe_serialization")
            for f in files:
                for name in self._handle(f).keys():
                    if name in self.where:
                        raise CheckpointError(f"{directory}: tensor '{name}' appears in {self.where[name].name} and {f.name}")
                    self.where[name] = f

    def _handle(self, f: Path) -> Any:
        h = self.handles.get(f)
        if h is None:
            try:
                h = self._open(str(f), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise CheckpointError(f"{f}: unreadable safetensors file ({e}); it may be truncated — re-save it") from None
            self.handles[f] = h
        return h

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self._handle(f).get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read tensor '{name}' ({e}); the file may be truncated") from None

    def shape(self, name: str) -> tuple[int, ...]:
        f = self.where[name]
        return tuple(self._handle(f).get_slice(name).get_shape())


def detect_naming(keys) -> str:
    """'hf' when tensors use transformers' module names, else 'deepseek' (release names)."""
    keys = list(keys)
    if any(".self_attn." in k or ".mlp." in k or k.startswith("lm_head.") for k in keys):
        return "hf"
    return "deepseek"


def _cast(t: torch.Tensor, want: torch.dtype, dtype: torch.dtype, device: Any) -> torch.Tensor:
    target = dtype if want.is_floating_point else want
    return t.to(device=device, dtype=target)


def _dequant(files: _Files, name: str) -> torch.Tensor:
    """A DeepSeek tensor as fp32, dequantising FP8 (block 128) or MXFP4 (block 32) when it has a scale."""
    t = files.get(name)
    scale_name = name[: -len(".weight")] + ".scale" if name.endswith(".weight") else None
    is_fp8 = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    is_fp4 = t.dtype in (torch.int8, torch.uint8) or t.dtype == getattr(torch, "float4_e2m1fn_x2", None)
    if not (is_fp8 or is_fp4):
        return t
    if scale_name is None or scale_name not in files.where:
        raise CheckpointError(f"{files.where[name]}: {t.dtype} tensor '{name}' has no '{scale_name}' scale tensor; "
                              "FP8/FP4 weights need their block scales")
    scale = files.get(scale_name)
    if is_fp8:
        return dequant_fp8_block(t, scale, 128)
    return dequant_mxfp4(t, scale, 32)


def load_checkpoint(directory: str | Path, expected: Spec, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Every tensor of ``expected`` (transformers names -> (shape, dtype)) from the checkpoint in ``directory``."""
    directory = Path(directory)
    files = _Files(directory)
    total = len(expected)
    out: dict[str, torch.Tensor] = {}

    def check(name: str, got: tuple[int, ...], src: str) -> None:
        want = tuple(expected[name][0])
        if tuple(got) != want:
            raise CheckpointError(f"{files.where.get(src, directory)}: tensor '{src}' has shape {list(got)}, the "
                                  f"model expects {list(want)} for '{name}'; the checkpoint does not match config.json")

    # Names are normalised to transformers' module names whatever the file uses: the release
    # naming, transformers' own, or the mix save_pretrained writes (model.layers.N.attn.wq_a...).
    experts: dict[str, dict[int, dict[str, str]]] = {}
    plain: dict[str, str] = {}
    ignored: list[str] = []
    for key in files.where:
        if key.endswith(".scale"):
            continue
        if key.removeprefix("model.").startswith("mtp."):
            ignored.append(key)  # the multi-token-prediction block: not part of the main model
            continue
        m = _EXPERT.match(key)
        if m:
            target_prefix = deepseek_to_hf_name(m.group("prefix") + ".x")[: -len(".x")]
            experts.setdefault(target_prefix, {}).setdefault(int(m.group("e")), {})[m.group("w")] = key
            continue
        plain[deepseek_to_hf_name(key)] = key
    produced = set(plain)
    for prefix in experts:
        produced |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
    extra = sorted(k for k in produced if k not in expected)
    if extra:
        src = plain.get(extra[0], extra[0])
        raise CheckpointError(f"{directory}: unexpected tensor '{src}' (maps to '{extra[0]}'); the checkpoint does not "
                              "match config.json")
    missing = [k for k in expected if k not in produced]
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} tensor(s) missing, e.g. {missing[:10]} (transformers "
                              "names); the checkpoint is incomplete or for another config")
    done = 0
    for name, src in plain.items():
        t = _dequant(files, src)
        check(name, tuple(t.shape), src)
        out[name] = _cast(t, expected[name][1], dtype, device)
        done += 1
        if progress:
            progress(done, total)
    for prefix, per_expert in experts.items():
        gu_name, down_name = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
        e_count, two_i, hidden = expected[gu_name][0]
        if sorted(per_expert) != list(range(e_count)):
            raise CheckpointError(f"{directory}: {prefix}: experts {sorted(per_expert)[:5]}... present, expected "
                                  f"0..{e_count - 1}")
        gate_up = torch.empty((e_count, two_i, hidden), dtype=dtype, device=device)
        down = torch.empty(tuple(expected[down_name][0]), dtype=dtype, device=device)
        for e, ws in per_expert.items():
            for w in ("w1", "w2", "w3"):
                if w not in ws:
                    raise CheckpointError(f"{directory}: expert {e} of {prefix} has no {w} weight")
            w1, w3, w2 = (_dequant(files, ws[w]) for w in ("w1", "w3", "w2"))
            if tuple(w1.shape) != (two_i // 2, hidden) or w1.shape != w3.shape:
                raise CheckpointError(f"{files.where[ws['w1']]}: '{ws['w1']}' has shape {list(w1.shape)}, expected "
                                      f"{[two_i // 2, hidden]}")
            if tuple(w2.shape) != tuple(down.shape[1:]):
                raise CheckpointError(f"{files.where[ws['w2']]}: '{ws['w2']}' has shape {list(w2.shape)}, expected "
                                      f"{list(down.shape[1:])}")
            gate_up[e, : two_i // 2] = w1.to(dtype)
            gate_up[e, two_i // 2:] = w3.to(dtype)
            down[e] = w2.to(dtype)
        out[gu_name], out[down_name] = gate_up, down
        done += 2
        if progress:
            progress(done, total)
    return {k: out[k] for k in expected}
