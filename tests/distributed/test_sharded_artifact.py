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


def _worker(rank: int, world: int, port: int, path: str, results, ids=IDS) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist

    try:
        model = ds4c.load(path)
        logits = model(torch.tensor(ids))
        tokens = model.generate(torch.tensor(ids), max_new_tokens=8)
        results[rank] = (logits, tokens, model.manifest["rank"],
                         {k: tuple(v.shape) for k, v in model.weights.items() if "experts" in k})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(path, world: int, ids=IDS) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), str(path), results, ids), nprocs=world, join=True)
        return dict(results)


BATCH = [[(7 * i + 3 * j) % 500 + 2 for j in range(20)] for i in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["ep=2,attention=dp", "ep=2,tp=2,attention=dp"])
def test_data_parallel_attention_gives_one_ranks_logits_and_tokens(mesh, tmp_path):
    """attention=dp: each rank runs attention (and keeps the state) of its rows of the batch, the
    MoE layers gather every rank's tokens and scatter the sums back; every rank returns the whole
    batch's logits and tokens, equal to one rank's."""
    one = ds4c.load(ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False)
                    .save(tmp_path / "one.ds4"))
    want_logits, want_tokens = one(torch.tensor(BATCH)), one.generate(torch.tensor(BATCH), max_new_tokens=8)
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh=mesh)
    ops = {op.name for op in art.ranks[1].graphs["decode"].ops}
    assert {"dist.all_gather", "dist.reduce_scatter"} <= ops and "dist.all_reduce" not in ops
    got = run_ranks(art.save(tmp_path / "dp.ds4"), art.manifest["mesh"]["world"], BATCH)
    for rank, (logits, tokens, _, _) in got.items():
        assert (logits - want_logits).abs().max() <= 1e-5, (mesh, rank)
        assert torch.equal(tokens, want_tokens), (mesh, rank)


@pytest.mark.slow
@pytest.mark.parametrize("mesh, weights", [("ep=2", "embed"), ("tp=2", "embed"), ("ep=2,tp=2", "embed"),
                                           ("ep=4", "embed"), ("tp=4", "embed"), ("ep=2,tp=2", "reference")])
def test_every_rank_of_a_sharded_artifact_gives_one_ranks_logits_and_tokens(one_rank, mesh, weights, tmp_path):
    """(``reference``: each rank generates its slices of the preset's weights from the seed.)"""
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh=mesh,
                       weights=weights)
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
    assert manifest["mesh"] == {"axes": {"ep": 2, "tp": 2}, "world": 4, "attention": "replicated"}
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
    # tensor parallelism of attention: rank 3 (tp index 1) holds the second half of every layer's heads
    assert own["weights"]["shard"]["model.layers.0.self_attn.q_b_proj.weight"] == \
        [{"dim": 0, "start": 64, "stop": 128, "of": 128}]
    assert own["weights"]["shard"]["model.layers.0.self_attn.o_b_proj.weight"][0]["dim"] == 1
    reduces = [op.kwargs for op in prog3.graphs["decode"].ops if op.name == "dist.all_reduce"]
    layers = manifest["model"]["config"]["num_hidden_layers"]
    assert reduces.count({"axis": "world", "world": 4}) == layers  # the MoE layers' parts
    assert reduces.count({"axis": "tp", "world": 2}) == layers  # the attention output's parts
    assert sum(manifest["weights"]["rank_bytes"]) < 4 * manifest["weights"]["bytes"]


def test_loading_a_sharded_artifact_outside_a_launcher_says_how_to_run_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh="ep=2")
    path = art.save(tmp_path / "tiny.ds4")
    with pytest.raises(ConfigError, match=r"sharded over 2 ranks .*--ranks 2"):
        ds4c.load(path)


@pytest.mark.parametrize("mesh, message", [("ep=3", "do not split over ep=3"), ("dp=2", "axes ep, tp"),
                                           ("tp=3", "splits attention's 4 heads in 2 output groups"),
                                           ("ep=two", "not a whole number")])
def test_a_mesh_that_does_not_fit_the_model_is_refused(mesh, message):
    with pytest.raises(ConfigError, match=message):
        ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh=mesh)


