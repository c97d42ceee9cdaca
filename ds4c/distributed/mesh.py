"""The device mesh a sharded program is compiled for: named axes, and which ranks form each group.

``ep`` splits every MoE layer's routed experts; ``tp`` splits, within each expert group, the
experts' intermediate dimension and attention's heads (ds4c.passes.shard_experts).

A mesh has an expert-parallel axis ``ep`` and a tensor-parallel axis ``tp``; rank ``r`` sits at
``ep = r // tp``, ``tp = r % tp`` (the ``tp`` ranks of one expert group are neighbours, so on a
machine tensor parallelism, which talks most, stays between adjacent GPUs). Collectives name an
axis (ds4c.ops.collectives): ``ep`` (the ranks that share a ``tp`` index), ``tp`` (the ranks that
share an ``ep`` index) or ``world`` (all ranks).

    Mesh.parse("ep=2,tp=2")   -> Mesh(ep=2, tp=2): 4 ranks; rank 3 is (ep 1, tp 1)
    Mesh.parse("ep=4,attention=dp") -> attention data-parallel: each rank its own rows of the batch
    Mesh.for_gpus(4, experts=256) -> Mesh(ep=4, tp=1)

``attention``: ``replicated`` (every rank runs attention for the whole batch and holds its state)
or ``dp`` (data-parallel attention: rank r runs attention, and holds the state, of rows
``r*B/W .. (r+1)*B/W - 1`` of a batch of B; the MoE layers gather every rank's tokens and scatter
the sums back, ds4c.passes.shard_experts). ``dp`` divides attention's weight reads and state by
the ranks for batches of W rows or more; ``replicated`` serves a single sequence as fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds4c.errors import ConfigError

__all__ = ["AXES", "Mesh"]

AXES = ("ep", "tp")
ATTENTION = ("replicated", "dp")


@dataclass(frozen=True)
class Mesh:
    ep: int = 1
    tp: int = 1
    attention: str = "replicated"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION:
            raise ConfigError(f"mesh attention={self.attention!r}: choose {' or '.join(ATTENTION)}")
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigError(f"mesh axis {axis}={size!r}: give a whole number of ranks, 1 or more")

    @property
    def world(self) -> int:
        return self.ep * self.tp

    def coords(self, rank: int) -> dict[str, int]:
        """Rank ``rank``'s index along each axis."""
        if not 0 <= rank < self.world:
            raise ConfigError(f"rank {rank} is outside the {self.world} ranks of mesh {self}")
        return {"ep": rank // self.tp, "tp": rank % self.tp}

    def groups(self, axis: str) -> list[list[int]]:
        """The rank groups of ``axis`` (``ep``, ``tp`` or ``world``), each in rank order."""
        if axis == "world":
            return [list(range(self.world))]
        if axis == "tp":
            return [[e * self.tp + t for t in range(self.tp)] for e in range(self.ep)]
        if axis == "ep":
            return [[e * self.tp + t for e in range(self.ep)] for t in range(self.tp)]
        raise ConfigError(f"mesh axis '{axis}' does not exist; the axes are {', '.join((*AXES, 'world'))}")

    def to_dict(self) -> dict[str, Any]:
        return {"axes": {"ep": self.ep, "tp": self.tp}, "world": self.world, "attention": self.attention}

    @classmethod
    def from_dict(cls, d: Any, where: str = "artifact") -> Mesh:
        axes = d.get("axes") if isinstance(d, dict) else None
        if not isinstance(axes, dict) or set(axes) - set(AXES):
            raise ConfigError(f"{where}: manifest field 'mesh' should name the axes {', '.join(AXES)}, got {d!r}; "
                              "recompile the artifact")
        mesh = cls(**axes, attention=d.get("attention", "replicated"))
        if d.get("world") != mesh.world:
            raise ConfigError(f"{where}: manifest field 'mesh.world' is {d.get('world')!r}, its axes make "
                              f"{mesh.world}; recompile the artifact")
        return mesh

    @classmethod
    def parse(cls, text: str) -> Mesh:
        """``"ep=2,tp=2"`` (axes not named are 1), optionally ``attention=dp``."""
        sizes: dict[str, int] = {}
        attention = "replicated"
        for part in (p.strip() for p in str(text).split(",") if p.strip()):
            name, eq, value = part.partition("=")
            name = name.strip()
            if name == "attention" and eq:
                attention = value.strip()
                continue
            if not eq or name not in AXES:
                raise ConfigError(f"--mesh '{text}': write axis=size pairs with the axes {', '.join(AXES)}, "
                                  "e.g. --mesh ep=4 or --mesh ep=2,tp=2")
            if name in sizes:
                raise ConfigError(f"--mesh '{text}' names {name} twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ConfigError(f"--mesh '{text}': {name}={value.strip()} is not a whole number of ranks") from None
        if not sizes:
            raise ConfigError("--mesh is empty; give e.g. --mesh ep=4")
        return cls(**sizes, attention=attention)

    @classmethod
    def for_gpus(cls, gpus: int, *, experts: int) -> Mesh:
        """The mesh ``--gpus N`` compiles for: expert parallelism over all N where the routed experts
        split evenly (they are >90% of a V4 model's bytes, and EP's per-layer all-reduce moves what
        TP's does); else over the largest divisor of N that divides them, and tensor parallelism over the rest."""
        if not isinstance(gpus, int) or gpus < 1:
            raise ConfigError(f"--gpus {gpus!r}: give the number of GPUs, 1 or more")
        ep = max(e for e in range(1, gpus + 1) if gpus % e == 0 and experts % e == 0)
        return cls(ep=ep, tp=gpus // ep)

    def __str__(self) -> str:
        return f"ep={self.ep},tp={self.tp}" + (",attention=dp" if self.attention == "dp" else "")
