"""Expert parallelism by a compiler pass (ds4c/passes/shard_experts.py), run by the reference
backend on CPU processes over gloo: every rank's logits equal the unsharded program's."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import ds4c
from ds4c.errors import PassError
from ds4c.ir.interpreter import run_graph
from ds4c.ir.verifier import verify_graph
from ds4c.passes import PassContext
from ds4c.passes.manager import PassManager
from ds4c.passes.shard_experts import shard_weights

IDS = torch.tensor([[3, 17, 99, 4, 250, 8, 41, 77, 5, 300, 12, 64, 7, 9, 400, 2, 33, 18, 6, 91]])


def _sharded(program, world: int, rank: int):
    ctx = PassContext(options={"ep": world, "rank": rank}, program_attrs={})
    graph = PassManager(["shard_experts"], ctx=ctx).run(type(program)({"prefill": program.graphs["prefill"]},
                                                                      {})).graphs["prefill"]
    return graph, ctx.program_attrs.get("shard", {})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    art = ds4c.compile("tiny", target="cpu", precision="fp32", max_context=64, progress=False)
    path = tmp_path_factory.mktemp("ep") / "tiny.ds4"
    art.save(path)
    return path


def test_each_rank_holds_its_experts_and_sums_its_partial_moe(artifact):
    model = ds4c.load(artifact)
    graph, shard = _sharded(model.program, 2, 1)
    verify_graph(graph)
    moes = [op for op in graph.ops if op.name == "moe"]
    reduces = [op for op in graph.ops if op.name == "dist.all_reduce"]
    assert len(moes) == len(reduces) == model.manifest["model"]["config"]["num_hidden_layers"]
    assert all(op.kwargs["expert_offset"] == 4 and op.kwargs["shared"] is False for op in moes)
    assert all(op.args[4].type.shape[0] == 4 for op in moes)
    assert shard["weights"]["model.layers.0.mlp.experts.gate_up_proj"] == [{"dim": 0, "start": 4, "stop": 8, "of": 8}]
    weights = shard_weights(model.weights, shard)
    assert weights["model.layers.0.mlp.experts.down_proj"].shape[0] == 4
    with pytest.raises(PassError, match="do not split over 3 ranks"):
        _sharded(model.program, 3, 0)


def _worker(rank: int, world: int, store: str, path: str, results) -> None:
    import torch.distributed as dist

    from ds4c.ops.collectives import bind_mesh

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = ds4c.load(path)
        want = run_graph(model.program.graphs["prefill"], {"input_ids": IDS}, model.weights)["logits"]
        graph, shard = _sharded(model.program, world, rank)
        with bind_mesh({"ep": dist.group.WORLD}):
            got = run_graph(graph, {"input_ids": IDS}, shard_weights(model.weights, shard))["logits"]
        results[rank] = (float((got - want).abs().max()), bool(torch.equal(got.argmax(-1), want.argmax(-1))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_logits_equal_one_rank_over_gloo(artifact, tmp_path, world):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(artifact), results), nprocs=world, join=True)
        got = dict(results)
    assert sorted(got) == list(range(world))
    for rank, (err, same_tokens) in got.items():
        assert err <= 1e-5 and same_tokens, (rank, err)


@pytest.mark.parametrize("routing", ["bias", "hash"])
def test_the_moe_op_of_each_rank_sums_to_the_whole(routing):
    """``moe`` with ``expert_offset`` / ``shared`` (both its reference and its traced formulation):
    the ranks' partial results add up to the unsharded op."""
    from ds4c.ops.moe import moe_gather_formulation, moe_reference

    g = torch.Generator().manual_seed(0)
    e, d, inner, world = 8, 16, 12, 4
    x = torch.randn(1, 10, d, generator=g)
    ids = torch.randint(0, 50, (1, 10), generator=g)
    router = torch.randn(e, d, generator=g)
    selector = torch.randint(0, e, (50, 2), generator=g) if routing == "hash" else torch.randn(e, generator=g)
    gate_up, down = torch.randn(e, 2 * inner, d, generator=g), torch.randn(e, d, inner, generator=g)
    shared = [torch.randn(inner, d, generator=g), torch.randn(inner, d, generator=g), torch.randn(d, inner, generator=g)]
    kw = {"top_k": 2, "route_scale": 1.5, "swiglu_limit": 10.0, "routing": routing, "score": "sqrtsoftplus"}
    for fn in (moe_reference, moe_gather_formulation):
        whole = fn(x, ids, router, selector, gate_up, down, *shared, **kw)
        per = e // world
        parts = [fn(x, ids, router, selector, gate_up[r * per:(r + 1) * per], down[r * per:(r + 1) * per], *shared,
                    expert_offset=r * per, shared=r == 0, **kw) for r in range(world)]
        assert torch.allclose(sum(parts), whole, atol=1e-5), fn.__name__