def _dying_worker(rank: int, world: int, port: int, path: str, results) -> None:
    import time

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS4C_DIST_TIMEOUT": "30"})
    model = ds4c.load(path)
    if rank == 1:
        os._exit(3)  # killed: no goodbye to the others
    time.sleep(1.0)
    t0 = time.perf_counter()
    try:
        model(torch.tensor(IDS))
        results[rank] = ("finished", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - the test reads what it was
        results[rank] = (f"{type(e).__name__}: {e}", time.perf_counter() - t0)


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_others_stop_with_an_error_naming_it(tmp_path):
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh="ep=2")
    path = art.save(tmp_path / "tiny.ds4")
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(_dying_worker, args=(2, free_port(), str(path), results), nprocs=2, join=False,
                                 start_method="spawn")
        for p in ctx.processes:
            p.join(timeout=90)
        alive = [p.is_alive() for p in ctx.processes]
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        got = dict(results)
    assert alive == [False, False]
    message, seconds = got[0]
    assert message.startswith("RankFailure: rank 0: a collective over mesh axis 'ep' (2 ranks) failed"), message
    assert "another rank has exited" in message and seconds < 30


def _generated(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("generated ids"))


@pytest.mark.slow
def test_ds4c_run_starts_one_process_per_rank_and_two_nodes_rendezvous_over_loopback(tmp_path):
    """``ds4c run ART --ranks 2`` (torchrun's agent on this machine) and the same artifact as two
    'nodes' of one process each, joined by torchrun's c10d rendezvous on 127.0.0.1: rank 0 prints
    the tokens one process prints for the unsharded artifact."""
    import subprocess
    import sys

    def ds4c_cli(*args, **kw):
        return subprocess.run([sys.executable, "-m", "ds4c", *args], capture_output=True, text=True, timeout=240, **kw)

    one, two = tmp_path / "one.ds4", tmp_path / "ep2.ds4"
    assert ds4c_cli("compile", "tiny", "--target", "cpu", "--precision", "fp32", "--max-context", "64",
                    "-o", str(one)).returncode == 0
    assert ds4c_cli("compile", "tiny", "--target", "cpu", "--precision", "fp32", "--max-context", "64",
                    "--mesh", "ep=2", "-o", str(two)).returncode == 0
    prompt = ["--prompt-ids", "3,17,99,4,250,8", "-n", "6"]
    want = ds4c_cli("run", str(one), *prompt)
    assert want.returncode == 0, want.stderr
    local = ds4c_cli("run", str(two), *prompt, "--ranks", "2")
    assert local.returncode == 0, local.stderr[-2000:]
    assert _generated(local.stdout) == _generated(want.stdout)
    assert local.stdout.count("generated ids") == 1  # rank 0 prints
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=ds4c-test",
                               "--max-restarts=0", "-m", "ds4c", "run", str(two), *prompt],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outs]
    printed = [out for out, _ in outs if "generated ids" in out]
    assert len(printed) == 1 and _generated(printed[0]) == _generated(want.stdout)


PROMPTS = [[5 + i % 7] * (3 + 40 * i) for i in range(4)]  # 3 .. 123 tokens: chunks, window wrap, CSA/HCA


def _engine_worker(rank: int, world: int, port: int, path: str, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from ds4c.runtime.sampling import SamplingParams

    engine = ds4c.Engine(path, prefix_cache=True, state_budget=64 << 20)
    if engine.rank:
        results[rank] = engine.follow()
        return
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    again = engine.generate(PROMPTS[2:], SamplingParams(max_new_tokens=12))  # prefix-cache hits: page copies
    results[rank] = (out, again, engine.stats()["prefix_cache"])
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["ep=2", "tp=2"])
def test_the_engine_on_rank_0_drives_every_rank_of_a_sharded_serving_artifact(tmp_path, mesh):
    from ds4c.runtime.sampling import SamplingParams

    kw = dict(target="cpu", precision="fp32", max_context=256, progress=False,
              serving={"max_running": 4, "max_chunk": 32})
    one = ds4c.compile("tiny", **kw).save(tmp_path / "one.ds4")
    want = ds4c.Engine(str(one), state_budget=64 << 20).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    art = ds4c.compile("tiny", mesh=mesh, **kw)
    path = art.save(tmp_path / "sharded.ds4")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_engine_worker, args=(2, free_port(), str(path), results), nprocs=2, join=True)
        got = dict(results)
    out, again, cache = got[0]
    assert out == want and again == want[2:]
    assert cache["hit_tokens"] > 0  # the second round resumed from cached pages (copied on every rank)
    assert got[1] > len(PROMPTS)  # rank 1 ran every step (prefill chunks and decodes)


