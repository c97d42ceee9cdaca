"""The physical limit of a decode step: the bytes it must read from HBM over the HBM bandwidth.

A DeepSeek-V4 decode step of ``batch`` sequences reads every non-expert weight once, the routed
experts the batch can pick (the expected number of distinct experts among ``batch`` x top-k
uniform picks), one embedding row per sequence, and each sequence's attention state: its sliding
window, CSA's top-k selected entries and every indexer key, HCA's entries. ``ds4c bench serve``
and the benchmarks state their figures against it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["decode_bytes", "decode_state_bytes"]


def decode_bytes(params: Mapping[str, torch.Tensor], cfg: Mapping, batch: int, state_bytes: float) -> float:
    """Bytes one decode step of ``batch`` sequences must read: the weights it uses (``params``, as
    stored: packed formats count their packed bytes) plus ``state_bytes`` of attention state."""
    e, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    picked = e * (1 - (1 - k / e) ** batch)
    total = 0.0
    for name, t in params.items():
        nbytes = t.numel() * t.element_size()
        if "experts." in name and "shared" not in name:
            total += nbytes * picked / e
        elif name.endswith("embed_tokens.weight"):
            total += nbytes * batch / t.shape[0]
        else:
            total += nbytes
    return total + state_bytes


def decode_state_bytes(cfg: Mapping, context: float, itemsize: int = 2) -> float:
    """Attention-state bytes one sequence at ``context`` positions reads in a decode step (entries of
    ``itemsize`` bytes): per layer its window of keys, and for CSA the top-k selected entries plus
    the indexer keys of every entry, for HCA every entry."""
    d, w = cfg["head_dim"], cfg["sliding_window"]
    rates = cfg.get("compress_rates", {})
    total = 0.0
    for kind in cfg["layer_types"]:
        rows = min(w, context) * d
        if kind == "compressed_sparse_attention":
            entries = context // rates.get(kind, 4)
            rows += min(cfg["index_topk"], entries) * d + entries * cfg["index_head_dim"]
        elif kind == "heavily_compressed_attention":
            rows += context // rates.get(kind, 128) * d
        total += rows * itemsize
    return total
