"""Autotuning on the device: kernel configurations chosen by timing the whole decode step.

The target's facts give every kernel a configuration (``kernels.configs``); on the device itself
``tune`` measures alternatives. It times what the user runs, a whole decode step replayed as a
CUDA graph, not each kernel alone: a GEMV tile that wins in isolation can lose over the whole step
(measured: docs/PERFORMANCE.md), because neighbouring kernels share the SMs and the caches. The search is coordinate descent over the families of ``configs.TUNABLE`` (one field at
a time, the others at their best so far), a handful of step timings per candidate.

The result is a tuning file next to the artifact (``<artifact>.tune.json``, written atomically),
bound to the artifact's decode program (the sha256 of its IR member), the device name and the
Triton version; ``ds4c.load`` applies it when all three match (``model.tuning`` says what it did).
Tuned tiles are other Triton specialisations than the stored ahead-of-time binaries, so those
kernels compile once on the device (Triton caches them).

    ds4c tune model.ds4 --device cuda            # CLI
    ds4c.runtime.autotune.tune(model)      # Python, on a loaded CompiledModel
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import InputError

# A table holds the fields whose best value differed from the defaults of its day; when a default
# changes, the version changes too, so an older table is ignored (with that reason) rather than
# read against new defaults. /2: the one-row GEMV's L2 prefetch on by default; /3: the FP8 row
# kernels' K loop pipelined, MoE gate/up rows paired.
FORMAT = "ds4c-tuning/3"

# candidate values per (family, field); the first of each is the target's default
CANDIDATES: dict[str, dict[str, Sequence[Any]]] = {
    "gemv": {"block_n": (None, 32, 64, 128), "split": (None, 1, 2, 4, 8), "num_stages": (None, 3, 4, 5)},
    "row_gemv": {"block_n": (None, 16, 64), "programs_per_sm": (None, 2, 8), "num_warps": (None, 2, 8),
                 "pipeline": (None, 0, 2, 4), "row_sums": (None, 0, 1), "prefetch": (None, 0)},
    "moe_decode": {"act_in_registers": (None, 1), "block_n_up": (None, 16, 32, 64), "block_n_down": (None, 32, 64, 128),
                   "num_stages": (None, 3, 4, 5), "row_pipeline": (None, 0, 4), "row_sums": (None, 1),
                   "row_paired": (None, 0)},
    "topk": {"select": (None, 0, 2), "num_warps": (None, 4, 8, 16)},
}


def restrict(only: str | Sequence[str] | None,
             candidates: Mapping[str, Mapping[str, Sequence[Any]]] = CANDIDATES
             ) -> dict[str, dict[str, Sequence[Any]]]:
    """The candidates named by ``only`` ("family" or "family.field", comma-separated or a list):
    a search that fits the time one has on a device. None: all of them."""
    if only is None:
        return {f: dict(v) for f, v in candidates.items()}
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    out: dict[str, dict[str, Sequence[Any]]] = {}
    for name in names:
        family, _, field = name.partition(".")
        if family not in candidates or (field and field not in candidates[family]):
            known = ", ".join(f"{f}.{k}" for f, v in candidates.items() for k in v)
            raise InputError(f"ds4c tune --only: no tunable '{name}'; tunables: {known} (or a family alone)")
        fields = {field: candidates[family][field]} if field else dict(candidates[family])
        out.setdefault(family, {}).update(fields)
    return out


def tuning_path(artifact: str | os.PathLike) -> Path:
    return Path(os.fspath(artifact) + ".tune.json")


def program_key(manifest: Mapping[str, Any]) -> str:
    """What a tuning file is bound to: the artifact's decode IR (sha256) and target."""
    members = manifest.get("members") or {}
    ir = (members.get("ir/decode.ds4ir") or {}).get("sha256", "")
    return f"{manifest['target']['name']}:{ir}"


def device_key(device: torch.device) -> dict[str, str]:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "triton": triton.__version__}


def step_timer(model: Any, batch: int = 1, position: int | None = None, reps: int = 20) -> Callable[[], float]:
    """Seconds per decode step of ``model`` (median of ``reps`` CUDA-graph replays, the graph
    captured anew so the model's current configurations apply)."""
    dev = model.device
    pos = min(position if position is not None else model.max_context // 2, model.max_context - 1)

    def measure() -> float:
        state = model.new_state(batch)
        ids = torch.zeros(batch, 1, dtype=torch.int64, device=dev)
        model._graphed.clear()
        model._decode(ids, pos, state)  # compiles new specialisations, captures
        times = []
        for _ in range(reps):
            torch.cuda.synchronize(dev)
            t = time.perf_counter()
            model._decode(ids, pos, state)
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]
    return measure


