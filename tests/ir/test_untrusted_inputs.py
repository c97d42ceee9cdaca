"""Hostile IR through the doors users open: an artifact whose IR was rewritten (manifest hashes and
signature made to match, so only the op allow-list stands in the way) and an ONNX file whose
ds4c-domain node names a file op. Both are refused, naming the op, with no file touched, no
file read and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ds4c
import ds4c.ir.registry as registry
from ds4c.artifact import open_container, signing, write_container
from ds4c.cli import app
from ds4c.errors import IRError
from ds4c.models.deepseek_v4.presets import PRESETS

SENTINEL = b"the user's file, never to change"


@pytest.fixture
def tiny_artifact(tiny_cpu_artifact) -> Path:
    return tiny_cpu_artifact  # tests/conftest.py: compiled once per run


@pytest.fixture
def resolved(monkeypatch) -> list[str]:
    """Torch op names the registry turned into callables during the test."""
    seen: list[str] = []
    original = registry._resolve_torch_op
    monkeypatch.setattr(registry, "_resolve_torch_op", lambda name: seen.append(name) or original(name))
    return seen


def _rewrite_ir(src: Path, dest: Path, lines: list[str]) -> None:
    """``src`` with ``lines`` added at the top of its prefill graph; the manifest's sha256s are
    recomputed and the file signed with this run's key, as a careful attacker would."""
    with open_container(src) as c:
        manifest = dict(c.manifest)
        members = {name: c.read_bytes(name) for name in c.member_names()}
    ir_member = manifest["entry_points"]["prefill"]["ir"]
    head, _, rest = members[ir_member].decode().partition("\n")
    members[ir_member] = "\n".join([head, *("  " + ln for ln in lines), rest]).encode()
    write_container(dest, manifest, members, sign=signing.signer(True))


def test_rewritten_artifact_ir_naming_a_file_op_is_refused_at_load(tiny_artifact, tmp_path, resolved):
    victim = tmp_path / "victim" / "file.bin"
    victim.parent.mkdir()
    victim.write_bytes(SENTINEL)
    ids = torch.tensor([[1, 2, 3]])

    # control: the same rewrite with an allowed op loads and runs, so the rewrite itself is sound
    control = tmp_path / "control.ds4"
    _rewrite_ir(tiny_artifact, control, ["%crafted = aten.full.default([16], 0, dtype=dtype(u8)) : u8[16]"])
    assert ds4c.load(control)(ids).shape[:2] == (1, 3)

    crafted = tmp_path / "crafted.ds4"
    _rewrite_ir(tiny_artifact, crafted, [
        f"%crafted = aten.from_file.default({json.dumps(str(victim))}, true, {len(SENTINEL)}, dtype=dtype(u8)) "
        f": u8[{len(SENTINEL)}]",
        f"%zeroed = aten.fill_.Scalar(%crafted, 0) : u8[{len(SENTINEL)}]",
    ])
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(IRError, match=r"op 'aten.from_file.default' is not in ds4c's allow-list"):
        ds4c.load(crafted)(ids)  # were it loaded, running it would zero the victim's bytes
    res = CliRunner().invoke(app, ["run", str(crafted), "--prompt-ids", "1,2,3", "--max-new-tokens", "1"])
    assert res.exit_code != 0 and "aten.from_file.default" in res.output and "allow-list" in res.output
    assert "Traceback" not in res.output

    assert victim.read_bytes() == SENTINEL
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert "aten.from_file.default" not in resolved and "aten.fill_.Scalar" not in resolved


