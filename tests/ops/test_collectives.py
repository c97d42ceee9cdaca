"""Collectives as IR ops (ds4c/ops/collectives.py): types, verification, and their references run
over gloo by two CPU processes (the reference backend of a sharded program)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import ds4c.ops  # noqa: F401 - registers the ops
from ds4c.errors import Ds4cError, IRError, VerificationError
from ds4c.ir import parse_graph
from ds4c.ir.interpreter import run_graph
from ds4c.ir.verifier import verify_graph

PROGRAM = """\
graph @g(input %x: f32[S,8]) {
  %a = dist.all_reduce(%x, axis="tp", world=2) : f32[S,8]
  %b = dist.all_gather(%a, axis="tp", world=2, dim=1) : f32[S,16]
  %c = dist.reduce_scatter(%b, axis="tp", world=2, dim=0) : f32[(S//2),16]
  %d = dist.all_to_all(%c, axis="ep", world=2) : f32[(S//2),16]
  return a=%a, b=%b, c=%c, d=%d
}
"""


def _rank_input(rank: int) -> torch.Tensor:
    return torch.arange(32, dtype=torch.float32).view(4, 8) * (rank + 1)


def _expected(rank: int) -> dict[str, torch.Tensor]:
    a = _rank_input(0) + _rank_input(1)
    b = torch.cat([a, a], dim=1)
    both = 2 * b  # every rank holds b; the sum over 2 ranks, split by rows
    c = {r: both[2 * r:2 * r + 2] for r in range(2)}
    # all-to-all: rank r gets part r (one row) of each rank's c, in rank order
    d = torch.cat([c[0][rank:rank + 1], c[1][rank:rank + 1]])
    return {"a": a, "b": b, "c": c[rank], "d": d}


def test_types_and_verification():
    graph = parse_graph(PROGRAM)
    verify_graph(graph)
    for bad, why in [('dist.all_gather(%x, axis="tp", world=2, dim=2) : f32[S,16]', "outside"),
                     ('dist.reduce_scatter(%x, axis="tp", world=3, dim=1) : f32[S,3]', "equal parts"),
                     ('dist.all_reduce(%x, axis="tp", world=0) : f32[S,8]', "world"),
                     ('dist.all_reduce(%x, axis="tp") : f32[S,8]', "takes axis, world"),
                     ('dist.all_gather(%x, axis="tp", world=2, dim=1) : f32[S,8]', "")]:
        text = f"graph @g(input %x: f32[S,8]) {{\n  %y = {bad}\n  return y=%y\n}}\n"
        with pytest.raises((VerificationError, IRError), match=why):
            verify_graph(parse_graph(text))


def test_one_rank_axes_are_the_identity_and_a_missing_group_is_named():
    text = 'graph @g(input %x: f32[4,8]) {\n  %y = dist.all_reduce(%x, axis="tp", world=1) : f32[4,8]\n  return y=%y\n}\n'
    x = torch.randn(4, 8)
    assert torch.equal(run_graph(parse_graph(text), {"x": x}, {})["y"], x)
    with pytest.raises(Ds4cError, match="mesh axis 'tp' of 2 ranks"):
        run_graph(parse_graph(PROGRAM), {"x": x}, {})


def _worker(rank: int, world: int, store: str, results) -> None:
    import torch.distributed as dist

    from ds4c.ops.collectives import bind_mesh

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        with bind_mesh({"tp": dist.group.WORLD, "ep": dist.group.WORLD}):
            out = run_graph(parse_graph(PROGRAM), {"x": _rank_input(rank)}, {})
        want = _expected(rank)
        results[rank] = {k: bool(torch.equal(out[k], want[k])) for k in want}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_references_run_over_gloo_on_two_processes(tmp_path):
    store = str(tmp_path / "store")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, store, results), nprocs=2, join=True)
        got = dict(results)
    assert got == {r: {"a": True, "b": True, "c": True, "d": True} for r in range(2)}
