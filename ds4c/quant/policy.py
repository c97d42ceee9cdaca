"""Precision policies: given each unit's measured errors, choose its storage format.

- ``auto``: the smallest weights whose total error (sum of per-unit NSRs, ds4c.quant.sensitivity)
  stays under a bound, choosing only formats the target runs natively or dequantises cheaply
  (``Format.support``); units a checkpoint ships in FP8/FP4 keep that format. On the reference
  target (cpu) nothing is packed: auto means fp32 there.
- ``bf16`` / ``fp32``: the compute dtype everywhere (FP8/FP4 checkpoints are dequantised).
- ``fp8``: every linear and expert group in FP8 (embedding and LM head in bf16, as DeepSeek ships).
- ``mxfp4-experts``: routed experts in MXFP4, other linears in FP8 (DeepSeek-V4's shipping layout).
- a table file (JSON object ``{"unit glob": "format", ...}``, first match wins; unmatched units keep
  the compute dtype).

Auto is greedy on bytes saved per unit of error added (a knapsack heuristic): every unit starts
in the compute dtype and repeatedly the move with the best ratio is taken while the total fits.
Formats within 5% of each other's bytes are not both kept: the one with lower error wins.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ds4c.errors import ConfigError
from ds4c.quant.activations import WEIGHT_FORMATS
from ds4c.quant.formats import FORMATS, get_format
from ds4c.quant.units import Unit

POLICIES = ("auto", "fp32", "bf16", "fp8", "mxfp4-experts")
AUTO_MENU = ("bf16", "int8", "fp8", "mxfp4")
# Sum of per-unit NSRs that auto may spend. Per unit, FP8 costs ~7e-4, INT8 ~6e-5, MXFP4 ~1.3e-2
# on Gaussian weights; 0.1 keeps greedy agreement with the fp32 oracle >= 97% on the small
# configs (tests/passes/test_precision.py) while putting every routed expert of V4 in MXFP4.
DEFAULT_ERROR_BOUND = 0.1
# auto's bound where each unit's effect on the output was measured: the sum of the chosen units'
# KL divergences of the next-token distributions, nats per token
DEFAULT_KL_BOUND = 0.02
SAME_SIZE = 1.05
ACTIVATION_FORMATS = {
    "fp8": "e4m3, one power-of-two scale per token and 128 channels, computed at run time (DeepSeek's act_quant)",
    "mxfp4": "e2m1, one power-of-two (UE8M0) scale per token and 32 channels, computed at run time "
             "(OCP MXFP4, as the weights)",
}


@dataclass
class Choice:
    """The decision for one unit, as the precision report shows it."""

    unit: str
    kind: str
    layer: int | None
    params: list[str]
    format: str
    bytes: int
    bf16_bytes: int
    error: float | None  # the chosen format's error (None: not measured): KL in nats or NSR, as ``measured`` says
    errors: dict[str, float]  # the error of every candidate measured
    measured: str  # output KL | activations | weight samples | estimated | not measured
    activations: str  # format the activations enter the GEMM in on this target
    why: str

    def to_dict(self) -> dict:
        return asdict(self)


def unit_bytes(unit: Unit, fmt: str) -> int:
    if fmt == "fp32":
        return unit.numel * 4
    return sum(get_format(fmt).nbytes(s) for s in unit.shapes)


# Activation formats ds4c executes, per unit kind: a linear whose weight is FP8 multiplies FP8
# activations on targets whose tensor cores take FP8, and one whose weight is MXFP4 multiplies
# MXFP4 activations where they take FP4 (sm_100a) (``quant.activation`` before it; the CUDA GEMV
# kernels quantise in registers). FP8 expert groups (routed and shared) multiply FP8 activations
# there too (``moe``'s ``act`` / ``shared_act``: x before gate/up, h before down, as DeepSeek's
# FP8 experts do). MXFP4 experts multiply FP8 activations where the tensor cores take FP4 (and
# so e4m3 x e2m1: sm_100a's kind::f8f6f4), as DeepSeek's FP4 experts do (FP8 activations by FP4
# weights; SGLang / FlashInfer run MXFP8 x MXFP4): on the trained ``mixed`` test model (b200,
# 512 positions vs the fp32 oracle) the KL of ``mxfp4-experts`` is 6.08e-3 with FP8 activations,
# 5.87e-3 weight-only and 1.12e-2 with FP4 activations (greedy agreement 100% in all three;
# 2026-12-03, CPU). Elsewhere (sm_90a: no FP4 tensor cores) MXFP4 experts stay weight-only.
# The report says what runs.
EXECUTED_ACTIVATION_FORMATS: Mapping[str, frozenset[str]] = {
    "linear": frozenset({"fp8", "mxfp4"}),
    "experts": frozenset({"fp8"}),
    "shared_experts": frozenset({"fp8"}),
}
# unit kind -> weight format -> the activation format its GEMM multiplies in, where not the
# weight's own (mixed-format tensor-core products; on targets with FP4 tensor cores)
MIXED_ACTIVATIONS: Mapping[str, Mapping[str, str]] = {"experts": {"mxfp4": "fp8"}, "shared_experts": {"mxfp4": "fp8"}}
ACTIVATION_BACKENDS = frozenset({"cuda"})  # sm_90a / sm_100a: OCP e4m3 (MI300's matrix cores take FNUZ)
# compile(activations=): "native" quantises activations where the above holds; "compute" never
# (weight-only quantisation everywhere).
ACTIVATION_MODES = ("native", "compute")


def activation_format(fmt: str, kind: str, target, compute: str, mode: str = "native") -> str:
    """The format a unit's activations enter its GEMM in when the artifact runs on ``target``: the
    weight's format (or its ``MIXED_ACTIVATIONS`` partner) where the target multiplies it
    natively, ds4c executes that and ``mode`` is ``native``; else ``compute``."""
    executed = EXECUTED_ACTIVATION_FORMATS.get(kind, frozenset())
    if mode != "native" or target.backend not in ACTIVATION_BACKENDS:
        return compute
    if fmt in WEIGHT_FORMATS["fp8"] and target.native_fp8 and "fp8" in executed:
        return "fp8"
    if fmt == "mxfp4" and target.native_fp4:
        act = MIXED_ACTIVATIONS.get(kind, {}).get(fmt, "mxfp4")
        return act if act in executed else compute
    return compute


def is_policy(precision: str) -> bool:
    return precision in POLICIES or Path(precision).suffix == ".json"


def load_table(path: str | Path) -> list[tuple[str, str]]:
    """A per-unit table file: JSON object of unit-name glob -> format name, in priority order."""
    p = Path(path)
    try:
        table = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"precision table {p}: cannot read it ({e}); write a JSON object such as "
                          '{"model.layers.*.mlp.experts": "mxfp4", "*": "fp8"}') from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ConfigError(f"precision table {p}: must be a JSON object of unit glob -> format name")
    for pattern, fmt in table.items():
        if fmt not in FORMATS and fmt != "fp32":
            raise ConfigError(f"precision table {p}: '{pattern}' asks for unknown format '{fmt}'; "
                              f"known: {', '.join(FORMATS)}")
    return list(table.items())


def check_table(path: str | Path, weights: Mapping[str, tuple[Sequence[int], Any]]) -> list[tuple[str, str]]:
    """``load_table`` plus a check that every glob can match a unit of the model whose weights
    (name -> (shape, dtype)) are ``weights``, before the model is traced.

    Units are found in the traced graph, but a unit is named after its weight (``.weight``
    dropped) or, for a group of weights (the experts), after the module holding them; only
    matrices are units. A glob matching none of those names matches no unit, and would silently
    leave the units it meant in the compute dtype.
    """
    table = load_table(path)
    matrices = [name for name, (shape, _) in weights.items() if len(shape) >= 2]
    names = {n.removesuffix(".weight") for n in matrices} | {n.rsplit(".", 1)[0] for n in matrices}
    for pattern, _ in table:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            examples = [n.removesuffix(".weight") for n in matrices if n.endswith("_proj.weight")][:3]
            raise ConfigError(f"precision table {path}: '{pattern}' matches no unit of this model; unit names look "
                              f"like {', '.join(examples or sorted(names)[:3])} (`ds4c inspect` of an artifact "
                              "lists them all)")
    return table


def _fixed(unit: Unit, policy: str, compute: str, table: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """(format, why) under a fixed policy."""
    if policy in ("fp32", "bf16"):
        return compute, f"policy {policy}"
    if table:
        for pattern, fmt in table:
            if fnmatch.fnmatchcase(unit.name, pattern):
                return fmt, f"table: '{pattern}'"
        return compute, "table: no pattern matches"
    if unit.kind == "embedding" or unit.name == "lm_head":
        return compute, f"policy {policy}: embedding and LM head stay in {compute}, as DeepSeek ships them"
    if policy == "mxfp4-experts" and unit.kind == "experts":
        return "mxfp4", "policy mxfp4-experts"
    return "fp8", f"policy {policy}"


def choose(units: Sequence[Unit], errors: Mapping[str, Mapping[str, float]], policy: str, target, compute: str,
           *, arrival: Mapping[str, str] | None = None, bound: float = DEFAULT_ERROR_BOUND,
           measured: str = "activations", activations: str = "native") -> list[Choice]:
    """One Choice per unit under ``policy`` (a policy name or a table file path)."""
    arrival = arrival or {}
    table = load_table(policy) if policy not in POLICIES else []
    picks: dict[str, tuple[str, str]] = {}
    if policy == "auto" and target.backend != "reference":
        picks = _auto(units, errors, target, compute, arrival, bound)
    else:
        for u in units:
            if policy == "auto":
                picks[u.name] = (compute, f"auto on {target.name}: no packed format runs there; "
                                          f"the reference backend computes in {compute}")
            else:
                picks[u.name] = _fixed(u, policy, compute, table)
    out = []
    for u in units:
        fmt, why = picks[u.name]
        if fmt != "fp32" and not all(get_format(fmt).holds(s) for s in u.shapes):
            raise ConfigError(f"{u.name}: format {fmt} cannot hold weights of shape {list(u.shapes)}; "
                              "choose another format for this unit in the precision table")
        errs = dict(errors.get(u.name, {}))
        out.append(Choice(u.name, u.kind, u.layer, list(u.params), fmt, unit_bytes(u, fmt), unit_bytes(u, "bf16"),
                          errs.get(fmt, 0.0 if fmt == compute else None), errs, measured if errs else "not measured",
                          activation_format(fmt, u.kind, target, compute, activations), why))
    return out


def _auto(units, errors, target, compute, arrival, bound) -> dict[str, tuple[str, str]]:
    allowed = [f for f in AUTO_MENU if get_format(f).support(target) is not None]
    picks: dict[str, tuple[str, str]] = {}
    chains: dict[str, list[tuple[str, int, float]]] = {}
    for u in units:
        shipped = {arrival.get(p) for p in u.params} - {None}
        if len(shipped) == 1:
            fmt = shipped.pop()
            picks[u.name] = (fmt, f"the checkpoint ships it in {fmt}")
            continue
        errs = errors.get(u.name, {})
        opts = [(f, unit_bytes(u, f), errs[f]) for f in allowed if f in errs]
        if not opts:
            picks[u.name] = (compute, "not measured: kept in the compute dtype")
            continue
        kept = [o for o in opts if not any(p is not o and p[1] <= o[1] * SAME_SIZE and
                                           (p[2] < o[2] or (p[2] == o[2] and p[1] < o[1])) for p in opts)]
        chains[u.name] = sorted(kept, key=lambda o: -o[1])
    level = {name: 0 for name in chains}
    total = sum(chain[0][2] for chain in chains.values())
    blocked: dict[str, str] = {}
    while True:
        best, best_ratio = None, -1.0
        for name, chain in chains.items():
            i = level[name]
            if name in blocked or i + 1 >= len(chain):
                continue
            saved, added = chain[i][1] - chain[i + 1][1], chain[i + 1][2] - chain[i][2]
            ratio = saved / max(added, 1e-12)
            if ratio > best_ratio:
                best, best_ratio = name, ratio
        if best is None:
            break
        i = level[best]
        added = chains[best][i + 1][2] - chains[best][i][2]
        if total + added > bound:
            blocked[best] = (f"{chains[best][i + 1][0]} would add {added:.2g} to the total error "
                             f"({total:.2g} of the bound {bound:.2g})")
            continue
        level[best] = i + 1
        total += added
    for name, chain in chains.items():
        fmt = chain[level[name]][0]
        menu = "/".join(o[0] for o in chain)
        if name in blocked:
            picks[name] = (fmt, f"auto: {blocked[name]}")
        else:
            picks[name] = (fmt, f"auto: smallest of {menu} on {target.name}; total error {total:.2g} "
                                f"<= bound {bound:.2g}")
    return picks
