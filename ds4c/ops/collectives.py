"""Collectives as IR ops, for programs sharded over a device mesh (#30): all-reduce, all-gather,
reduce-scatter and all-to-all over one mesh axis.

    %y = dist.all_reduce(%x, axis="tp", world=2) : f32[B,S,4096]
    %y = dist.all_gather(%x, axis="tp", world=2, dim=2) : f32[B,S,4096]       (x: f32[B,S,2048])
    %y = dist.reduce_scatter(%x, axis="tp", world=2, dim=2) : f32[B,S,2048]   (x: f32[B,S,4096])
    %y = dist.all_to_all(%x, axis="ep", world=2) : f32[T,4096]                (T divisible by world)

``axis`` names a mesh axis (``world``, ``tp``, ``ep``, ...) and ``world`` its size, so types are
static and a program says which ranks talk. The references run ``torch.distributed``'s functional
collectives on the process group bound to the axis (``bind_mesh``; NCCL on GPUs, gloo on CPUs), so
the reference backend runs a sharded program on CPU processes exactly as the kernels backend does
on GPUs. Reductions sum. ``all_to_all`` splits dimension 0 in ``world`` equal parts, part r going
to rank r (the MoE dispatch / combine with capacity-padded buffers). A collective on an axis with no
bound group and ``world`` 1 is the identity; with ``world`` > 1 it is an error naming the axis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from ds4c.errors import Ds4cError, RankFailure, VerificationError
from ds4c.ir.registry import OpDef, Operand, register_op
from ds4c.ir.shapes import dim_expr, floordiv_dim, format_dim
from ds4c.ir.types import TensorType

__all__ = ["ALL_GATHER", "ALL_REDUCE", "ALL_TO_ALL", "COLLECTIVES", "REDUCE_SCATTER", "RankFailure", "bind_mesh",
           "mesh_group", "use_mesh"]

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL = ("dist.all_reduce", "dist.all_gather", "dist.reduce_scatter",
                                                      "dist.all_to_all")
COLLECTIVES = (ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL)

_groups: dict[str, Any] = {}


@contextmanager
def bind_mesh(groups: Mapping[str, Any]) -> Iterator[None]:
    """Run collectives on these process groups (mesh axis name -> ``torch.distributed`` group)."""
    saved = dict(_groups)
    _groups.update(groups)
    try:
        yield
    finally:
        _groups.clear()
        _groups.update(saved)


def use_mesh(groups: Mapping[str, Any]) -> None:
    """Bind these groups for the rest of the process (what a rank of a loaded sharded artifact runs on)."""
    _groups.update(groups)


def _collective(axis: str, world: int, run: Any) -> torch.Tensor:
    """``run()``'s collective, a failure of which names this rank and the axis."""
    try:
        return _wait(run())
    except RuntimeError as e:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else "?"
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RankFailure(f"rank {rank}: a collective over mesh axis '{axis}' ({world} ranks) failed: {first[:300]}; "
                          "another rank has exited or stopped answering (see its log): this rank stops too") from None


def mesh_group(axis: str, world: int) -> Any:
    """The group bound to ``axis``; None for a one-rank axis with none bound (the identity)."""
    group = _groups.get(axis)
    if group is None:
        if world == 1:
            return None
        raise Ds4cError(f"collective over mesh axis '{axis}' of {world} ranks, but no process group is bound to it: "
                        "run the sharded program under ds4c's distributed runtime (torchrun ... -m ds4c run, or "
                        "ds4c.ops.collectives.bind_mesh)")
    size = torch.distributed.get_world_size(group)
    if size != world:
        raise Ds4cError(f"mesh axis '{axis}' is compiled for {world} ranks but its process group has {size}; "
                        f"launch {world} ranks on it or recompile for {size}")
    return group


def _funcol(name: str, old: str):
    import torch.distributed._functional_collectives as fc

    return getattr(fc, name, None) or getattr(fc, old)