def _speculative_worker(rank: int, world: int, port: int, path: str, prompts, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    results[rank] = _speculate(path, prompts)


def _speculate(path: str, prompts) -> object:
    """Rank 0 (or one process): (tokens, accepted drafts, verifies, steps) of 3-draft speculation over
    ``prompts``; another rank: the steps it followed."""
    from ds4c.runtime.sampling import SamplingParams

    engine = ds4c.Engine(path, pages={"window": 300, "compressed": 120, "slots": 13}, speculative=3)
    if engine.rank:
        return engine.follow()
    out = engine.generate(prompts, SamplingParams(max_new_tokens=24))
    stats = engine.stats()
    engine.close()
    return out, stats["accepted_drafts"], stats["verifies"], stats["steps"]


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    """The ``mixed`` config with an MTP block trained for a few steps (some drafts rejected), as a
    checkpoint, and prompts of its synthetic language."""
    from tests.mtp_model import mtp_model, save_checkpoint
    from tests.quant.synthetic_language import bigram_batch

    model, successor = mtp_model(15)
    g = torch.Generator().manual_seed(4)
    prompts = [bigram_batch(successor, 1, n, g)[0].tolist() for n in (1, 9, 33, 70)]
    return save_checkpoint(model, tmp_path_factory.mktemp("mtp_ckpt")), prompts


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["ep=2", "tp=2"])
def test_speculative_decoding_over_the_ranks_of_a_sharded_artifact_equals_one_rank(tmp_path, mesh, mtp_checkpoint):
    """The MTP block sharded like the main model (its experts over ep, its heads over tp): rank 0's
    speculative engine drives every rank's verify and MTP steps (the MTP steps by rows of the
    streams every rank holds). Same tokens and the same drafts accepted as one rank: the drafts
    themselves are the unsharded block's."""
    from tests.mtp_model import MAX_CONTEXT

    ckpt, prompts = mtp_checkpoint
    kw = dict(target="cpu", precision="fp32", max_context=MAX_CONTEXT, progress=False, speculative=3,
              serving={"max_running": 12, "max_chunk": 32, "window_page": 4, "comp_page": 16})
    want = _speculate(str(ds4c.compile(ckpt, **kw).save(tmp_path / "one.ds4")), prompts)
    path = ds4c.compile(ckpt, mesh=mesh, **kw).save(tmp_path / "sharded.ds4")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_speculative_worker, args=(2, free_port(), str(path), prompts, results), nprocs=2, join=True)
        got = dict(results)
    assert got[0] == want
    assert 0 < want[1] < 3 * want[2]  # drafts accepted, and some rejected
    assert got[1] == want[3]  # rank 1 ran every step (prefill chunks and verifies)


