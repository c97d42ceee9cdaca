"""The process groups a sharded artifact's ranks run on.

``join(mesh, device)`` is what ``ds4c.load`` does with a sharded artifact: inside a worker that
``torchrun`` (or ``ds4c run --ranks N``) started (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set)
it initialises the default process group once (NCCL on CUDA, gloo on CPU) with a timeout, makes
one group per mesh axis (every rank makes every group, in the same order, as torch.distributed
requires), and binds them to the axis names the program's collectives use
(ds4c.ops.collectives). A process that initialised torch.distributed itself keeps its group.

A rank that dies does not leave the others waiting forever: gloo fails their next collective at
once (the peer's connection closes) and NCCL's watchdog after ``timeout``; either way the
collective raises ``RankFailure``, naming this rank and the axis.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from ds4c.distributed.mesh import Mesh
from ds4c.errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT_S", "MULTICAST_OFF", "join", "leave"]

DEFAULT_TIMEOUT_S = 120.0
# NVLink multicast stays off in every worker (it can take a shared host's GPUs out of service)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_joined: dict[tuple[int, int], dict[str, Any]] = {}
_initialised_here = False  # join made the default process group (leave may destroy it)


def join(mesh: Mesh, device: torch.device, *, timeout_s: float | None = None,
         where: str = "artifact") -> tuple[int, torch.device]:
    """Join the process group of ``mesh``'s ranks, bind its axes' groups; return this rank and its
    device (``cuda``: the GPU of LOCAL_RANK)."""
    import torch.distributed as dist

    from ds4c.ops.collectives import use_mesh

    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(f"{where} is sharded over {mesh.world} ranks (mesh {mesh}): run it with "
                              f"`ds4c run {where} --ranks {mesh.world}` (CPU) or `--gpus {mesh.world}`, or under "
                              f"`torchrun --nproc-per-node {mesh.world} -m ds4c run {where}`")
        timeout = timeout_s or float(os.environ.get("DS4C_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                                **({"device_id": device} if device.type == "cuda" else {}))
        global _initialised_here
        _initialised_here = True
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != mesh.world:
        raise ConfigError(f"{where} is sharded over {mesh.world} ranks (mesh {mesh}), but {world} processes were "
                          f"started; start {mesh.world} (--nproc-per-node {mesh.world}) or recompile with "
                          f"--gpus {world}")
    key = (mesh.ep, mesh.tp)
    if key not in _joined:
        groups: dict[str, Any] = {"world": dist.group.WORLD}
        for axis in ("ep", "tp"):
            for ranks in mesh.groups(axis):
                group = dist.new_group(ranks) if len(ranks) > 1 else None  # every rank makes every group
                if rank in ranks and group is not None:
                    groups[axis] = group
        _joined[key] = groups
    use_mesh(_joined[key])
    return rank, device


def leave() -> None:
    """End this rank's part cleanly: wait until every rank is here (none is still inside a
    collective), then tear the process group down (the one ``join`` made; a process that made its
    own keeps it). Without it the ranks exited at their own pace and gloo's connections closed
    under a peer still reading them: now and then a rank aborted at exit (SIGABRT) after a run that
    had succeeded. A peer that is gone already makes the barrier fail: then only tear down."""
    import torch.distributed as dist

    global _initialised_here
    if not (_initialised_here and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except RuntimeError:
        pass
    dist.destroy_process_group()
    _joined.clear()
    _initialised_here = False