def search(measure: Callable[[dict[str, dict[str, Any]]], float],
           candidates: Mapping[str, Mapping[str, Sequence[Any]]] = CANDIDATES,
           log: Callable[[str], None] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Coordinate descent: ``measure(table)`` gives the step time under a tuning table. Returns
    (best table, report with the baseline, the best time and every trial)."""
    best: dict[str, dict[str, Any]] = {}
    base = best_time = measure(best)
    trials = [{"table": {}, "seconds": base}]
    for family, fields in candidates.items():
        for field, values in fields.items():
            for value in values:
                if value is None or best.get(family, {}).get(field) == value:
                    continue
                table = {f: dict(v) for f, v in best.items()}
                table.setdefault(family, {})[field] = value
                try:
                    t = measure(table)
                except Exception as e:  # a candidate Triton cannot build here (resources): skip it
                    trials.append({"table": table, "error": f"{type(e).__name__}: {e}"[:300]})
                    if log:
                        log(f"{family}.{field}={value}: failed ({type(e).__name__})")
                    continue
                trials.append({"table": table, "seconds": t})
                if log:
                    log(f"{family}.{field}={value}: {t * 1e3:.3f} ms (best {best_time * 1e3:.3f} ms)")
                if t < best_time:
                    best, best_time = table, t
    return best, {"baseline_s": base, "best_s": best_time, "trials": trials}


def tune(model: Any, *, artifact: str | os.PathLike | None = None, batch: int = 1,
         measure: Callable[[dict[str, dict[str, Any]]], float] | None = None,
         candidates: Mapping[str, Mapping[str, Sequence[Any]]] = CANDIDATES,
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Tune ``model``'s kernel configurations on its device and apply the best table to it;
    with ``artifact``, also write the tuning file beside it. ``measure`` replaces the CUDA-graph
    step timer (tests)."""
    if model.backend not in ("kernels", "compiled"):
        raise InputError(f"autotuning needs a kernel backend ('kernels' or 'compiled'), this model runs '{model.backend}'")
    loaded, model.tuning = model.tuning, None  # candidates are timed alone, not under a loaded table
    try:
        return _tune(model, artifact, batch, measure, candidates, log)
    except BaseException:
        model.tuning = loaded
        raise


def _tune(model: Any, artifact: str | os.PathLike | None, batch: int,
          measure: Callable[[dict[str, dict[str, Any]]], float] | None,
          candidates: Mapping[str, Mapping[str, Sequence[Any]]], log: Callable[[str], None] | None) -> dict[str, Any]:
    if measure is None:
        if model.device.type != "cuda" or not model.cuda_graphs:
            raise InputError("autotuning times CUDA-graph decode steps: load the artifact with device='cuda' "
                             "(and cuda_graphs=True)")
        timer = step_timer(model, batch)

        def measure(table: dict[str, dict[str, Any]]) -> float:
            model.tuning = table  # the launchers' kernel context with this table
            return timer()
    table, report = search(measure, candidates, log)
    result = {"format": FORMAT, "program": program_key(model.manifest), **device_key(model.device),
              "backend": model.backend, "batch": batch, "table": table, **report,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    model.tuning = table  # CUDA graphs captured under the candidates' tiles are dropped
    model.tuning_status = f"tuned here: {report['baseline_s'] * 1e3:.3f} -> {report['best_s'] * 1e3:.3f} ms per step"
    if artifact is not None:
        path = tuning_path(artifact)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)
    return result


def load_tuning(artifact: str | os.PathLike, manifest: Mapping[str, Any], device: torch.device,
                file: str | os.PathLike | None = None, backend: str | None = None
                ) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """(table, status) of the tuning file beside ``artifact`` (or ``file``): None with the reason
    when there is none or it was measured for another program, device or Triton."""
    path = Path(file) if file is not None else tuning_path(artifact)
    if not path.is_file():
        return None, "none: no tuning file (ds4c tune ARTIFACT on the device writes one)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"ignored: {path} is not readable JSON ({e}); rerun ds4c tune"
    if data.get("format") != FORMAT:
        return None, f"ignored: {path} has format {data.get('format')!r}, expected {FORMAT!r}"
    if data.get("program") != program_key(manifest):
        return None, f"ignored: {path} was measured for another program; rerun ds4c tune"
    here = device_key(device)
    if backend is not None and data.get("backend", backend) != backend:
        return None, f"ignored: {path} was measured with backend {data.get('backend')!r}, this model runs {backend!r}"
    for k, v in here.items():
        if data.get(k) != v:
            return None, f"ignored: {path} was measured with {k} {data.get(k)!r}, this is {v!r}"
    return data.get("table") or {}, f"applied: {path} ({data.get('baseline_s', 0) * 1e3:.3f} -> " \
                                    f"{data.get('best_s', 0) * 1e3:.3f} ms per step when measured)"