@pytest.mark.slow
def test_ranks_read_their_experts_from_a_release_checkpoint(tmp_path):
    """A checkpoint in DeepSeek's release naming (one tensor per expert), compiled ep=2 by
    reference: each rank reads only its experts, and its logits equal the unsharded artifact's."""
    from ds4c.frontend.checkpoint import load_checkpoint
    from ds4c.frontend.deepseek_format import write_deepseek_checkpoint
    from ds4c.models.deepseek_v4.presets import PRESETS

    tiny = ds4c.load(ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False)
                     .save(tmp_path / "preset.ds4"))
    ckpt = write_deepseek_checkpoint(tiny.weights, dict(PRESETS["tiny"]), tmp_path / "ckpt", fp8=False,
                                     fp4_experts=False)
    name = "model.layers.1.mlp.experts.down_proj"
    whole = tiny.weights[name]
    part = load_checkpoint(ckpt, {name: (tuple(whole.shape), whole.dtype)}, partial=True,
                           shard={name: [{"dim": 0, "start": 4, "stop": 8, "of": 8}]})[name]
    assert torch.equal(part, whole[4:])
    one = ds4c.compile(str(ckpt), target="cpu", precision="fp32", max_context=64, progress=False,
                       weights="reference").save(tmp_path / "one.ds4")
    want = ds4c.load(one)(torch.tensor(IDS))
    path = ds4c.compile(str(ckpt), target="cpu", precision="fp32", max_context=64, progress=False,
                        weights="reference", mesh="ep=2").save(tmp_path / "ep2.ds4")
    got = run_ranks(path, 2)
    for rank, (logits, _, _, shapes) in got.items():
        assert (logits - want).abs().max() <= 1e-5, rank
        assert shapes[name][0] == 4


def test_collectives_are_scheduled_on_a_comm_stream_at_the_peer_link():
    """schedule_streams puts a sharded program's collectives on ``comm``, timed at the target's
    peer link (a ring all-reduce sends 2 (W-1)/W of its operand per rank); check_schedule holds."""
    from ds4c.passes.schedule_streams import check_schedule
    from ds4c.targets import get_target

    art = ds4c.compile("tiny", target="h200", precision="bf16", max_context=64, progress=False, mesh="ep=4",
                       kernel_binaries=False)
    graph = art.ranks[2].graphs["decode"]
    schedule = art.ranks[2].attrs["schedule"]["decode"]
    assert "comm" in schedule["streams"]
    reduces = [i for i, op in enumerate(graph.ops) if op.name == "dist.all_reduce"]
    assert reduces and all(schedule["ops"][i][0] == "comm" for i in reduces)
    i = reduces[0]
    operand = graph.ops[i].args[0].type
    sent = schedule["costs"][i]["bytes"]
    assert sent == pytest.approx(2 * 3 / 4 * operand.dtype.itemsize * 64)  # B=1, one token, hidden 64
    assert schedule["costs"][i]["seconds"] >= sent / get_target("h200").peer_link_bandwidth
    check_schedule(graph, schedule, art.ranks[2].attrs["memory_plan"]["decode"])
    assert "comm" not in ds4c.compile("tiny", target="h200", precision="bf16", max_context=64, progress=False,
                                      kernel_binaries=False).program.attrs["schedule"]["decode"]["streams"]


@pytest.mark.slow
def test_full_size_flash_over_4_gpus_fits_each_rank():
    """`ds4c compile flash --target h200 --gpus 4` (meta tensors, the release's formats): one program
    per rank, each holding a quarter of every layer's experts (the three hash layers too), one
    all-reduce per MoE layer, and every rank's decode plan fits its H200."""
    art = ds4c.compile("flash", target="h200", precision="mxfp4-experts", weights="reference", gpus=4,
                       kernel_binaries=False, progress=False)
    m = art.manifest
    assert m["mesh"] == {"axes": {"ep": 4, "tp": 1}, "world": 4, "attention": "replicated"}
    for r, program in enumerate(art.ranks):
        ops = [op for op in program.graphs["decode"].ops]
        moes = [op for op in ops if op.name in ("moe", "moe.packed")]
        assert len(moes) == 43 and sum(op.name == "dist.all_reduce" for op in ops) == 43
        assert {op.kwargs["expert_offset"] for op in moes} == {64 * r}
        plan = m["ranks"][r]["memory_plan"]["decode"]
        assert plan["fits"] and plan["device_bytes"] < 0.5 * plan["target_hbm_bytes"]


def test_a_sharded_preset_artifact_refuses_weights_from(tmp_path):
    """As an unsharded one does: its weights come from the preset's seed, not from a checkpoint."""
    path = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False, mesh="ep=2",
                        weights="reference").save(tmp_path / "ep2.ds4")
    with pytest.raises(ConfigError, match=r"takes its weights from a preset \('tiny'\), not from a checkpoint"):
        ds4c.load(path, rank=1, weights_from=tmp_path)
