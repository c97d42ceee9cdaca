"""Fusion patterns fire on a graph traced from transformers' DeepseekV4ForCausalLM (code we did not write)."""

from __future__ import annotations

import pytest
import torch

from ds4c.frontend.fx_import import import_exported_program
from ds4c.ir import Program, parse_graph, print_graph, verify_graph
from ds4c.ir.interpreter import run_graph
from ds4c.passes import PassContext, PassManager
from ds4c.targets import get_target

transformers = pytest.importorskip("transformers")

HF_TINY = dict(
    vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2, o_lora_rank=16,
    n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, hc_mult=2, hc_sinkhorn_iters=3, index_n_heads=2,
    index_head_dim=16, index_topk=2, num_nextn_predict_layers=0,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
)


def _trace(overrides: dict | None = None, seq: int = 24):
    """The transformers model of ``HF_TINY | overrides`` with random weights, exported and imported."""
    cfg = transformers.DeepseekV4Config(**{**HF_TINY, **(overrides or {})})
    cfg._experts_implementation = "batched_mm"  # export-friendly experts; the model code is untouched
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in name:
                p.normal_(0, 0.2)
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(4)[:2] for _ in range(128)]))
            if hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.1)
    ids = torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(1))

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ep = torch.export.export(Logits(model), (ids,), strict=False)
    g = import_exported_program(ep, "hf", input_names=["input_ids"], output_names=["logits"], param_prefix="m.")
    params = {k: v for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    return g, params, ids, want


def _fuse(g):
    ctx = PassContext(target=get_target("cpu"), program_attrs={"dim_names": {"input_ids": ["B", "S"]}})
    prog = PassManager("default", ctx=ctx).run(Program({"hf": g}, ctx.program_attrs))
    return prog.graphs["hf"], prog.attrs["fusion"]["hf"]


@pytest.fixture(scope="module")
def hf_traced():
    return _trace()


def test_fused_hf_graph_equals_transformers(hf_traced):
    g, params, ids, want = hf_traced
    fused, fusion = _fuse(g)
    verify_graph(fused)
    got = run_graph(fused, {"input_ids": ids}, params)["logits"]
    assert (got - want).abs().max().item() <= 1e-5
    counts = fused.op_counts()
    # 3 layers: q_a, kv, compressor kv (x2 for CSA incl. indexer) weighted norms + final norm ...
    assert fusion["rms_norm.weighted"] == 16
    assert fusion["rms_norm.unweighted"] == 10  # q_b_norm x3, mHC input norms x6, head x1
    assert fusion["rope"] == 13  # q, kv, output per layer (9) + 3 compressors + indexer queries
    assert fusion["mhc.pre"] == 6 and fusion["mhc.post"] == 6 and fusion["mhc.head"] == 1  # 2 per layer + head
    assert "aten.rsqrt.default" not in counts and "aten.stack.default" not in counts
    assert "aten.sigmoid.default" not in counts  # every mHC gate is inside an mhc op
    # one attention per layer, recognised by kind; the grouped output projection of each
    assert (fusion["attention.sliding"], fusion["attention.csa"], fusion["attention.hca"]) == (1, 1, 1)
    assert fusion["linear.grouped"] == 3
    assert fusion["moe"] == 3  # one hash-routed and two bias-routed layers
    assert fusion["compress"] == 3 and fusion["indexer.topk"] == 1  # CSA main + indexer, HCA; one indexer
    for name in ("aten.softmax.int", "aten.topk.default", "aten.matmul.default", "aten.bmm.default"):
        assert name not in counts, f"{name} left outside a fused op"
    assert not any(op.name == "aten.softmax.int" and op.loc and op.loc.endswith("self_attn") for op in fused.ops)
    text = print_graph(fused)
    assert print_graph(parse_graph(text)) == text


# The released models' layer orders at small width: Flash starts sliding, sliding, then CSA/HCA
# alternate; Pro starts HCA, HCA, then CSA/HCA alternate; both route their first three MoE layers by
# token hash. CSE shares one flattened view of the token ids among the hash layers, which once left
# every hash layer of such a model unfused (each layer's gather of whole expert matrices per token).
RELEASE_ORDERS = {
    "flash": ["sliding_attention"] * 2 + ["compressed_sparse_attention", "heavily_compressed_attention"] * 2,
    "pro": ["heavily_compressed_attention"] * 2 + ["compressed_sparse_attention", "heavily_compressed_attention"] * 2,
}


@pytest.mark.parametrize("order", sorted(RELEASE_ORDERS))
def test_release_layer_order_fuses_every_moe_layer(order):
    layers = RELEASE_ORDERS[order]
    g, params, ids, want = _trace(dict(num_hidden_layers=len(layers), layer_types=layers,
                                       mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (len(layers) - 3)), seq=20)
    fused, fusion = _fuse(g)
    verify_graph(fused)  # among its checks: every fused op declares the result types its definition infers
    assert fusion["moe"] == len(layers)
    counts = fused.op_counts()
    assert "aten.bmm.default" not in counts and "aten.index.Tensor" not in counts
    moes = [op for op in fused.ops if op.name == "moe"]
    assert [op.kwargs["routing"] for op in moes] == ["hash"] * 3 + ["bias"] * (len(layers) - 3)
    got = run_graph(fused, {"input_ids": ids}, params)["logits"]
    assert (got - want).abs().max().item() <= 1e-5