def _wait(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed._functional_collectives as fc

    return fc.wait_tensor(t) if hasattr(fc, "wait_tensor") else t


def _along_dim(x: torch.Tensor, axis: str, world: int, dim: int, collective) -> torch.Tensor:
    """``collective(t, group)`` (which works along dimension 0) applied along ``dim`` of ``x``."""
    group = mesh_group(axis, world)
    if group is None:
        return x
    d = dim % x.dim()
    return _collective(axis, world, lambda: collective(x.movedim(d, 0).contiguous(), group)).movedim(0, d).contiguous()


class _Collective(OpDef):
    num_results = 1
    operands = (Operand("x"),)
    pure = False  # every rank must issue the same collectives in the same order: never removed or merged
    keys: frozenset[str] = frozenset({"axis", "world"})

    def verify(self, op: Any) -> None:
        super().verify(op)
        if len(op.args) != 1 or not isinstance(op.args[0].type, TensorType):
            raise VerificationError(f"{self.name} takes one tensor operand")
        if set(op.kwargs) != set(self.keys):
            raise VerificationError(f"{self.name} takes {', '.join(sorted(self.keys))}= (got "
                                    f"{', '.join(sorted(op.kwargs)) or 'none'})")
        world = op.kwargs["world"]
        if not isinstance(op.kwargs["axis"], str) or not isinstance(world, int) or world < 1:
            raise VerificationError(f"{self.name}: axis must be a mesh axis name and world an integer >= 1")
        self.infer_types([op.args[0].type], dict(op.kwargs))

    @staticmethod
    def _dim(x: TensorType, kwargs: Mapping[str, Any], name: str) -> int:
        dim = kwargs.get("dim", 0)
        if not isinstance(dim, int) or not -x.rank <= dim < x.rank:
            raise VerificationError(f"{name}: dim {dim} is outside a rank-{x.rank} tensor")
        return dim % x.rank


@register_op
class AllReduce(_Collective):
    name = ALL_REDUCE

    def reference(self, x: torch.Tensor, *, axis: str, world: int) -> torch.Tensor:
        group = mesh_group(axis, world)
        if group is None:
            return x
        return _collective(axis, world, lambda: _funcol("all_reduce", "all_reduce")(x.contiguous(), "sum", group))

    def infer_types(self, operand_types, kwargs):
        return [self.tensor_operand(operand_types, 0)]


@register_op
class AllGather(_Collective):
    name = ALL_GATHER
    keys = frozenset({"axis", "world", "dim"})

    def reference(self, x: torch.Tensor, *, axis: str, world: int, dim: int) -> torch.Tensor:
        return _along_dim(x, axis, world, dim, lambda t, g: _funcol("all_gather_single", "all_gather_tensor")(t, 0, g))

    def infer_types(self, operand_types, kwargs):
        x = self.tensor_operand(operand_types, 0)
        d = self._dim(x, kwargs, self.name)
        shape = list(x.shape)
        shape[d] = format_dim(dim_expr(shape[d]) * kwargs["world"])
        return [TensorType(x.dtype, tuple(shape))]


@register_op
class ReduceScatter(_Collective):
    name = REDUCE_SCATTER
    keys = frozenset({"axis", "world", "dim"})

    def reference(self, x: torch.Tensor, *, axis: str, world: int, dim: int) -> torch.Tensor:
        return _along_dim(x, axis, world, dim,
                          lambda t, g: _funcol("reduce_scatter_single", "reduce_scatter_tensor")(t, "sum", 0, g))

    def infer_types(self, operand_types, kwargs):
        x = self.tensor_operand(operand_types, 0)
        d = self._dim(x, kwargs, self.name)
        shape = list(x.shape)
        world = kwargs["world"]
        if isinstance(shape[d], int) and shape[d] % world:
            raise VerificationError(f"{self.name}: dimension {d} of {x} does not split into {world} equal parts")
        shape[d] = floordiv_dim(shape[d], world)
        return [TensorType(x.dtype, tuple(shape))]


@register_op
class AllToAll(_Collective):
    name = ALL_TO_ALL

    def reference(self, x: torch.Tensor, *, axis: str, world: int) -> torch.Tensor:
        group = mesh_group(axis, world)
        if group is None:
            return x
        if x.shape[0] % world:
            raise Ds4cError(f"{self.name}: {x.shape[0]} rows do not split into {world} equal parts")
        split = [x.shape[0] // world] * world
        return _collective(axis, world,
                           lambda: _funcol("all_to_all_single", "all_to_all_single")(x.contiguous(), split, split, group))

    def infer_types(self, operand_types, kwargs):
        x = self.tensor_operand(operand_types, 0, min_rank=1)
        if isinstance(x.shape[0], int) and x.shape[0] % kwargs["world"]:
            raise VerificationError(f"{self.name}: {x.shape[0]} rows do not split into {kwargs['world']} equal parts")
        return [x]
