"""The kernel executors run whole programs: same logits as the reference backend, same tokens."""

from __future__ import annotations

import pytest
import torch

import ds4c
from ds4c.backends.triton.executor import KernelExecutor
from ds4c.backends.triton.kernels import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny_path(tiny_fp32_artifact):
    return tiny_fp32_artifact


@pytest.fixture(scope="module")
def reference(tiny_path):
    return ds4c.load(tiny_path, device=DEVICE, backend="reference")


def test_prefill_and_decode_match_reference(tiny_path, reference):
    ker = ds4c.load(tiny_path, device=DEVICE, backend="kernels", cuda_graphs=False)
    assert ker.backend == "kernels" and isinstance(ker._executors["prefill"], KernelExecutor)
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(0))
    la, sa = reference.prefill(ids)
    lb, sb = ker.prefill(ids)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    tok = la[:, -1].argmax(-1, keepdim=True)
    da, _ = reference.decode(tok, 21, sa)
    db, _ = ker.decode(tok, 21, sb)
    torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-4)
    stats = ker._executors["prefill"].stats()
    # every fused op with a kernel ran it: none declined an instance of this model
    for name in kernels():
        if name in stats:
            assert stats[name].get("reference", 0) == 0, (name, stats[name])
    assert {"moe", "attention.csa", "mhc.pre", "rms_norm"} <= set(stats)


def test_generate_equal_tokens(tiny_path, reference):
    ker = ds4c.load(tiny_path, device=DEVICE, backend="kernels")
    ids = [[5, 17, 99, 3, 250, 7, 8, 9, 10]]
    assert ker.generate(ids, 6).tolist() == reference.generate(ids, 6).tolist()


def test_compiled_backend_decode_matches_reference(tiny_path, reference):
    comp = ds4c.load(tiny_path, device=DEVICE, backend="compiled")
    ids = torch.randint(0, 512, (1, 19), generator=torch.Generator().manual_seed(1))
    la, sa = reference.prefill(ids)
    tok = la[:, -1].argmax(-1, keepdim=True)
    da, _ = reference.decode(tok, 19, dict(sa))
    db, _ = comp.decode(tok, 19, dict(sa))  # compiles decode whole (Inductor) around the kernels
    torch.testing.assert_close(db, da, rtol=1e-4, atol=1e-4)


def test_packed_weights_are_read_packed_or_expanded_once_for_kernels(tiny_fp8_artifact):
    path = tiny_fp8_artifact
    ref = ds4c.load(path, device=DEVICE, backend="reference")
    ker = ds4c.load(path, device=DEVICE, backend="kernels", cuda_graphs=False)
    # FP8 linears, the grouped output projection and the experts stay packed (linear.packed,
    # linear.grouped.packed, moe.packed read them): the lowering expands nothing at load
    assert any(k.endswith(".qdata") and v.dtype == torch.float8_e4m3fn for k, v in ker.weights.items())
    assert any("o_a_proj" in k and v.dtype == torch.float8_e4m3fn for k, v in ker.weights.items())
    assert not [t for t in ker.manifest["weights"]["transforms"] if t["op"] == "dequantize"]
    assert not any(op.name == "quant.dequant" for g in ker.program.graphs.values() for op in g.ops)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    a, sa = ref.prefill(ids)
    b, sb = ker.prefill(ids)
    # decode (two tokens): the grouped projection's GEMV kernel runs on the packed weight
    tok = a[:, -1:].argmax(-1)
    da, _ = ref.decode(tok, 24, sa)
    db, _ = ker.decode(tok, 24, sb)
    grouped = ker._executors["decode"].stats()["linear.grouped.packed"]
    assert grouped == {"kernel": sum(op.name == "linear.grouped.packed" for op in ker.program.graphs["decode"].ops)}
    assert float((da.float() - db.float()).norm() / da.float().norm()) < 0.25
    # h100 multiplies FP8 activations: rounding them to e4m3 turns the kernels' last-bit differences
    # into 1/16-size ones, and in this random tiny model some flip a router's top-k (a wrong kernel
    # moves the logits by ~100% of their norm)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert float((a.float() - b.float()).norm() / a.float().norm()) < 0.25


def test_packed_sibling_linears_run_as_one_gemv(tmp_path):
    """Packed siblings of one format merge too (INT8 here: row scales always concatenate): one
    linear.packed over the concatenated values and scales, the same logits as unmerged; the compile
    option merge_packed=False keeps them apart."""
    table = tmp_path / "int8.json"
    table.write_text('{"lm_head": "bf16", "model.embed_tokens": "bf16", "*": "int8"}')
    paths = {}
    for name, options in (("merged", None), ("plain", {"merge_linears": False}), ("apart", {"merge_packed": False})):
        paths[name] = tmp_path / f"{name}.ds4"
        ds4c.compile("tiny", target="h100", precision=str(table), max_context=32, progress=False,
                     lowering=options).save(paths[name])
    merged, plain, apart = (ds4c.load(paths[n], device=DEVICE, backend="kernels", cuda_graphs=False)
                            for n in ("merged", "plain", "apart"))

    def packed(m):
        return [op for op in m.program.graphs["decode"].ops if op.name == "linear.packed"]

    cats = [op for op in packed(merged) if ".cat:" in op.args[1].name]
    assert any("q_a_proj" in op.args[1].name and "kv_proj" in op.args[1].name for op in cats), \
        [op.args[1].name for op in packed(merged)]
    assert len(packed(plain)) - len(packed(merged)) >= len(cats) > 0
    assert len(packed(apart)) == len(packed(plain))
    assert apart.manifest["lowering"]["options"]["merge_packed"] is False
    for op in cats:
        assert op.kwargs["format"] == "int8" and op.kwargs["shape"][0] == merged.weights[op.args[1].name].shape[0]
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    la, sa = plain.prefill(ids)
    lb, sb = merged.prefill(ids)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    tok = la[:, -1:].argmax(-1)
    torch.testing.assert_close(merged.decode(tok, 6, sb)[0], plain.decode(tok, 6, sa)[0], rtol=1e-4, atol=1e-4)