def _onnx_with_fused_node(path: Path, spec: dict, out_type: tuple[int, list[int]]) -> Path:
    """A static-shape ONNX file of one ds4c-domain node (no inputs) whose ds4c_spec is ``spec``,
    with the tiny preset's config as metadata: what ``ds4c compile model.onnx`` accepts."""
    import onnx
    from onnx import helper

    node = helper.make_node(spec["op"].replace(".", "_"), [], ["crafted"], domain="ds4c", name="crafted",
                            ds4c_spec=json.dumps(spec))
    out = helper.make_tensor_value_info("crafted", *out_type)
    graph = helper.make_graph([node], "g", [], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ds4c", 1)])
    for key, value in {"ds4c.entry": "prefill", "ds4c.config": json.dumps(PRESETS["tiny"]),
                       "ds4c.max_context": "32", "ds4c.outputs": json.dumps(["logits"])}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_onnx_ds4c_node_naming_a_file_op_is_refused_before_anything_runs(tmp_path, resolved):
    onnx = pytest.importorskip("onnx")
    from ds4c.frontend.onnx_import import import_onnx_program

    secret = tmp_path / "secret.txt"
    secret.write_bytes(SENTINEL)
    spec = {"op": "aten.from_file.default", "present": [], "results": 1,
            "kwargs": {"filename": str(secret), "shared": False, "size": len(SENTINEL), "dtype": {"dtype": "uint8"}}}
    model = _onnx_with_fused_node(tmp_path / "crafted.onnx", spec, (onnx.TensorProto.UINT8, [len(SENTINEL)]))
    with pytest.raises(IRError, match=r"ONNX node 'crafted' \(ds4c.aten_from_file_default\): op "
                                      r"'aten.from_file.default' is not in ds4c's allow-list"):
        import_onnx_program(model)

    out = tmp_path / "out.ds4"
    res = CliRunner().invoke(app, ["compile", str(model), "--target", "cpu", "-o", str(out)])
    assert res.exit_code != 0 and "aten.from_file.default" in res.output and "allow-list" in res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.onnx", "secret.txt"]  # no output, no temps
    assert "aten.from_file.default" not in resolved
    assert secret.read_bytes() == SENTINEL


@pytest.mark.parametrize("spec, message", [
    # allowed ATen op, but a ds4c-domain node stands for ds4c's fused ops only
    ({"op": "aten.arange.default", "present": [], "kwargs": {}}, "not one of ds4c's fused ops"),
    ({"op": "sym.add", "present": [], "kwargs": {}}, "not one of ds4c's fused ops"),
    ({"op": "os.system", "present": [], "kwargs": {}}, "unknown op 'os.system'"),
    # a dtype is looked up in a table, never fetched from torch by name
    ({"op": "rms_norm", "present": [], "kwargs": {"dtype": {"dtype": "load"}}}, "not a dtype ds4c knows"),
    ({"op": "rms_norm", "present": [], "kwargs": {"dtype": {"dtype": "float32", "module": "os"}}},
     "not a dtype ds4c knows"),
    ({"op": "rms_norm", "present": [True], "kwargs": {}}, "1 present operands, the node has 0 inputs"),
    ({"op": "rms_norm", "present": "yes", "kwargs": {}}, "is not"),
    (["rms_norm"], "is not"),
])
def test_onnx_ds4c_spec_near_misses(tmp_path, spec, message):
    onnx = pytest.importorskip("onnx")
    from ds4c.frontend.onnx_import import import_onnx_program

    name = spec["op"] if isinstance(spec, dict) else "rms_norm"
    node_spec = spec if isinstance(spec, dict) else {"op": name}
    path = _onnx_with_fused_node(tmp_path / "m.onnx", node_spec, (onnx.TensorProto.FLOAT, [4]))
    if not isinstance(spec, dict):  # the spec attribute itself of another shape
        m = onnx.load(str(path))
        m.graph.node[0].attribute[0].s = json.dumps(spec).encode()
        onnx.save(m, str(path))
    with pytest.raises(IRError, match=message):
        import_onnx_program(path)


def test_onnx_subgraph_attribute_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from ds4c.frontend.onnx_import import import_onnx_program

    body = helper.make_graph([], "body", [], [])
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    node = helper.make_node("Softmax", ["x"], ["y"], name="soft", axis=body)  # a graph where an int belongs
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(IRError, match=r"ONNX node 'soft' \(Softmax\): attribute 'axis' is GRAPH, ds4c reads INT"):
        import_onnx_program(tmp_path / "m.onnx")


def test_onnx_concat_without_axis_is_an_error_not_a_key_error(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from ds4c.frontend.onnx_import import import_onnx_program

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8])
    model = helper.make_model(helper.make_graph([helper.make_node("Concat", ["x", "x"], ["y"], name="cat")],
                                                "g", [x], [y]))
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.raises(IRError, match="ONNX node 'cat' \\(Concat\\) has no 'axis' attribute"):
        import_onnx_program(tmp_path / "m.onnx")
