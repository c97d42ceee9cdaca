"""Expert and tensor parallelism of the MoE layers: one rank's program of a model whose routed
and shared experts are split over a mesh (ds4c.distributed.mesh: ``ep`` x ``tp`` ranks).

Rank ``r`` at mesh coordinates ``(e, t)`` holds

- along ``ep`` (``W`` ranks): routed experts ``e*E/W .. (e+1)*E/W - 1`` of every MoE layer;
- along ``tp`` (``T`` ranks): of each expert it holds, the slice ``t*I/T .. (t+1)*I/T - 1`` of the
  intermediate dimension (gate and up rows, down columns); likewise of the shared expert, which
  the ranks of ``e = 0`` hold.

Every rank routes each token over all ``E`` experts (router and activations are whole on every
rank) and computes its part; the parts add up to the layer's output (the SwiGLU is elementwise
in the intermediate dimension, the down projection a sum over it), so one ``dist.all_reduce``
(over ``ep``, ``tp``, or ``world`` when both are > 1) gives every rank the whole output. Weight
names stay; their shapes become the slices, and ``attrs["shard"]["weights"]`` records each
tensor's slices so a loader reads only them (``shard_weights``). Attention and the rest are
replicated: every rank runs them for the whole batch.

With ``attention="dp"`` (data-parallel attention, ds4c.distributed.mesh) every rank holds its
own rows of the batch in the batch-major entry points (``prefill``, ``decode``, ...): each MoE
layer ``dist.all_gather``s every rank's tokens (and token ids, for hash routing) along the
batch, computes its part for all of them, and ``dist.reduce_scatter`` sums the parts and hands
each rank its rows back; the rest of the program is the one-rank program on fewer rows. The
serving entry points (packed tokens of different counts per rank) keep replicated attention.

Tensor parallelism of attention (``tp`` > 1, attention not ``dp``): the program comes traced
with ``1/tp`` of the heads and output groups (``ds4c.compiler.rank_heads``); rank t holds heads
``t*H/T ..`` of every attention layer (its rows of the query up-projection, its sinks, its output
groups' rows of the grouped output projection and their columns of the output projection: the
``ATTENTION_SLICES``), and a ``dist.all_reduce`` over ``tp`` sums the output projection's parts.
The key/value path, compressors and indexers stay whole on every rank (one shared K=V head).

Options: ``ep``, ``tp`` (ranks along each axis, default 1: no change), ``rank``, ``attention`` and
``o_groups`` (the whole model's output groups, for tensor parallelism of attention).

    %y = moe(%x, %ids, %router, %sel, %gate_up, %down, %sg, %su, %sd, top_k=2, ...) : f32[1,S,64]
  ->
    %p = moe(%x, %ids, %router, %sel, %gate_up, %down, %sg, %su, %sd, top_k=2, ..., expert_offset=4,
             shared=False) : f32[1,S,64]            (rank 1 of ep=2; %gate_up: f32[4,64,64])
    %y = dist.all_reduce(%p, axis="ep", world=2) : f32[1,S,64]
"""

from __future__ import annotations

from ds4c.distributed.shards import slice_shape, slice_tensor
from ds4c.errors import PassError
from ds4c.ir.graph import Graph, GraphInput, Op, Value
from ds4c.ir.registry import get_op
from ds4c.ir.types import TensorType
from ds4c.ops.collectives import ALL_GATHER, ALL_REDUCE, REDUCE_SCATTER
from ds4c.passes.manager import PassContext, register_pass

__all__ = ["expert_slice", "reduce_axis", "shard_experts", "shard_weights"]

SHARDED_OPS = {"moe": (4, 5)}  # op -> operand positions of the routed experts' weights
# per sharded operand position: (dimension of the intermediate size, chunks along it): gate_up
# [E, 2I, D] holds gate and up rows one after the other, down [E, D, I], the shared expert's
# gate / up [I, D] and down [D, I]
INNER = {4: (1, 2), 5: (2, 1), 6: (0, 1), 7: (0, 1), 8: (1, 1)}
# attention weights a tensor-parallel rank holds a slice of (name suffix -> dimension), and the
# one whose partial products the ranks sum
ATTENTION_SLICES = {".self_attn.q_b_proj.weight": 0, ".self_attn.sinks": 0, ".self_attn.o_a_proj.weight": 0,
                    ".self_attn.o_b_proj.weight": 1}
