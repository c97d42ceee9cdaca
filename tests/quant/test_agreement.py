"""Acceptance: greedy next-token agreement with the fp32 oracle (transformers) over 512 positions,
bf16 compute, per policy; KL of the output distribution reported."""

from __future__ import annotations

import pytest
import torch

import ds4c
from ds4c.quant.metrics import agreement
from ds4c.runtime.model import CompiledModel
from tests.quant.synthetic_language import bigram_batch, trained_model

POSITIONS = (4, 128)  # 4 teacher-forced sequences of 128 tokens, one prefill each


@pytest.fixture(scope="module")
def oracle():
    model, successor, g = trained_model("mixed")
    ids = bigram_batch(successor, *POSITIONS, g)
    with torch.no_grad():
        want = model(ids).logits
    return model, ids, want


@pytest.mark.parametrize("policy,minimum", [("fp8", 0.99), ("auto", 0.97)])
def test_greedy_agreement_with_the_fp32_oracle(oracle, policy, minimum):
    model, ids, want = oracle
    art = ds4c.compile(model, target="b200", precision=policy, max_context=160, progress=False)
    prec = art.manifest["precision"]
    got = CompiledModel(art.manifest, art.program, dict(art.weights), torch.device("cpu"))(ids)
    res = agreement(got, want)
    print(f"mixed (trained) b200 {policy}: {res}; weights {prec['weight_bytes'] / prec['bf16_weight_bytes']:.3f}x bf16")
    assert res.positions == 512 and res.greedy_agreement >= minimum, res
    assert res.kl < (0.02 if policy == "fp8" else 0.05), res
    assert prec["weight_bytes"] < 0.6 * prec["bf16_weight_bytes"]
