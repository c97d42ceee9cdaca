"""Sharded artifacts (#30): ``ds4c.compile(mesh=...)`` stores every rank's program and the whole
weights once; ``ds4c.load`` in a worker joins the mesh's process group (gloo on CPU) and runs its
rank. Tiny, fp32: logits of every mesh (EP, TP, EP+TP; 2 and 4 ranks) equal one rank's, and
greedy tokens are the same."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import ds4c
from ds4c.artifact.artifact import read_artifact
from ds4c.errors import ConfigError

IDS = [[3, 17, 99, 4, 250, 8, 41, 77, 5, 300, 12, 64, 7, 9, 400, 2, 33, 18, 6, 91]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_rank():
    model = ds4c.load(ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False)
                      .save(_tmp() / "tiny.ds4"))
    return model(torch.tensor(IDS)), model.generate(torch.tensor(IDS), max_new_tokens=8)


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="ds4c-mesh-"))


def _worker(rank: int, world: int, port: int, path: str, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist

    try:
        model = ds4c.load(path)
        logits = model(torch.tensor(IDS))
        tokens = model.generate(torch.tensor(IDS), max_new_tokens=8)
        results[rank] = (logits, tokens, model.manifest["rank"],
                         {k: tuple(v.shape) for k, v in model.weights.items() if "experts" in k})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(path, world: int) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), str(path), results), nprocs=world, join=True)
        return dict(results)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["ep=2", "tp=2", "ep=2,tp=2", "ep=4"])
def test_every_rank_of_a_sharded_artifact_gives_one_ranks_logits_and_tokens(one_rank, mesh, tmp_path):
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh=mesh)
    path = art.save(tmp_path / "tiny.ds4")
    want_logits, want_tokens = one_rank
    got = run_ranks(path, art.manifest["mesh"]["world"])
    assert sorted(got) == list(range(art.manifest["mesh"]["world"]))
    for rank, (logits, tokens, manifest_rank, shapes) in got.items():
        assert manifest_rank == rank
        assert (logits - want_logits).abs().max() <= 1e-5, (mesh, rank)
        assert torch.equal(tokens, want_tokens), (mesh, rank)
        assert shapes  # the rank holds slices: smaller than the whole
        whole = art.manifest["weights"]["tensors"]["model.layers.0.mlp.experts.down_proj"]["shape"]
        assert shapes["model.layers.0.mlp.experts.down_proj"] != tuple(whole)


def test_a_sharded_artifact_stores_each_ranks_program_and_the_weights_once(tmp_path):
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh="ep=2,tp=2")
    path = art.save(tmp_path / "tiny.ds4")
    manifest, program, container = read_artifact(path)
    assert manifest["mesh"] == {"axes": {"ep": 2, "tp": 2}, "world": 4}
    members = container.member_names()
    for r in range(4):
        assert f"ranks/{r}/ir/prefill.ds4ir" in members
    assert members.count("weights.safetensors") == 1
    # the whole tensors once; every rank reads a quarter of the routed experts' bytes
    whole = manifest["weights"]["tensors"]["model.layers.0.mlp.experts.gate_up_proj"]["shape"]
    own, prog3, _ = read_artifact(path, rank=3)
    assert own["weights"]["source_tensors"]["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == \
        [whole[0] // 2, whole[1] // 2, whole[2]]
    assert own["weights"]["shard"]["model.layers.0.mlp.experts.gate_up_proj"][0] == \
        {"dim": 0, "start": whole[0] // 2, "stop": whole[0], "of": whole[0]}
    reduces = [op for op in prog3.graphs["decode"].ops if op.name == "dist.all_reduce"]
    assert reduces and all(op.kwargs == {"axis": "world", "world": 4} for op in reduces)
    assert sum(manifest["weights"]["rank_bytes"]) < 4 * manifest["weights"]["bytes"]


def test_loading_a_sharded_artifact_outside_a_launcher_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh="ep=2")
    path = art.save(tmp_path / "tiny.ds4")
    with pytest.raises(ConfigError, match=r"sharded over 2 ranks .*--ranks 2"):
        ds4c.load(path)


@pytest.mark.parametrize("mesh, message", [("ep=3", "do not split over ep=3"), ("dp=2", "axes ep, tp"),
                                           ("ep=two", "not a whole number")])
def test_a_mesh_that_does_not_fit_the_model_is_refused(mesh, message):
    with pytest.raises(ConfigError, match=message):
        ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh=mesh)
