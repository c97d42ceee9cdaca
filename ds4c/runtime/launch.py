"""``ds4c run ART --ranks N`` / ``--gpus N``: start one worker process per rank on this machine.

The workers are started by torchrun's agent (``torch.distributed.run --standalone``: a free
rendezvous port, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set, every worker stopped when one
fails) running the same ``ds4c run`` command without ``--ranks`` / ``--gpus``; ``ds4c.load`` in
each joins the mesh (ds4c.distributed.runtime). NVLink multicast is off in their environment.
Several machines: run ``torchrun --nnodes M --node-rank i --rdzv-endpoint HOST:PORT
--nproc-per-node N -m ds4c run ART ...`` on each (the artifact's mesh must have M x N ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ds4c.distributed.runtime import MULTICAST_OFF
from ds4c.errors import InputError

__all__ = ["launch_workers", "worker_argv"]


def worker_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` (a ``ds4c run`` command line) without ``--ranks`` / ``--gpus`` and their values."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--ranks", "--gpus"):
            skip = True
            continue
        if arg.startswith(("--ranks=", "--gpus=")):
            continue
        out.append(arg)
    return out


def launch_workers(artifact: Path, *, ranks: int | None, gpus: int | None, device: str,
                   argv: Sequence[str]) -> int:
    """Run ``argv``'s ``ds4c run`` as one process per rank; their exit status (0: all succeeded)."""
    from ds4c.artifact.container import open_container

    if ranks is not None and gpus is not None:
        raise InputError("give --ranks N (processes on the CPU) or --gpus N (one process per GPU), not both")
    n = ranks if ranks is not None else gpus
    if n is None or n < 1:
        raise InputError(f"--ranks / --gpus must be 1 or more, got {n}")
    with open_container(artifact) as container:
        mesh = container.manifest.get("mesh")
    if not mesh:
        raise InputError(f"{artifact} is not sharded (compiled without --mesh / --gpus): run it without --ranks / "
                         "--gpus, or recompile it with --gpus N")
    if mesh["world"] != n:
        raise InputError(f"{artifact} is sharded over {mesh['world']} ranks; give --ranks {mesh['world']} "
                         f"(or recompile with --gpus {n})")
    args = worker_argv(argv)
    if gpus is not None:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < n:
            raise InputError(f"--gpus {n}: this machine has {have} GPUs visible")
        if device == "cpu":
            args += ["--device", "cuda"]
    elif device != "cpu":
        raise InputError("--ranks runs CPU processes (gloo); use --gpus N to run on GPUs")
    env = {**os.environ, **MULTICAST_OFF, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--max-restarts=0", "-m", "ds4c", *args]
    return subprocess.call(cmd, env=env)
