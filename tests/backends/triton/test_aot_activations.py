"""Ahead-of-time kernels for quantised activations: FP8 x FP8 on Hopper and Blackwell tensor
cores, MXFP4 activations on Blackwell. Apart from test_aot.py (one module per xdist worker under
``--dist loadscope``) so the two long AOT modules can run on both CI cores."""

from __future__ import annotations

import json

import ds4c
from ds4c.backends.triton import aot
from ds4c.targets import get_target


def _one_layer():
    """A transformers model of one sliding-window layer with routed experts (random weights):
    every linear and expert kernel, fewer kernels to lower than tiny."""
    import transformers

    from tests.hf_configs import SMALL_CONFIGS, randomize_

    cfg = dict(SMALL_CONFIGS["mixed"], num_hidden_layers=1, layer_types=["sliding_attention"], mlp_layer_types=["moe"])
    return randomize_(transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg)), 0)


def test_fp8_activation_kernels_compile_for_hopper_and_blackwell():
    """FP8 weights for h100 and b200: the GEMV (decode), the activation quantiser and the FP8 GEMM
    (a 128-token prefill probe) are stored, and multiply e4m3 by e4m3 on the tensor cores. One
    sliding layer with routed experts: every FP8 kernel, a third fewer kernels to lower than tiny."""
    art = ds4c.compile(_one_layer(), target="h100", precision="fp8", max_context=128, progress=False)
    program = art.program
    program.attrs["state"] = art.manifest["state"]
    for target in ("h100", "b200"):
        section, members = aot.lower(get_target(target), program, progress=False)
        assert section["specialised_for"]["prefill_lengths"] == [128, 64, 37]
        by_name = {}
        for b in section["binaries"]:
            by_name.setdefault(b["name"], []).append(b)
        assert {"_gemv_kernel", "_act_quant_kernel", "_fp8_gemm_kernel"} <= set(by_name), sorted(by_name)
        # the launches are recorded on the lowered graphs, the ones ds4c.load runs: the query/key
        # norm + rope pairs are one rms_norm.rope launch there, so that is what is stored
        assert any("rms_norm.rope" in b["ops"] for b in by_name["_rope_kernel"]), by_name["_rope_kernel"]
        for name in ("_gemv_kernel", "_fp8_gemm_kernel"):
            ptx = [members[f["member"].removeprefix("kernels/")] for b in by_name[name]
                   for n, f in b["files"].items() if n.endswith(".ptx")]
            # mma.sync / wgmma on e4m3 operands (sm_90a), tcgen05.mma kind::f8f6f4 (sm_100a)
            assert any(b"e4m3.e4m3" in t or b"kind::f8f6f4" in t for t in ptx), (target, name)


def test_fp4_activation_gemv_compiles_for_blackwell(tmp_path):
    """MXFP4 linears for b200 multiply MXFP4 activations: the decode GEMV that quantises them in
    registers (ACT_FP4, MXFP4 weights) is among the stored sm_100a binaries."""
    table = tmp_path / "table.json"
    table.write_text('{"*.q_b_proj": "mxfp4", "lm_head": "bf16", "model.embed_tokens": "bf16"}')
    art = ds4c.compile(_one_layer(), target="b200", precision=str(table), max_context=64, progress=False)
    program = art.program
    program.attrs["state"] = art.manifest["state"]
    section, _ = aot.lower(get_target("b200"), program, progress=False)
    constants = []
    for b in section["binaries"]:
        if b["name"] == "_gemv_kernel":
            spec = json.loads(b["specialization"])
            names = list(spec["signature"])
            constants.append({names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"], strict=True)})
    assert constants and {b["arch"] for b in section["binaries"]} == {"sm_100a"}
    assert any(c.get("ACT_FP4") is True and c.get("SCALE") == 4 for c in constants), constants
