"""Ahead-of-time kernels: every kernel of tiny compiles for sm_90a, sm_100a, gfx942 and gfx950; the
artifact stores the binaries with their source; on CPU the AMD configurations give the reference's
logits in Triton's interpreter; at load the binaries are selected, installed under Triton's own
cache keys, or refused with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ds4c
from ds4c.artifact import open_container, write_container
from ds4c.backends.triton import aot
from ds4c.cli import app
from ds4c.errors import ArtifactError
from ds4c.runtime import binaries
from ds4c.targets import get_target

GEMM_KERNELS = ("_attention_kernel", "_gate_up_kernel", "_down_kernel")


@pytest.fixture(scope="module")
def mi300x(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "tiny-mi300x.ds4"
    res = CliRunner().invoke(app, ["compile", "tiny", "--target", "mi300x", "--precision", "fp32", "--kernel-binaries",
                                   "--max-context", "64", "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _asm(container, binary, suffix):
    member = next(f["member"] for name, f in binary["files"].items() if name.endswith(suffix))
    return container.read_bytes(member)


def test_artifact_stores_binaries_and_sources(mi300x):
    c = open_container(mi300x)  # verifies every member's sha256
    section = c.manifest["kernels"]
    assert section["arch"] == "gfx942" and section["binary_format"] == "hsaco"
    assert section["triton_version"] and section["triton_target"] == ["hip", "gfx942", 64]
    names = {b["name"] for b in section["binaries"]}
    assert {"_attention_kernel", "_gate_up_kernel", "_down_kernel", "_rms_norm_kernel", "_rope_kernel",
            "_mix_kernel", "_pool_kernel", "_index_scores_kernel", "_post_kernel"} <= names
    for b in section["binaries"]:
        assert c.read_bytes(b["binary"])[:4] == b"\x7fELF"  # a code object
        assert b["source"] in c.member_names() and b["config"]["num_warps"] >= 1
        if b["name"] in GEMM_KERNELS:  # 16x16 MFMAs, as the AMD configs ask
            assert b"v_mfma" in _asm(c, b, ".amdgcn"), b["name"]
            assert b["config"]["matrix_instr_nonkdim"] == 16
    assert c.read_bytes(section["sources"]["attention"]["member"]).startswith(b'"""Flash attention')


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the AMD configurations run in the interpreter (CPU) only")
def test_amd_configs_match_reference_in_interpreter(mi300x):
    ker = ds4c.load(mi300x, backend="kernels", cuda_graphs=False)
    ref = ds4c.load(mi300x, backend="reference")
    assert ker.kernel_target.name == "mi300x" and ker.kernel_binaries.startswith("unused: on CPU")
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    la, sa = ref.prefill(ids)
    lb, sb = ker.prefill(ids)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    tok = la[:, -1].argmax(-1, keepdim=True)
    torch.testing.assert_close(ker.decode(tok, 6, sb)[0], ref.decode(tok, 6, sa)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target,needle", [("h100", b"mma"), ("b200", b"mma"), ("mi355x", b"v_mfma")])
def test_every_kernel_compiles_for_other_archs(mi300x, target, needle):
    manifest, program, _ = ds4c.artifact.artifact.read_artifact(mi300x)
    program.attrs["state"] = manifest["state"]
    section, members = aot.lower(get_target(target), program, progress=False)
    arch = get_target(target).arch
    assert section["arch"] == arch and len(section["binaries"]) == len(manifest["kernels"]["binaries"])
    asm = ".amdgcn" if target.startswith("mi") else ".ptx"
    for b in section["binaries"]:
        assert members[b["binary"].removeprefix("kernels/")], b["name"]
    # fp32 GEMMs: tf32x3 tensor-core products in mHC's mix on NVIDIA, fp32 MFMAs on AMD
    gemm = "_mix_kernel" if asm == ".ptx" else "_attention_kernel"
    text = next(members[f["member"].removeprefix("kernels/")] for b in section["binaries"] if b["name"] == gemm
                for n, f in b["files"].items() if n.endswith(asm))
    assert needle in text
    if asm == ".ptx":
        assert f".target {arch}".encode() in text
    # programmatic dependent launch on NVIDIA (kernels/pdl.py): every kernel waits for its
    # producer first; AMD has no griddepcontrol
    for b in section["binaries"]:
        text = next(members[f["member"].removeprefix("kernels/")] for n, f in b["files"].items() if n.endswith(asm))
        assert (b"griddepcontrol.wait" in text) == (asm == ".ptx"), (target, b["name"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the AMD configurations run in the interpreter (CPU) only")
def test_mi355x_artifact_matches_reference_in_interpreter(tmp_path):
    # after the test above: gfx950's binaries for this program come from aot's in-process cache
    path = tmp_path / "tiny-mi355x.ds4"
    ds4c.compile("tiny", target="mi355x", precision="fp32", max_context=64, progress=False,
                 kernel_binaries=True).save(path)
    manifest = ds4c.artifact.artifact.read_artifact(path)[0]
    assert manifest["kernels"]["arch"] == "gfx950" and manifest["kernels"]["binaries"]
    ker = ds4c.load(path, backend="kernels", cuda_graphs=False)
    ref = ds4c.load(path, backend="reference")
    assert ker.kernel_target.name == "mi355x"
    ids = torch.tensor([[9, 4, 77, 120, 3]])
    la, sa = ref.prefill(ids)
    lb, sb = ker.prefill(ids)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    tok = la[:, -1].argmax(-1, keepdim=True)
    torch.testing.assert_close(ker.decode(tok, 5, sb)[0], ref.decode(tok, 5, sa)[0], rtol=1e-4, atol=1e-4)


def test_selection_by_arch_and_version():
    section = {"binaries": [{}], "triton_target": ["cuda", 90, 32], "arch": "sm_90a", "triton_version": "3.6.0"}
    assert binaries.select(section, ("cuda", 90, 32), "3.6.0").status == "stored"
    wrong_arch = binaries.select(section, ("cuda", 100, 32), "3.6.0")
    assert wrong_arch.status == "jit: the artifact's binaries are for sm_90a, this device is sm_100a"
    wrong_version = binaries.select(section, ("cuda", 90, 32), "3.9.0")
    assert not wrong_version.use and "triton 3.6.0" in wrong_version.reason and "3.9.0" in wrong_version.reason
    amd = binaries.select(dict(section, triton_target=["hip", "gfx942", 64], arch="gfx942"), ("hip", "gfx950", 64),
                          "3.6.0")
    assert amd.reason == "the artifact's binaries are for gfx942, this device is gfx950"
    assert binaries.select({"binaries": []}, ("cuda", 90, 32), "3.6.0").reason.startswith("the artifact stores no")
    # the launch mode is the artifact's compile option, which binaries and runtime both follow
    # (test_pdl.py): binaries with or without programmatic dependent launch apply alike
    for on in (True, False):
        assert binaries.select(dict(section, binaries=[{"config": {"PDL": on, "num_warps": 4}}]), ("cuda", 90, 32),
                               "3.6.0").use


def test_install_under_the_keys_the_jit_computes(mi300x, tmp_path):
    """Outside the interpreter (kernels as JITFunctions): the stored files land in an empty Triton
    cache under keys triton.compile then finds for every binary, without compiling anything."""
    script = textwrap.dedent(f"""
        import json, triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from ds4c.artifact.artifact import read_artifact
        from ds4c.runtime import binaries
        from ds4c.backends.triton.launches import triton_source
        manifest, _, container = read_artifact({str(mi300x)!r})
        section = manifest["kernels"]
        chosen = binaries.install(section, container)
        hits = []
        knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
        for b in section["binaries"]:
            _, src, options = triton_source(b["function"], b["specialization"])
            triton.compile(src, target=GPUTarget(*section["triton_target"]), options=options)
        print(json.dumps({{"status": chosen.status, "hits": hits}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["DS4C_CACHE_DIR"] = str(tmp_path / "ds4c")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "stored"
    assert result["hits"] and all(result["hits"])
    # the files are in ds4c's own cache (this user's alone), not in the Triton cache other programs share
    from ds4c.runtime.binary_cache import DIRECTORY

    ours = tmp_path / "ds4c" / DIRECTORY
    assert ours.stat().st_mode & 0o077 == 0
    assert len(list(ours.glob("*/*.hsaco"))) == len({b["cache_key"] for b in open_container(mi300x).manifest[
        "kernels"]["binaries"]})
    assert not list((tmp_path / "cache").rglob("*.hsaco"))


def _with_section(src, dst, edit):
    """``src`` rewritten with its kernels section edited (consistent member hashes, unsigned)."""
    c = open_container(src)
    manifest = json.loads(json.dumps(c.manifest))
    edit(manifest["kernels"])
    write_container(dst, manifest, {n: c.read_bytes(n) for n in c.member_names()})
    return dst


@pytest.mark.parametrize("name", ["../../evil.json", "/tmp/evil.hsaco", "sub/_attention_kernel.json",
                                  "_attention_kernel.so", "other_kernel.hsaco", ".json", "_attention_kernel.json/x"])
def test_binary_file_names_other_than_tritons_are_refused(mi300x, tmp_path, name):
    def rename(section):
        b = next(b for b in section["binaries"] if b["name"] == "_attention_kernel")
        victim = next(n for n in b["files"] if n.endswith(".hsaco"))
        b["files"][name] = b["files"].pop(victim)

    bad = _with_section(mi300x, tmp_path / "bad.ds4", rename)
    with pytest.raises(ArtifactError, match="names the file .* for kernel '_attention_kernel'.*tampered"):
        ds4c.load(bad, backend="reference")
    res = CliRunner().invoke(app, ["run", str(bad), "--prompt-ids", "1,2", "-n", "1"])
    assert res.exit_code == 2 and "tampered" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("key", ["../../x", "A" * 64, "0" * 63, 7])
def test_cache_keys_other_than_sha256_are_refused(mi300x, tmp_path, key):
    bad = _with_section(mi300x, tmp_path / "bad.ds4", lambda s: s["binaries"][0].update(cache_key=key))
    with pytest.raises(ArtifactError, match="cache_key' should be a sha256"):
        ds4c.load(bad, backend="reference")


def test_untrusted_binaries_are_never_installed(mi300x, monkeypatch):
    """On a (pretended) gfx942 device the binaries apply; they are installed only for a trusted artifact."""
    from ds4c.artifact.signing import Trust
    from ds4c.backends.triton.kernels import configs

    monkeypatch.setattr(configs, "live_triton_target", lambda: ("hip", "gfx942", 64))
    installed = []
    monkeypatch.setattr(binaries, "install", lambda section, container: installed.append(1) or binaries.Selection(True))
    manifest, _, container = ds4c.artifact.artifact.read_artifact(mi300x)
    device = torch.device("cuda")
    for trust in (None, Trust(False, "the artifact is unsigned")):
        with pytest.warns(binaries.KernelBinaryWarning, match="not trusted.*ds4c trust add KEY.pub.*--trust-binaries"):
            status = binaries.use_stored_binaries(manifest, container, device, "kernels", trust=trust)
        assert status.startswith("jit: the artifact is not trusted") and not installed
    status = binaries.use_stored_binaries(manifest, container, device, "kernels", trust=Trust(True, "signed"))
    assert status == "stored" and installed == [1]


def test_binary_cache_is_read_first_and_private(tmp_path, monkeypatch):
    """ds4c's binary cache: a stored key's files come from it, other keys and every write go to the
    cache manager configured before; a directory others can write is not used."""
    pytest.importorskip("triton")
    from triton.runtime.cache import FileCacheManager

    from ds4c.errors import KernelError
    from ds4c.runtime import binary_cache

    monkeypatch.setenv("DS4C_CACHE_DIR", str(tmp_path / "ds4c"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(binary_cache.StoredBinaries, "fallback", FileCacheManager)
    key = "ab" * 32
    where = binary_cache.store(key, {"_k.json": b"{}", "_k.hsaco": b"\x7fELF"})
    manager = binary_cache.StoredBinaries(binary_cache.triton_key(key))
    group = manager.get_group("_k.json")
    assert group == {"_k.json": str(where / "_k.json"), "_k.hsaco": str(where / "_k.hsaco")}
    assert manager.get_file("../_k.json") is None and manager.get_group("_other.json") is None
    other = binary_cache.StoredBinaries(binary_cache.triton_key("cd" * 32))
    written = Path(other.put(b"x", "_j.hsaco"))
    assert written.is_relative_to(tmp_path / "triton") and other.get_file("_j.hsaco") == str(written)
    (tmp_path / "ds4c" / "kernel-binaries").chmod(0o777)
    with pytest.raises(KernelError, match="others can write to it"):
        binary_cache.store(key, {"_k.json": b"{}"})


def test_corrupted_kernel_member_is_refused(mi300x, tmp_path):
    c = open_container(mi300x)
    section = c.manifest["kernels"]
    victim = section["binaries"][0]["binary"]
    members = {n: c.read_bytes(n) for n in c.member_names()}
    members[victim] = members[victim][:-8] + b"tampered"
    manifest = {k: v for k, v in c.manifest.items()}
    bad = tmp_path / "bad.ds4"
    write_container(bad, manifest, members)  # consistent container hashes, stale kernels section
    with pytest.raises(ArtifactError, match=f"kernel member '{victim}' does not match its sha256"):
        ds4c.load(bad, backend="reference")
    flipped = tmp_path / "flipped.ds4"
    flipped.write_bytes(mi300x.read_bytes())
    with zipfile.ZipFile(mi300x) as zf:
        info = zf.getinfo(victim)
    data = bytearray(flipped.read_bytes())
    start = data.index(members[victim][:-8][:64], info.header_offset)
    data[start + 10] ^= 0xFF  # one bit pattern flipped inside the stored binary
    flipped.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=victim.split("/")[-1]):
        ds4c.load(flipped, backend="reference")


def test_prefill_probes_fit_the_context():
    from ds4c.backends.triton.launches import prefill_lengths

    assert prefill_lengths(4096) == [128, 64, 37]
    assert prefill_lengths(64) == [64, 37]
    assert prefill_lengths(32) == [32]  # longer probes would index past a 32-entry cache
    assert prefill_lengths(None) == [128, 64, 37]


def test_ptxas_settled_before_keys_are_made(monkeypatch, tmp_path):
    """Inductor points TRITON_PTXAS_PATH at torch's bundled ptxas the first time it compiles, which
    changes Triton's cache keys midway through a process; ds4c settles it first, with Inductor's own
    function, in the AOT workers' environment (and before installing binaries at load)."""
    import torch._inductor.runtime.compile_tasks as tasks

    ptxas = tmp_path / "ptxas"
    monkeypatch.setenv("TRITON_PTXAS_PATH", "placeholder")
    monkeypatch.delenv("TRITON_PTXAS_PATH")
    monkeypatch.setattr(tasks, "_set_triton_ptxas_path",
                        lambda: os.environ.setdefault("TRITON_PTXAS_PATH", str(ptxas)))
    assert aot._worker_env()["TRITON_PTXAS_PATH"] == str(ptxas)
    assert aot.pin_ptxas() == str(ptxas)


@pytest.mark.slow
def test_serving_steps_compile_ahead_of_time_in_the_engines_buckets(tmp_path):
    """A ``--serving`` artifact holds the binaries of the engine's steps too (each decode bucket
    and token bucket of ``default_buckets``, with ``--speculative`` the verify steps and the MTP
    block's, inputs laid out as the engine's step buffers hold them), so an engine's start captures
    its graphs without compiling them; the serving-only ops (paged addressing, keys read at their
    rows) are among them."""
    from ds4c.models.deepseek_v4.paged import default_buckets

    serving = {"max_running": 4, "max_chunk": 32, "max_step_tokens": 48}
    art = ds4c.compile("tiny", target="h100", precision="bf16", max_context=128, progress=False, serving=serving,
                       kernel_binaries=True, speculative=3)
    section = art.manifest["kernels"]
    steps = section["specialised_for"]["serving_steps"]
    decode, tokens, seqs = default_buckets(4, 48)
    assert [s["R"] for e, s in steps if e == "ragged_decode"] == decode == [1, 2, 4]
    # ragged_step: the token buckets, then per decode bucket r a verify of r + 1 sequences of 4 rows
    assert [s["N"] for e, s in steps if e == "ragged_step"] == tokens + [8, 12, 20] and seqs == 5
    assert [s["N"] for e, s in steps if e == "mtp_step"] == tokens + [8, 12, 20]  # the MTP block alike
    assert all(s["PC"] == art.manifest["serving"]["pages"]["pages"]["compressed"] for _, s in steps)
    ops = {op for b in section["binaries"] for op in b["ops"]}
    assert {"attention.sliding.rows", "attention.csa.rows", "attention.hca.rows", "indexer.topk.table", "paged.rows_at",
            "paged.window_index", "paged.window_gather", "paged.ring_rows", "compress.rows", "moe"} <= ops
