"""The serving entry points on the kernels backend (Triton; the interpreter on CPU, the GPU on the
device): the Engine gives the reference backend's tokens for a ragged batch, pools written in
place (state.write), attention / indexer kernels reading keys at their page-table rows, compress
kernels."""

from __future__ import annotations

import pytest
import torch

import ds4c  # the interpreter on CPU: tests/backends/triton/conftest.py sets it where no GPU is

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPTS = [[1, 2, 3], list(range(10, 47)), [5] * 20]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=128, progress=False,
                       kernel_binaries=False, serving={"max_running": 4, "max_chunk": 32, "max_step_tokens": 48})
    path = tmp_path_factory.mktemp("serving_kernels") / "tiny.ds4"
    art.save(path)
    return path


@pytest.mark.slow
def test_engine_on_the_kernels_backend_gives_the_reference_tokens(artifact):
    from ds4c.artifact.artifact import read_artifact

    _, program, _ = read_artifact(artifact)
    for entry in ("ragged_step", "ragged_decode"):  # the kernels read keys at their rows (fuse_paged_reads)
        names = {op.name for op in program.graphs[entry].ops}
        assert {"attention.sliding.rows", "attention.csa.rows", "attention.hca.rows", "indexer.topk.table",
                "paged.rows_at"} <= names
        assert "paged.gather" not in names
    params = ds4c.SamplingParams(max_new_tokens=5)
    ref = ds4c.Engine(ds4c.load(artifact, backend="reference")).generate(PROMPTS, params)
    model = ds4c.load(artifact, device=DEVICE, backend="kernels", cuda_graphs=False)
    engine = ds4c.Engine(model)
    before = {k: v.data_ptr() for k, v in engine.runner.state.items()}
    assert engine.generate(PROMPTS, params) == ref
    assert all(p["used"] == 0 for p in engine.stats()["pages"].values())
    # the pools were written in place: after every step the state is the memory allocated at the start
    assert {k: v.data_ptr() for k, v in engine.runner.state.items()} == before


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_step_buckets_are_captured_at_engine_start_and_give_the_reference_tokens(artifact):
    params = ds4c.SamplingParams(max_new_tokens=7)
    ref = ds4c.Engine(ds4c.load(artifact, backend="reference")).generate(PROMPTS, params)
    engine = ds4c.Engine(ds4c.load(artifact, device=DEVICE, backend="kernels"))
    runner = engine.runner
    stats = engine.stats()
    assert runner.graph_errors == {} and stats["decode_graphs"] == [1, 2, 4] and stats["step_graphs"] == [53]
    assert engine.generate(PROMPTS, params) == ref
    # decode steps and steps with prompt chunks (48 tokens + 5 sequences: bucket 53) ran as graph replays
    assert sum(g.replays for g in runner.decode_graphs.values()) > 0 and runner.step_graphs[53].replays > 0
    assert all(p["used"] == 0 for p in engine.stats()["pages"].values())


@pytest.fixture(scope="module")
def speculative_artifact(tmp_path_factory):
    art = ds4c.compile("tiny", target="h100", precision="fp32", max_context=128, progress=False,
                       kernel_binaries=False, serving={"max_running": 4, "max_chunk": 32, "max_step_tokens": 48},
                       speculative=3)
    path = tmp_path_factory.mktemp("serving_kernels") / "tiny_spec.ds4"
    art.save(path)
    return path


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_speculation_and_overlap_in_graphs_give_the_reference_tokens(speculative_artifact):
    """On the GPU: the verify and MTP small buckets captured at start (r + 1 sequences, (r + 1) * 4
    rows) and overlapped decode steps (tokens handed over on the device) give the reference tokens."""
    params = ds4c.SamplingParams(max_new_tokens=12)
    ref = ds4c.Engine(ds4c.load(speculative_artifact, backend="reference")).generate(PROMPTS, params)
    model = ds4c.load(speculative_artifact, device=DEVICE, backend="kernels")
    spec = ds4c.Engine(model, speculative=3)
    runner = spec.runner
    assert runner.graph_errors == {}, runner.graph_errors
    assert sorted(runner.verify_graphs) == sorted(runner.mtp_small_graphs) == [1, 2, 4]
    assert spec.generate(PROMPTS, params) == ref
    assert spec.stats()["verifies"] > 0
    assert sum(g.replays for g in runner.verify_graphs.values()) > 0
    assert sum(g.replays for g in runner.mtp_small_graphs.values()) > 0
    spec.close()
    over = ds4c.Engine(model, overlap=True)
    assert over.overlap and over.generate(PROMPTS, params) == ref
    assert over.stats()["overlapped_steps"] > 0
    assert all(p["used"] == 0 for p in over.stats()["pages"].values())


@pytest.mark.slow
def test_speculation_on_the_kernels_backend_gives_the_reference_tokens(speculative_artifact):
    """The MTP block's steps and the verify steps on the kernels (the interpreter on CPU), keys
    read at their rows (``fuse_paged_reads`` rewrote the MTP block's sliding attention too): the
    reference backend's tokens."""
    from ds4c.artifact.artifact import read_artifact

    _, program, _ = read_artifact(speculative_artifact)
    assert "attention.sliding.rows" in {op.name for op in program.graphs["mtp_step"].ops}
    params = ds4c.SamplingParams(max_new_tokens=6)
    ref = ds4c.Engine(ds4c.load(speculative_artifact, backend="reference")).generate(PROMPTS[:2], params)
    spec = ds4c.Engine(ds4c.load(speculative_artifact, device=DEVICE, backend="kernels", cuda_graphs=False),
                       speculative=3)
    assert spec.generate(PROMPTS[:2], params) == ref and spec.stats()["verifies"] > 0
    spec.close()
