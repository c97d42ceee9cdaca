"""Expert parallelism: one rank's program of a model whose routed experts are split over ranks.

On a mesh axis ``ep`` of ``W`` ranks, rank ``r`` holds experts ``r*E/W .. (r+1)*E/W - 1`` of
every MoE layer (its ``gate_up`` / ``down`` params become those slices: same names, first
dimension ``E/W``; ``attrs["shard"]`` records the slice so a loader reads only them). Every rank
routes each token over all ``E`` experts (the router and the activations are whole on every
rank), computes the picks of its own experts, rank 0 also adds the shared expert, and a
``dist.all_reduce`` over ``ep`` sums the partial results: the layer's output on every rank, the
whole program's output on every rank. Computation moved, none duplicated but the attention
(replicated: every rank runs it for the whole batch).

Options: ``ep`` (ranks, default 1: no change) and ``rank``.

    %y = moe(%x, %ids, %router, %sel, %gate_up, %down, %sg, %su, %sd, top_k=2, ...) : f32[1,S,64]
  ->
    %p = moe(%x, %ids, %router, %sel, %gate_up, %down, %sg, %su, %sd, top_k=2, ..., expert_offset=4,
             shared=False) : f32[1,S,64]            (rank 1 of 2; %gate_up: f32[4,64,64])
    %y = dist.all_reduce(%p, axis="ep", world=2) : f32[1,S,64]
"""

from __future__ import annotations

from ds4c.errors import PassError
from ds4c.ir.graph import Graph, GraphInput, Op, Value
from ds4c.ir.types import TensorType
from ds4c.ops.collectives import ALL_REDUCE
from ds4c.passes.manager import PassContext, register_pass

__all__ = ["expert_slice", "shard_experts", "shard_weights"]

SHARDED_OPS = {"moe": (4, 5)}  # op -> operand positions of the routed experts' weights


def expert_slice(experts: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the experts rank ``rank`` of ``world`` holds."""
    per = experts // world
    return rank * per, (rank + 1) * per


@register_pass("shard_experts")
def shard_experts(graph: Graph, ctx: PassContext) -> Graph:
    """Rank ``rank``'s program of expert parallelism over ``ep`` ranks (see the module doc)."""
    world, rank = int(ctx.options.get("ep", 1)), int(ctx.options.get("rank", 0))
    if world == 1:
        return graph
    if not 0 <= rank < world:
        raise PassError(f"shard_experts: rank {rank} is outside the {world} ranks of the ep axis")
    packed = sorted({op.name for op in graph.ops if op.name == "moe.packed"})
    if packed:
        raise PassError(f"shard_experts @{graph.name}: {packed[0]} (packed expert weights) is not sharded yet; "
                        "compile the sharded program for the reference backend (--target cpu)")
    params = {i.value: i for i in graph.inputs if i.kind == "param"}
    sliced: dict[Value, Value] = {}
    records = ctx.program_attrs.setdefault("shard", {"ep": world, "rank": rank, "weights": {}})
    ops: list[Op] = []
    taken = graph.value_names()
    for op in graph.ops:
        if op.name not in SHARDED_OPS:
            ops.append(op.map_operands(lambda v: sliced.get(v, v)))
            continue
        args = list(op.args)
        experts = None
        for pos in SHARDED_OPS[op.name]:
            w = args[pos]
            if w not in params or not isinstance(w.type, TensorType) or not isinstance(w.type.shape[0], int):
                raise PassError(f"shard_experts @{graph.name}: {op.name} operand {pos} (%{w.name}) must be a param "
                                "with a static expert dimension")
            experts = w.type.shape[0]
            if experts % world:
                raise PassError(f"shard_experts: {experts} experts of %{w.name} do not split over {world} ranks")
            start, stop = expert_slice(experts, world, rank)
            if w not in sliced:
                sliced[w] = Value(w.name, TensorType(w.type.dtype, (stop - start, *w.type.shape[1:])))
                records["weights"][w.name] = {"dim": 0, "start": start, "stop": stop, "of": experts}
            args[pos] = sliced[w]
        start, _ = expert_slice(experts, world, rank)
        partial_value = Value(graph.fresh_name(f"{op.results[0].name}_ep", taken), op.results[0].type)
        taken.add(partial_value.name)
        ops.append(op.replace(args=tuple(args), kwargs={**op.kwargs, "expert_offset": start, "shared": rank == 0},
                              results=(partial_value,)))
        ops.append(Op(ALL_REDUCE, (partial_value,), {"axis": "ep", "world": world}, op.results, loc=op.loc))
    inputs = [GraphInput(i.kind, sliced.get(i.value, i.value)) for i in graph.inputs]
    outputs = [(n, sliced.get(v, v)) for n, v in graph.outputs]
    return graph.copy(ops=ops, inputs=inputs, outputs=outputs)


def shard_weights(weights: dict, shard: dict) -> dict:
    """``weights`` (name -> tensor, the whole model's) as rank ``shard['rank']`` holds them."""
    out = dict(weights)
    for name, rec in shard.get("weights", {}).items():
        t = weights[name]
        if t.shape[rec["dim"]] != rec["of"]:
            raise PassError(f"shard_weights: {name} has {t.shape[rec['dim']]} rows along dim {rec['dim']}, "
                            f"the sharded program expects {rec['of']}")
        out[name] = t.narrow(rec["dim"], rec["start"], rec["stop"] - rec["start"])
    return out
