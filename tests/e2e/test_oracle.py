"""Acceptance: compiled artifacts equal transformers' DeepseekV4ForCausalLM (the oracle)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

runner = CliRunner()


@pytest.fixture(scope="module", params=sorted(SMALL_CONFIGS))
def compiled(request, tmp_path_factory):
    name = request.param
    d = tmp_path_factory.mktemp(name)
    hf = make_hf_model(SMALL_CONFIGS[name], seed=1234)
    hf.save_pretrained(d / "ckpt")
    out = d / "model.ds4"
    res = runner.invoke(app, ["compile", str(d / "ckpt"), "--target", "cpu", "-o", str(out), "--max-context", "96"])
    assert res.exit_code == 0, res.output
    return name, hf, ds4c.load(out), d


def test_logits_equal_transformers(compiled):
    name, hf, model, _ = compiled
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, hf.config.vocab_size, (2, 61), generator=g)
    want = hf(ids).logits
    got = model(ids)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"{name}: max abs error {err}"


def test_greedy_generate_equals_transformers(compiled):
    name, hf, model, _ = compiled
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, hf.config.vocab_size, (1, 13), generator=g)
    hf.generation_config.eos_token_id = None  # compare 32 tokens, not a stop at EOS
    want = hf.generate(ids, max_new_tokens=32, do_sample=False)
    got = model.generate(ids, max_new_tokens=32)
    assert got.tolist() == want.tolist(), name


def test_prefill_then_decode_equals_longer_prefill(compiled):
    name, hf, model, _ = compiled
    g = torch.Generator().manual_seed(3)
    n, m = 19, 14  # aligned with neither the compression ratios nor the window
    ids = torch.randint(0, hf.config.vocab_size, (2, n + m), generator=g)
    full = model(ids)
    logits, state = model.prefill(ids[:, :n])
    steps = [logits]
    for i in range(m):
        logits, state = model.decode(ids[:, n + i: n + i + 1], n + i, state)
        steps.append(logits)
    got = torch.cat(steps, dim=1)
    err = (got - full).abs().max().item()
    assert err <= 1e-4, f"{name}: max abs error {err}"


def test_deepseek_naming_fp8_fp4_equals_transformers_on_dequantized(compiled, tmp_path):
    from ds4c.frontend.checkpoint import load_checkpoint
    from ds4c.frontend.deepseek_format import write_deepseek_checkpoint

    name, hf, _, d = compiled
    if name != sorted(SMALL_CONFIGS)[0]:
        pytest.skip("one config is enough for the DeepSeek-naming path")
    ds_dir = tmp_path / "deepseek"
    write_deepseek_checkpoint(hf.state_dict(), hf.config.to_dict(), ds_dir, fp8=True, fp4_experts=True)
    out = tmp_path / "ds.ds4"
    res = runner.invoke(app, ["compile", str(ds_dir), "--target", "cpu", "-o", str(out), "--max-context", "96"])
    assert res.exit_code == 0, res.output
    model = ds4c.load(out)
    # the oracle runs on the dequantised weights
    expected = {k: (tuple(v.shape), v.dtype) for k, v in hf.state_dict().items()}
    deq = load_checkpoint(ds_dir, expected)
    hf2 = make_hf_model(SMALL_CONFIGS[name], seed=1234)
    hf2.load_state_dict(deq)
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    err = (model(ids) - hf2(ids).logits).abs().max().item()
    assert err <= 1e-4
    hf2.generation_config.eos_token_id = None
    assert model.generate(ids[:, :9], max_new_tokens=32).tolist() == \
        hf2.generate(ids[:, :9], max_new_tokens=32, do_sample=False).tolist()
