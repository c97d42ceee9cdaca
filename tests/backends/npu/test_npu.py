"""The npu backend end to end on ``tiny``: compile (CLI), C source, host build, logits and tokens
equal the reference backend, fallbacks with reasons, SRAM bound, refusal of a bad kernel member.

One compile for the whole module (the artifact fixture); each distinct (op, shapes) is lowered once.
"""

from __future__ import annotations

import json
import subprocess
import zipfile

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("tvm")

import ds4c  # noqa: E402
from ds4c.backends.npu.lower import C_SOURCE_MEMBER, LIBRARY_MEMBER, c_include_dirs  # noqa: E402
from ds4c.backends.npu.partition import ACT_REASON, TOPK_REASON, place  # noqa: E402
from ds4c.cli import app  # noqa: E402
from ds4c.errors import ArtifactError  # noqa: E402
from ds4c.targets import get_target  # noqa: E402

PROMPT = [[3, 17, 42, 5, 9, 100, 7]]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("npu") / "tiny-npu.ds4"
    res = CliRunner().invoke(app, ["compile", "tiny", "--target", "npu", "--precision", "fp32", "-o", str(path)])
    assert res.exit_code == 0, res.output
    return path


@pytest.fixture(scope="module")
def section(artifact):
    return ds4c.load(artifact, backend="reference").manifest["kernels"]


def test_manifest_places_ops_with_reasons(section):
    assert section["backend"] == "npu" and section["kernel_count"] == len(section["kernels"]) > 20
    table = section["placement"]
    assert table["indexer.topk"]["npu"] == 0 and TOPK_REASON in table["indexer.topk"]["reasons"]
    for fused in ("attention.sliding", "attention.csa", "attention.hca", "rms_norm", "rope", "compress"):
        assert table[fused]["npu"] > 0 and table[fused]["host"] == 0, (fused, table[fused])
    assert table["aten.view.default"]["npu"] == 0 and table["aten.view.default"]["reasons"]


def test_moe_with_activation_quantisation_stays_on_the_host(artifact):
    # a hash-routed moe goes to the NPU; with FP8 activations (act=, from a re-imported CUDA
    # artifact's ONNX, say) it runs on the host: the NPU has no FP8 arithmetic
    program = ds4c.artifact.artifact.read_artifact(artifact)[1]
    moe = next(op for op in program.graphs["decode"].ops if op.name == "moe" and op.kwargs["routing"] == "hash")
    npu = get_target("npu")
    assert place(moe, npu).npu
    refused = place(moe.replace(kwargs={**moe.kwargs, "act": "fp8"}), npu)
    assert not refused.npu and ACT_REASON in refused.reason


def test_every_kernel_fits_sram(section):
    sram = get_target("npu").npu.sram_bytes
    assert section["sram_bytes"] == sram
    for name, k in section["kernels"].items():
        assert k["prim_funcs"], name
        assert 0 < k["working_set_bytes"] <= sram, (name, k["working_set_bytes"])
        for p in k["prim_funcs"].values():
            assert all(b["working_set_bytes"] <= sram for b in p["blocks"])


def test_c_source_compiles(artifact, tmp_path):
    with zipfile.ZipFile(artifact) as z:
        src = z.read(f"kernels/{C_SOURCE_MEMBER}")
    c = tmp_path / "kernels.c"
    c.write_bytes(src)
    includes = [f"-I{d}" for d in c_include_dirs()]
    out = subprocess.run(["gcc", "-c", "-O0", "-w", *includes, str(c), "-o", str(tmp_path / "kernels.o")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_logits_and_tokens_equal_reference(artifact):
    ref = ds4c.load(artifact, backend="reference")
    npu = ds4c.load(artifact)  # auto picks npu for an npu artifact on CPU
    assert npu.backend == "npu"
    want = ref(PROMPT)
    got = npu(PROMPT)
    assert (got - want).abs().max().item() <= 1e-4
    stats = npu._executors["prefill"].stats()
    assert stats["attention.sliding"].get("npu") and stats["indexer.topk"] == {"host": 2}
    ids_ref = ref.generate(PROMPT, max_new_tokens=4)
    ids = npu.generate(PROMPT, max_new_tokens=4)
    assert torch.equal(ids, ids_ref)
    # decode logits, step by step, from the same state
    logits, state = npu.prefill(PROMPT)
    r_logits, r_state = ref.prefill(PROMPT)
    step, r_step = npu.decode([[11]], len(PROMPT[0]), state), ref.decode([[11]], len(PROMPT[0]), r_state)
    assert (step[0] - r_step[0]).abs().max().item() <= 1e-4
    assert npu._executors["decode"].stats()["moe"].get("npu")


def test_cli_run_and_inspect(artifact):
    res = CliRunner().invoke(app, ["run", str(artifact), "--prompt-ids", "1,2,3", "-n", "2", "--backend", "npu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["inspect", str(artifact)])
    assert res.exit_code == 0, res.output
    assert "npu:" in res.output and "indexer.topk" in res.output and "working set" in res.output


def _rewrite(src, dst, member, fn):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, fn(data) if info.filename == member else data)


def test_mismatched_kernel_member_is_refused(artifact, tmp_path):
    # a library whose bytes differ from what the manifest recorded (e.g. from another compile) is refused,
    # whether the container digest catches it or the kernels section's sha256 does
    bad = tmp_path / "bad.ds4"
    _rewrite(artifact, bad, f"kernels/{LIBRARY_MEMBER}", lambda b: b[:-64] + bytes(64))
    with pytest.raises(ArtifactError):
        ds4c.load(bad, backend="npu")
    # the manifest pointing a kernel at a function the host build lacks
    man = tmp_path / "man.ds4"

    def rename(data: bytes) -> bytes:
        m = json.loads(data)
        first = next(iter(m["kernels"]["kernels"]))
        m["kernels"]["kernels"]["no_such_kernel"] = m["kernels"]["kernels"].pop(first)
        return json.dumps(m).encode()

    _rewrite(artifact, man, "manifest.json", rename)
    with pytest.raises(ArtifactError):
        ds4c.load(man, backend="npu")


def test_npu_backend_refuses_non_npu_artifact(artifact, tmp_path):
    plain = tmp_path / "plain.ds4"  # the same artifact without npu kernels, as a cpu compile has

    def drop(data: bytes) -> bytes:
        m = json.loads(data)
        m["kernels"] = {}
        return json.dumps(m).encode()

    _rewrite(artifact, plain, "manifest.json", drop)
    with pytest.raises(ArtifactError, match="--target npu"):
        ds4c.load(plain, backend="npu")
    assert ds4c.load(plain).backend == "reference"
