"""Weights that arrive packed stay packed (#25): an FP8 / MXFP4 tensor of a DeepSeek-release
checkpoint compiled in the format it ships keeps its bytes in the checkpoint, in the artifact
(embedded) and in the loaded model's packed weight (embedded, and referenced: read at load)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save_file

import ds4c
from ds4c.artifact.artifact import WEIGHTS_MEMBER, read_artifact
from ds4c.frontend.checkpoint import load_checkpoint, packable, read_config
from ds4c.frontend.deepseek_format import write_deepseek_checkpoint
from ds4c.frontend.trace import build_meta_model, param_spec
from ds4c.models.deepseek_v4 import ModelConfig
from ds4c.quant import get_format
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

FP8 = ("layers.1.attn.wo_b", "model.layers.1.self_attn.o_b_proj.weight")  # (release name, transformers name)
EXPERTS = "model.layers.1.mlp.experts"


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A release-format checkpoint whose FP8 ``wo_b`` of layer 1 is stored the way no packer
    writes it (small integer codes under a large scale), so its bytes can only come from the file."""
    hf = make_hf_model(SMALL_CONFIGS["mixed"], seed=0)
    d = write_deepseek_checkpoint(hf.state_dict(), hf.config.to_dict(), tmp_path_factory.mktemp("release"),
                                  fp8=True, fp4_experts=True)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    g = torch.Generator().manual_seed(3)
    q = stored[f"{FP8[0]}.weight"]
    stored[f"{FP8[0]}.weight"] = torch.randint(-14, 15, q.shape, generator=g).float().to(torch.float8_e4m3fn)
    stored[f"{FP8[0]}.scale"] = torch.full(stored[f"{FP8[0]}.scale"].shape, 2.0**-8).to(torch.float8_e8m0fnu)
    save_file(stored, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d, stored


@pytest.fixture(scope="module")
def artifacts(release, tmp_path_factory):
    d, _ = release
    out = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for mode in ("embed", "reference"):
        art = ds4c.compile(str(d), target="h100", precision="mxfp4-experts", max_context=64, progress=False,
                           weights=mode)
        paths[mode] = art.save(out / f"{mode}.ds4")
    return paths


def _expert_bytes(stored, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's per-expert MXFP4 tensors stacked as ds4c stores gate_up (w1 above w3) / down (w2)."""
    order = ("w2",) if part == "down_proj" else ("w1", "w3")
    q = torch.stack([torch.cat([stored[f"layers.1.ffn.experts.{e}.{w}.weight"] for w in order]) for e in range(4)])
    s = torch.stack([torch.cat([stored[f"layers.1.ffn.experts.{e}.{w}.scale"] for w in order]) for e in range(4)])
    return q.view(torch.uint8), s.view(torch.uint8)


def test_fp8_tensor_has_the_checkpoints_sha256_in_the_artifact_and_the_loaded_model(release, artifacts):
    _, stored = release
    q, s = stored[f"{FP8[0]}.weight"], stored[f"{FP8[0]}.scale"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    manifest, _, container = read_artifact(artifacts["embed"])
    embedded = st_load(container.read_bytes(WEIGHTS_MEMBER))
    assert sha(embedded[f"{FP8[1]}.qdata"]) == sha(q) and sha(embedded[f"{FP8[1]}.scale"]) == sha(s)
    logits = {}
    for mode, path in artifacts.items():
        manifest = read_artifact(path)[0]
        assert manifest["weights"]["mode"] == mode
        # what the source gives: the packed tensors, so nothing dequantises and packs them again
        assert f"{FP8[1]}.qdata" in manifest["weights"]["source_tensors"]
        assert FP8[1] not in manifest["weights"]["source_tensors"]
        model = ds4c.load(path, backend="reference")
        got = model.weights[f"{FP8[1]}.qdata"]
        assert got.dtype == torch.float8_e4m3fn and sha(got) == sha(q), mode
        assert sha(model.weights[f"{FP8[1]}.scale"]) == sha(s), mode
        logits[mode] = model(torch.arange(12).view(1, 12) % 150)
    assert torch.isfinite(logits["embed"]).all() and torch.equal(logits["embed"], logits["reference"])


def test_mxfp4_experts_keep_their_bytes_too(release, artifacts):
    _, stored = release
    for mode, path in artifacts.items():
        model = ds4c.load(path, backend="reference")
        for part in ("gate_up_proj", "down_proj"):
            q, s = _expert_bytes(stored, part)
            assert sha(model.weights[f"{EXPERTS}.{part}.qdata"]) == sha(q), (mode, part)
            assert sha(model.weights[f"{EXPERTS}.{part}.scale"]) == sha(s), (mode, part)


def test_requantising_would_change_the_bytes_and_other_formats_are_repacked(release):
    """Why pass-through matters: packing the dequantised weight again gives the same values in other
    bytes (the packer picks the smallest scale that holds the block: codes up to 448, not 14). A
    format other than the shipped one is packed from the dequantised weight (``packable`` says no)."""
    d, stored = release
    spec = param_spec(build_meta_model(ModelConfig.from_hf_dict(read_config(d), source="test"), 64, torch.float32))
    assert packable(d, spec, {FP8[1]: "fp8", f"{EXPERTS}.gate_up_proj": "mxfp4"}) == \
        {FP8[1]: "fp8", f"{EXPERTS}.gate_up_proj": "mxfp4"}
    assert packable(d, spec, {FP8[1]: "int8", f"{EXPERTS}.gate_up_proj": "fp8"}) == {}
    w = load_checkpoint(d, spec)[FP8[1]]  # dequantised
    repacked = get_format("fp8").pack(w)
    assert torch.equal(get_format("fp8").unpack(repacked, tuple(w.shape)), w)  # the same values ...
    assert sha(repacked["qdata"]) != sha(stored[f"{FP8[0]}.weight"])  # ... in other bytes
