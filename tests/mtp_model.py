"""A small model whose MTP block is worth drafting with (#28): the ``mixed`` config trained briefly on
the synthetic bigram language (tests/quant/synthetic_language.py), then its MTP block trained on the
frozen main model's final streams to predict the token after next. The block starts from
well-scaled random weights, so fewer training steps give a worse drafter: tests that need
rejected drafts use one trained for a few steps."""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from ds4c.models.deepseek_v4 import DeepseekV4Model, ModelConfig
from tests.hf_configs import SMALL_CONFIGS
from tests.quant.synthetic_language import bigram_batch, trained_model

MAX_CONTEXT = 384


@functools.lru_cache(maxsize=4)
def _mtp_model(mtp_steps: int, seed: int) -> tuple[DeepseekV4Model, torch.Tensor]:
    hf, successor, g = trained_model("mixed")
    cfg = ModelConfig.from_hf_dict(dict(SMALL_CONFIGS["mixed"], num_nextn_predict_layers=1), source="mixed")
    model = DeepseekV4Model(cfg, MAX_CONTEXT, mtp=True)
    missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mtp.") for k in missing), (missing, unexpected)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.mtp.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name:
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=gen))
            elif leaf in ("fn", "hc_fn"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif leaf in ("base", "hc_base", "sinks", "scale", "hc_scale"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) + (1.0 if "scale" in leaf else 0.0))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.zero_()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.mtp.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=3e-3)
    for _ in range(mtp_steps):
        x = bigram_batch(successor, 8, 64, g)
        with torch.no_grad():
            h = model.final_streams(x)
        logits = model.mtp_logits(h[:, :-2], x[:, 1:-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 2:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), successor


def mtp_model(mtp_steps: int = 150, seed: int = 7) -> tuple[DeepseekV4Model, torch.Tensor]:
    """(model with its MTP block trained ``mtp_steps`` AdamW steps, successor table); each caller gets
    its own copy."""
    model, successor = _mtp_model(mtp_steps, seed)
    return copy.deepcopy(model), successor.clone()


def save_checkpoint(model: DeepseekV4Model, directory) -> str:
    """``model`` (with its MTP block) as a checkpoint directory in ds4c's (transformers') naming:
    ``model.safetensors`` and the ``mixed`` config.json with ``num_nextn_predict_layers=1``."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = dict(SMALL_CONFIGS["mixed"], num_nextn_predict_layers=1, architectures=["DeepseekV4ForCausalLM"])
    (out / "config.json").write_text(json.dumps(config))
    return str(out)