ATTENTION_OUTPUT = ".self_attn.o_b_proj.weight"


def expert_slice(experts: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the experts rank ``rank`` of ``world`` holds."""
    per = experts // world
    return rank * per, (rank + 1) * per


def reduce_axis(ep: int, tp: int) -> tuple[str, int]:
    """The mesh axis (and its size) over which the ranks' partial MoE outputs are summed."""
    if ep > 1 and tp > 1:
        return "world", ep * tp
    return ("ep", ep) if ep > 1 else ("tp", tp)


@register_pass("shard_experts")
def shard_experts(graph: Graph, ctx: PassContext) -> Graph:
    """Rank ``rank``'s program of expert (``ep``) and tensor (``tp``) parallelism of the MoE layers (see the module doc)."""
    ep, tp, rank = int(ctx.options.get("ep", 1)), int(ctx.options.get("tp", 1)), int(ctx.options.get("rank", 0))
    if ep * tp == 1:
        return graph
    if not 0 <= rank < ep * tp:
        raise PassError(f"shard_experts: rank {rank} is outside the {ep * tp} ranks of mesh ep={ep},tp={tp}")
    e_index, t_index = divmod(rank, tp)
    if any(op.name == "moe.packed" for op in graph.ops):
        raise PassError(f"shard_experts @{graph.name}: moe.packed (packed expert weights) is not sharded; shard "
                        "before assign_precision (ds4c.compile(mesh=...) runs the pass there)")
    params = {i.value: i for i in graph.inputs if i.kind == "param"}
    sliced: dict[Value, Value] = {}
    records = ctx.program_attrs.setdefault("shard", {"ep": ep, "tp": tp, "rank": rank, "weights": {}})
    axis, world = reduce_axis(ep, tp)
    dp = ctx.options.get("attention", "replicated") == "dp" and not graph.name.startswith("ragged")
    ops: list[Op] = []
    taken = graph.value_names()

    def fresh(base: str, ty) -> Value:
        v = Value(graph.fresh_name(base, taken), ty)
        taken.add(v.name)
        return v

    heads_tp = tp > 1 and ctx.options.get("attention", "replicated") != "dp"
    if heads_tp:  # this rank's heads: the traced shapes are its slices (rank_heads)
        groups = int(ctx.options.get("o_groups") or tp)
        for value in params:
            dim = next((d for suffix, d in ATTENTION_SLICES.items() if value.name.endswith(suffix)), None)
            if dim is not None and isinstance(value.type, TensorType):
                records["weights"][value.name] = _head_slices(value.name, value.type.shape, dim, t_index, tp, groups)
    for op in graph.ops:
        if heads_tp and op.name == "aten.linear.default" and len(op.args) > 1 \
                and op.args[1].name.endswith(ATTENTION_OUTPUT):  # this rank's heads' share of the output
            part = fresh(f"{op.results[0].name}_part", op.results[0].type)
            ops.append(op.replace(results=(part,)))
            ops.append(Op(ALL_REDUCE, (part,), {"axis": "tp", "world": tp}, op.results, loc=op.loc))
            continue
        if op.name not in SHARDED_OPS:
            ops.append(op.map_operands(lambda v: sliced.get(v, v)))
            continue
        args = list(op.args)
        start = 0
        for pos in (4, 5, 6, 7, 8):
            w = args[pos]
            if w not in params or not isinstance(w.type, TensorType) \
                    or not all(isinstance(d, int) for d in w.type.shape):
                raise PassError(f"shard_experts @{graph.name}: {op.name} operand {pos} (%{w.name}) must be a param "
                                "with a static shape")
            slices = []
            if pos in SHARDED_OPS[op.name]:
                experts = w.type.shape[0]
                if experts % ep:
                    raise PassError(f"shard_experts: {experts} experts of %{w.name} do not split over {ep} ranks")
                start, stop = expert_slice(experts, ep, e_index)
                slices.append({"dim": 0, "start": start, "stop": stop, "of": experts})
            dim, chunks = INNER[pos]
            inner = w.type.shape[dim] // chunks
            if tp > 1:
                if inner % tp:
                    raise PassError(f"shard_experts: the intermediate size {inner} of %{w.name} does not split "
                                    f"over {tp} ranks")
                lo, hi = expert_slice(inner, tp, t_index)
                slices.append({"dim": dim, "start": lo, "stop": hi, "of": inner, **({"chunks": chunks}
                                                                                   if chunks > 1 else {})})
            if not slices:
                continue
            if w not in sliced:
                sliced[w] = Value(w.name, TensorType(w.type.dtype, slice_shape(w.type.shape, slices)))
                records["weights"][w.name] = slices
            args[pos] = sliced[w]
        kwargs = {**op.kwargs, "expert_offset": start, "shared": e_index == 0}
        if dp:  # every rank's rows in, the sums of this rank's rows out
            gather = {"axis": "world", "world": ep * tp, "dim": 0}
            x = args[0]
            x_all = fresh(f"{x.name}_all", get_op(ALL_GATHER).infer_types([x.type], gather)[0])
            ops.append(Op(ALL_GATHER, (x,), gather, (x_all,), loc=op.loc))
            ids_all = x_all
            if args[1] is not x:
                ids_all = fresh(f"{args[1].name}_all", get_op(ALL_GATHER).infer_types([args[1].type], gather)[0])
                ops.append(Op(ALL_GATHER, (args[1],), gather, (ids_all,), loc=op.loc))
            args[0], args[1] = x_all, ids_all
            partial_value = fresh(f"{op.results[0].name}_part", x_all.type)
            ops.append(op.replace(args=tuple(args), kwargs=kwargs, results=(partial_value,)))
            ops.append(Op(REDUCE_SCATTER, (partial_value,), gather, op.results, loc=op.loc))
            continue
        partial_value = fresh(f"{op.results[0].name}_part", op.results[0].type)
        ops.append(op.replace(args=tuple(args), kwargs=kwargs, results=(partial_value,)))
        ops.append(Op(ALL_REDUCE, (partial_value,), {"axis": axis, "world": world}, op.results, loc=op.loc))
    inputs = [GraphInput(i.kind, sliced.get(i.value, i.value)) for i in graph.inputs]
    outputs = [(n, sliced.get(v, v)) for n, v in graph.outputs]
    return graph.copy(ops=ops, inputs=inputs, outputs=outputs)


def _head_slices(name: str, shape: tuple[int, ...], dim: int, t: int, tp: int, groups: int) -> list[dict]:
    """Rank t's slices of an attention weight (``ATTENTION_SLICES``), its traced ``shape`` being the
    slice. With at least as many output groups as ranks a rank holds whole groups; with fewer
    (``tp`` a multiple of ``groups``), ``tp / groups`` ranks share a group: each holds its heads'
    columns of that group's rows of the grouped output projection, and that group's columns of the
    output projection (the ranks' partial products still add up, the projections being linear)."""
    if tp <= groups or not name.endswith((".o_a_proj.weight", ".o_b_proj.weight")):
        size = shape[dim]
        return [{"dim": dim, "start": t * size, "stop": (t + 1) * size, "of": size * tp}]
    per_group = tp // groups
    g, sub = divmod(t, per_group)
    if name.endswith(".o_b_proj.weight"):
        cols = shape[1]
        return [{"dim": 1, "start": g * cols, "stop": (g + 1) * cols, "of": cols * groups}]
    rows, cols = shape
    return [{"dim": 0, "start": g * rows, "stop": (g + 1) * rows, "of": rows * groups},
            {"dim": 1, "start": sub * cols, "stop": (sub + 1) * cols, "of": cols * per_group}]


def shard_weights(weights: dict, shard: dict) -> dict:
    """``weights`` (name -> tensor, the whole model's) as rank ``shard['rank']`` holds them."""
    out = dict(weights)
    for name, slices in shard.get("weights", {}).items():
        out[name] = slice_tensor(weights[name], slices, name)
    return out
