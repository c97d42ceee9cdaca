"""Result types come from the op definitions (``OpDef.infer_types``): every ds4c op infers, what
the compiled programs declare is what their ops infer, and a declared type that disagrees is
refused by the verifier (so by ``VerifyAfterEach``) and at artifact load, naming the op."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ds4c
import ds4c.ir.registry as registry
import ds4c.passes.manager as manager
from ds4c.artifact import open_container, signing, write_container
from ds4c.artifact.artifact import read_artifact
from ds4c.errors import ArtifactError, VerificationError
from ds4c.ir import Program, check_types, parse_graph, verify_graph
from ds4c.ir.registry import OpDef, get_op, is_ds4c_op
from ds4c.ir.types import ScalarType, TensorType, parse_type
from ds4c.ir.verifier import infer_result_types
from ds4c.passes import PassManager
from ds4c.passes.instruments import VerifyAfterEach

# What the compiled programs below hold; the rest of ds4c's ops are typed in test_hand_written_ops_infer.
COMPILED_OPS = {"attention.sliding", "attention.csa", "attention.hca", "compress", "indexer.topk", "linear.grouped",
                "linear.grouped.packed", "linear.packed", "mhc.pre", "mhc.post", "mhc.head", "moe", "moe.packed",
                "rms_norm", "rms_norm.rope", "rope", "sym.sub", "sym.floordiv"}


def ours() -> list[str]:
    """Every op ds4c declares (ds4c.ops, and sym.* in the registry): not ATen ops, typed by their
    kernels (check_types), nor ops that tests declare for themselves (test.random_like)."""
    registry.load_op_sets()
    return [n for n in registry.registered_ops() if (is_ds4c_op(n) or n.startswith("sym."))
            and type(get_op(n)).__module__.startswith("ds4c.")]


def lacking_inference(names) -> list[str]:
    """The ops among ``names`` that neither infer their result types nor say why they do not."""
    return sorted(n for n in names if not get_op(n).infers and not get_op(n).no_inference.strip())


def test_every_ds4c_op_infers_its_result_types():
    assert lacking_inference(ours()) == []
    assert [n for n in ours() if not get_op(n).infers] == []  # none of ours is declared non-inferring today
    assert get_op("aten.mm.default").no_inference and not get_op("aten.mm.default").infers


def test_a_new_op_without_inference_is_caught(monkeypatch):
    class Untyped(OpDef):
        name = "test.untyped"
        num_results = 1

    class Excused(OpDef):
        name = "test.excused"
        no_inference = "its result type depends on data (a test op)"

    Untyped.__module__ = Excused.__module__ = "ds4c.ops.norms"  # as if declared there

    monkeypatch.setitem(registry._REGISTRY, Untyped.name, Untyped())
    monkeypatch.setitem(registry._REGISTRY, Excused.name, Excused())
    assert lacking_inference(ours()) == [Untyped.name]


@pytest.fixture(scope="module")
def programs(tiny_cpu_artifact) -> dict[str, Program]:
    """tiny for cpu (the run's shared artifact, read back), h100 and b200 (weights by reference:
    nothing to embed, the IR is what is checked). The released layer orders are checked where they
    are traced already: tests/passes/test_fusion_hf.py verifies their fused graphs."""
    def build(target: str) -> Program:
        return ds4c.compile("tiny", target=target, max_context=64, weights="reference", progress=False).program

    _, cpu, container = read_artifact(tiny_cpu_artifact)
    container.close()
    return {"cpu": cpu, "h100": build("h100"), "b200": build("b200")}


def test_compiled_programs_declare_what_their_ops_infer(programs):
    seen: set[str] = set()
    for label, program in programs.items():
        for g in program.graphs.values():
            for op in g.ops:
                inferred = infer_result_types(op)
                if inferred is None:
                    assert op.name.startswith("aten."), op.name
                    continue
                seen.add(op.name)
                assert [str(r.type) for r in op.results] == [str(t) for t in inferred], (label, g.name, op.name)
    assert COMPILED_OPS <= seen, sorted(COMPILED_OPS - seen)


HAND = """\
graph @hand(input %x: bf16[B,S,64], input %n: int, param %wq: f8e4m3[32,64], param %ws: u8[1,1], param %g: bf16[32,8]) {
  %a = quant.activation(%x, format="fp8", block=128) : bf16[B,S,64]
  %w2 = quant.dequant(%wq, %ws, format="fp8", shape=[32, 64], dtype=dtype(bf16)) : bf16[32,64]
  %gd = ds4c.prefetch(%g) : bf16[32,8]
  %y = linear.packed(%a, %wq, %ws, format="fp8", shape=[32, 64]) : bf16[B,S,32]
  %r = aten.reshape.default(%y, [-1, 4, 8]) : bf16[(B*S),4,8]
  %gy = linear.grouped(%r, %gd, groups=4) : bf16[(B*S),4,8]
  %h = sym.truediv(%n, 2) : float
  %k = sym.pow(%n, -1) : float
  %e = sym.mul(%n, 4) : int
  %lt = sym.lt(%n, %e) : bool
  return y=%gy, h=%h, k=%k, lt=%lt, w=%w2
}
"""


def test_hand_written_ops_infer():
    """The ops the compiled programs above do not hold (quant.activation, quant.dequant, ds4c.prefetch;
    sym ops beyond sub and floordiv), and a grouped linear on a symbolic leading dimension."""
    g = parse_graph(HAND)
    verify_graph(g)
    check_types(g, {"B": 2, "S": 3, "n": 5})  # and the references compute what is declared
    types = {op.results[0].name: infer_result_types(op)[0] for op in g.ops if infer_result_types(op)}
    assert types["gy"] == TensorType(torch.bfloat16, ("(B*S)", 4, 8))
    assert types["h"] == types["k"] == ScalarType("float") and types["e"] == ScalarType("int")
    assert types["lt"] == ScalarType("bool")
    assert get_op("sym.max").infer_types([True, False], {}) == [ScalarType("bool")]
    assert get_op("mhc.pre").infer_types([parse_type("bf16[B,S,4,64]"), None, None, None], {}) == [
        parse_type("bf16[B,S,64]"), parse_type("f32[B,S,4]"), parse_type("f32[B,S,4,4]")]
    with pytest.raises(VerificationError, match="operand x must be a tensor"):
        get_op("rms_norm").infer_types([3, None], {"eps": 1e-6})
    with pytest.raises(VerificationError, match="host scalars"):
        get_op("sym.add").infer_types([parse_type("f32[2]"), 1], {})


def test_a_symbolically_equal_declaration_is_accepted():
    text = HAND.replace("bf16[(B*S),4,8]\n  %h", "bf16[(S*B),4,8]\n  %h")
    assert text != HAND
    verify_graph(parse_graph(text))


def test_a_wrong_result_shape_is_refused_naming_the_op():
    """Near miss: one dimension of one declared result edited (64 -> 63)."""
    good = """\