def test_fp8_siblings_merge_only_along_whole_scale_blocks():
    """FP8's 128x128 scale blocks: parts of whole blocks concatenate, a ragged part only last."""
    from ds4c.passes.merge_sibling_linears import _concatenable

    assert _concatenable("fp8", [1024, 512, 1024, 256, 64], 4096)  # V4-Flash's CSA siblings
    assert not _concatenable("fp8", [64, 1024], 4096)
    assert _concatenable("int8", [3, 5], 64) and _concatenable("mxfp4", [3, 5], 64)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_prefill_last_position_logits(tiny_path, reference, backend):
    """``prefill(logits="last")`` runs the head (last layer's FFN half, final norm, LM head) on the
    last position only: same last row and state as the full prefill, and generate uses it."""
    from ds4c.ir.types import TensorType

    model = reference if backend == "reference" else ds4c.load(tiny_path, device=DEVICE, backend=backend,
                                                               cuda_graphs=False)
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(3))
    full, state = reference.prefill(ids)
    last, state_last = model.prefill(ids, logits="last")
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-4, atol=1e-4)
    for k, v in state.items():
        torch.testing.assert_close(state_last[k], v, rtol=1e-4, atol=1e-4)
    g = model._last_position_entry().graph
    slices = [op for op in g.ops if op.loc == "last_position_logits"]
    assert slices and all(op.name == "aten.slice.Tensor" for op in slices)
    head = {op.name for op in g.ops if op.results and isinstance(op.results[0].type, TensorType)
            and op.results[0].type.rank >= 2 and op.results[0].type.shape[1] == 1}
    assert {"moe", "mhc.head", "aten.linear.default"} <= head
    from ds4c.errors import InputError

    with pytest.raises(InputError, match="'all' or 'last'"):
        model.prefill(ids, logits="first")


@pytest.fixture(scope="module")
def tiny_unlowered(tmp_path_factory):
    """tiny for h100 in fp32 with the lowering's norm+rope fusion and linear merging off."""
    path = tmp_path_factory.mktemp("apart") / "t.ds4"
    ds4c.compile("tiny", target="h100", precision="fp32", max_context=64, progress=False,
                 lowering={"fuse_norm_rope": False, "merge_linears": False}).save(path)
    return path


def test_sibling_linears_run_as_one_gemm(tiny_path, tiny_unlowered):
    """Linears reading the same activation (q_a, kv, compressor and indexer projections) are one
    GEMM over concatenated weights in the artifact's program; merge_linears=False keeps them apart."""
    merged = ds4c.load(tiny_path, device=DEVICE, backend="kernels", cuda_graphs=False)
    plain = ds4c.load(tiny_unlowered, device=DEVICE, backend="kernels", cuda_graphs=False)

    def linears(m):
        return [op for op in m.program.graphs["decode"].ops if op.name == "aten.linear.default"]

    concat = {k: v for t in merged.manifest["weights"]["transforms"] if t["op"] == "concat"
              for k, v in t["tensors"].items()}
    cats = [op.args[1].name for op in linears(merged) if op.args[1].name in concat]
    assert any("q_a_proj" in c and "kv_proj" in c for c in cats)
    assert len(linears(plain)) - len(linears(merged)) >= len(cats) > 0
    for c in cats:  # stored concatenated, the parts not again (no weight stored twice)
        assert merged.weights[c].shape[0] == sum(plain.weights[p].shape[0] for p in concat[c])
        assert not any(p in merged.weights for p in concat[c])
    # a loaded model's weights feed another load of the same artifact
    again = ds4c.load(tiny_path, device=DEVICE, backend="kernels", cuda_graphs=False, weights=merged.weights)
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    torch.testing.assert_close(again(ids), merged(ids), rtol=0, atol=0)
    torch.testing.assert_close(merged(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_norm_and_rope_fuse_in_the_lowering(tiny_path, tiny_unlowered, reference):
    """Each layer's query and key norms + rotary embeddings run as one ``rms_norm.rope`` launch (the
    layout ops between them moved before it); the logits stay the reference's; the compile option
    fuse_norm_rope=False keeps them apart."""
    fused = ds4c.load(tiny_path, device=DEVICE, backend="kernels", cuda_graphs=False)
    layers = reference.manifest["model"]["config"]["num_hidden_layers"]
    for entry in ("prefill", "decode"):
        counts = fused.program.graphs[entry].op_counts()
        assert counts.get("rms_norm.rope") == 2 * layers, counts
    apart = ds4c.load(tiny_unlowered, device=DEVICE, backend="kernels", cuda_graphs=False)
    assert "rms_norm.rope" not in apart.program.graphs["decode"].op_counts()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    la, sa = reference.prefill(ids)
    lf, sf = fused.prefill(ids)
    lp, _ = apart.prefill(ids)
    torch.testing.assert_close(lf, la, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    tok = la[:, -1].argmax(-1, keepdim=True)
    torch.testing.assert_close(fused.decode(tok, 9, sf)[0], reference.decode(tok, 9, sa)[0], rtol=1e-4, atol=1e-4)
    assert fused._executors["decode"].stats()["rms_norm.rope"] == {"kernel": 2 * layers}
