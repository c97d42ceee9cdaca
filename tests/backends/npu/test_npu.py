"""The npu backend end to end on ``tiny``: compile (CLI), C source, host build, logits and tokens
equal the reference backend, fallbacks with reasons, SRAM bound, refusal of a bad kernel member;
an untrusted artifact's host build (a hostile library here) is rebuilt from the IR, never loaded.

One compile for the whole module (the artifact fixture); each distinct (op, shapes) is lowered once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("tvm")

import ds4c  # noqa: E402
from ds4c.artifact import SIGNATURE  # noqa: E402
from ds4c.backends.npu.executor import NpuBuildWarning  # noqa: E402
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
    """Copy ``src`` with one member edited; the signature goes (an edited artifact is nobody's)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename != SIGNATURE:
                zout.writestr(info, fn(data) if info.filename == member else data)


def test_mismatched_kernel_member_is_refused(artifact, tmp_path):
    # a library whose bytes differ from what the manifest recorded (e.g. from another compile) is refused,
    # whether the container digest catches it or the kernels section's sha256 does
    bad = tmp_path / "bad.ds4"
    _rewrite(artifact, bad, f"kernels/{LIBRARY_MEMBER}", lambda b: b[:-64] + bytes(64))
    with pytest.raises(ArtifactError):
        ds4c.load(bad, backend="npu")
    # the manifest pointing a kernel at a function the stored host build lacks (loaded when trusted)
    man = tmp_path / "man.ds4"

    def rename(data: bytes) -> bytes:
        m = json.loads(data)
        first = next(iter(m["kernels"]["kernels"]))
        m["kernels"]["kernels"]["no_such_kernel"] = m["kernels"]["kernels"].pop(first)
        return json.dumps(m).encode()

    _rewrite(artifact, man, "manifest.json", rename)
    with pytest.raises(ArtifactError, match="lacks kernel 'no_such_kernel'"):
        ds4c.load(man, backend="npu", trust_binaries=True)


_SENTINEL_C = """
#include <stdio.h>
__attribute__((constructor)) static void ds4c_test_hostile(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("native code from the artifact ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def hostile(artifact, tmp_path_factory):
    """(artifact whose host.so is a library with a constructor that writes a sentinel file, with
    the manifest's sha256s rewritten to match and the signature dropped; the sentinel's path)."""
    import shutil

    if shutil.which("gcc") is None:
        pytest.skip("no system C compiler (gcc) to build the hostile library with")
    from ds4c.artifact import open_container, write_container

    tmp = tmp_path_factory.mktemp("hostile")
    sentinel = tmp / "sentinel"
    src = tmp / "hostile.c"
    src.write_text(_SENTINEL_C % sentinel)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp / "hostile.so"), str(src)], check=True)
    evil = (tmp / "hostile.so").read_bytes()
    with open_container(artifact) as c:
        members = {n: c.read_bytes(n) for n in c.member_names()}
        manifest = json.loads(json.dumps(c.manifest))
    members[f"kernels/{LIBRARY_MEMBER}"] = evil
    manifest["kernels"]["library_sha256"] = hashlib.sha256(evil).hexdigest()
    path = tmp / "hostile.ds4"
    write_container(path, manifest, members)  # consistent hashes, no signature
    return path, sentinel


def test_untrusted_host_build_is_rebuilt_never_loaded(hostile, artifact):
    path, sentinel = hostile
    with pytest.warns(NpuBuildWarning, match="not loading the npu host build .*unsigned.*--trust-binaries"):
        model = ds4c.load(path)  # the build of the same IR this machine made at compile (cached)
    assert model.backend == "npu" and not model.trust.trusted
    assert not sentinel.exists()
    ref = ds4c.load(artifact, backend="reference")
    assert (model(PROMPT) - ref(PROMPT)).abs().max().item() <= 1e-4
    assert model._executors["prefill"].stats()["attention.sliding"].get("npu")
    assert not sentinel.exists()


def test_untrusted_host_build_refused_without_a_toolchain(hostile, tmp_path, monkeypatch):
    from ds4c.backends.npu import lower

    path, sentinel = hostile
    monkeypatch.setenv("DS4C_CACHE_DIR", str(tmp_path / "empty-cache"))  # no build of this IR here
    monkeypatch.setattr(lower, "toolchain_problem", lambda: "no C compiler for TVM to link the library with")
    with pytest.raises(ArtifactError, match="not trusted .*unsigned.*cannot be rebuilt here .*no C compiler.*"
                                            "ds4c trust add KEY.pub.*--trust-binaries"):
        ds4c.load(path)
    res = CliRunner().invoke(app, ["run", str(path), "--prompt-ids", "1,2", "-n", "1"])
    assert res.exit_code == 2 and "--trust-binaries" in res.output and "Traceback" not in res.output
    assert not sentinel.exists()


def test_trust_binaries_loads_the_stored_library(hostile):
    """The one switch that lets stored native code run: the hostile constructor does run then
    (the library is no TVM module, so the load is refused after)."""
    path, sentinel = hostile
    with pytest.raises(ArtifactError, match="not a TVM library"):
        ds4c.load(path, trust_binaries=True)
    assert sentinel.read_text() == "native code from the artifact ran"
    sentinel.unlink()


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