graph @g(input %x: f32[B,S,64], param %w: f32[64]) {
  %y = rms_norm(%x, %w, eps=1e-06) : f32[B,S,64] loc("model.layers.0.input_layernorm")
  return y=%y
}
"""
    verify_graph(parse_graph(good))
    bad = parse_graph(good.replace(": f32[B,S,64] loc", ": f32[B,S,63] loc"))
    with pytest.raises(VerificationError) as e:
        verify_graph(bad)
    msg = str(e.value)
    for part in ("rms_norm", "%y", "model.layers.0.input_layernorm", "declared f32[B,S,63]", "infers f32[B,S,64]",
                 "fix that pass"):
        assert part in msg, (part, msg)


def test_verify_after_each_names_the_pass_that_wrote_a_wrong_type(monkeypatch):
    def widen_norms(graph, ctx):
        """A broken pass: declares every rms_norm's result with twice the channels."""
        ops = []
        for op in graph.ops:
            if op.name == "rms_norm":
                t = op.result.type
                op = op.replace(results=(type(op.result)(op.result.name, TensorType(t.dtype, (*t.shape[:-1], 128))),))
            ops.append(op)
        return graph.copy(ops=ops)

    monkeypatch.setitem(manager._PASSES, "test_widen_norms", manager.Pass("test_widen_norms", widen_norms, ""))
    g = parse_graph("graph @g(input %x: f32[B,S,64], param %w: f32[64]) {\n"
                    "  %y = rms_norm(%x, %w, eps=1e-06) : f32[B,S,64]\n  return y=%y\n}\n")
    with pytest.raises(VerificationError, match=r"after pass 'test_widen_norms'.*rms_norm.*declared f32\[B,S,128\]"):
        PassManager(["test_widen_norms"], [VerifyAfterEach()]).run(Program({"g": g}))


def _rewrite_ir(src: Path, dest: Path, old: str, new: str) -> None:
    """``src`` with the first ``old`` of its prefill IR replaced by ``new``; hashes recomputed and the
    file signed with this run's key, as a careful attacker would."""
    with open_container(src) as c:
        manifest = dict(c.manifest)
        members = {name: c.read_bytes(name) for name in c.member_names()}
    member = manifest["entry_points"]["prefill"]["ir"]
    text = members[member].decode()
    assert old in text
    members[member] = text.replace(old, new, 1).encode()
    write_container(dest, manifest, members, sign=signing.signer(True))


def test_an_artifact_with_an_edited_result_type_is_refused_at_load(tiny_cpu_artifact, tmp_path):
    """Near miss at load: one dimension of one op's declared result edited, the file re-signed."""
    src = tiny_cpu_artifact
    _, program, container = read_artifact(src)
    container.close()
    line = next(ln for ln in str(program.graphs["prefill"]).splitlines() if " = compress(" in ln)
    declared = line.split(" : ")[1].split(" loc(")[0]  # f32[B,(S//4),32]: the pooled entries
    edited = declared.replace(",32]", ",31]")
    assert edited != declared
    control = tmp_path / "control.ds4"
    _rewrite_ir(src, control, line, line)  # the same rewrite, nothing changed: loads
    read_artifact(control)[2].close()
    bad = tmp_path / "bad.ds4"
    _rewrite_ir(src, bad, line, line.replace(f" : {declared}", f" : {edited}"))
    with pytest.raises(ArtifactError, match=rf"does not verify: .*compress.*declared {re.escape(edited)}"):
        read_artifact(bad)
    with pytest.raises(ArtifactError, match="compress"):
        ds4c.load(bad)
