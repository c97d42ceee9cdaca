"""The graphs the kernel backends run: the artifact's graphs after the load-time rewrites.

One function for the runtime (``ds4c.load``) and for ahead-of-time compilation
(``launches.record_launches``), so that the binaries an artifact stores are the launches the
loaded model makes. In order:

1. ``executor.unpack_weights_once``: packed weights read as stored by ``linear.packed`` /
   ``linear.grouped.packed`` / ``moe.packed`` (or expanded once);
2. ``fuse_norm_rope``: a query's / key's RMS norm and its rotary embedding as one launch
   (``DS4C_FUSE_NORM_ROPE=0``: apart);
3. ``merge_linears.merge_sibling_linears``: linears reading one activation as one GEMM / GEMV
   (``merge_linears=False``: apart; ``keep``: weights never merged, e.g. host-resident ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ds4c.ir.graph import Graph


@dataclass
class LoadRewrites:
    """What the rewrites did: expanded packed weights, norm+rope pairs fused, linears merged away."""

    unpacked_weights: list[str] = field(default_factory=list)
    fused_norm_rope: int = 0
    merged_linears: int = 0


def kernel_graphs(graphs: Mapping[str, Graph], weights: dict[str, torch.Tensor], *,
                  merge_linears: bool = True, keep: frozenset[str] | set[str] = frozenset(),
                  ) -> tuple[dict[str, Graph], dict[str, torch.Tensor], LoadRewrites]:
    """(graphs, weights, what was done) as the kernel backends run them (see the module docstring)."""
    from ds4c.backends.cuda.executor import unpack_weights_once
    from ds4c.backends.cuda.fuse_norm_rope import fuse_norm_rope, fuse_norm_rope_default

    done = LoadRewrites()
    out, weights, done.unpacked_weights = unpack_weights_once(graphs, weights)
    if fuse_norm_rope_default():
        out, done.fused_norm_rope = fuse_norm_rope(out)
    if merge_linears:
        from ds4c.backends.cuda.merge_linears import merge_sibling_linears

        out, weights, done.merged_linears = merge_sibling_linears(out, weights, keep=set(keep))
    return dict(out), weights, done
