"""Weights for assign_precision from a model source, without materialising what does not fit.

``calibration_for`` gives every weight (loaded once; the compiler embeds the same tensors) when
the model is small, otherwise samples: for presets a slice generated from the tensor's own seed
stream and scale, for checkpoints a tensor read alone when it is small enough. It also says in
which format a checkpoint ships each tensor (FP8 / MXFP4), so auto can keep it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ds4c.frontend.source import ModelSource, WeightSpec
from ds4c.quant.calibration import Calibration

SAMPLE_READ_LIMIT = 1 << 26  # elements: a checkpoint tensor larger than this is not read to sample it


def calibration_for(source: ModelSource, spec: WeightSpec, dtype: torch.dtype, *, materialise: bool,
                    tokens: torch.Tensor | None = None) -> Calibration:
    def load_all() -> dict[str, torch.Tensor]:
        return source.load_weights(spec, dtype=dtype)

    def sample(name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        full, want = spec[name]
        if source.kind == "preset":
            from ds4c.models.deepseek_v4.presets import preset_weight

            return preset_weight(name, tuple(shape), dtype, source.seed or 0)
        n = 1
        for d in full:
            n *= int(d)
        if n > SAMPLE_READ_LIMIT:
            return None
        if source.kind == "checkpoint" and source.path is not None:  # this tensor alone
            from ds4c.frontend.checkpoint import load_checkpoint

            t = load_checkpoint(source.path, {name: (full, want)}, dtype=dtype, partial=True,
                                allow_nonfinite=source.allow_nonfinite)[name]
        else:
            t = source.load_weights({name: (full, want)}, dtype=dtype)[name]
        return t[tuple(slice(0, s) for s in shape)]

    arrival = shipped_formats(source.path, spec) if source.kind == "checkpoint" and source.path else {}
    return Calibration(load_all=load_all if materialise else None, sample=sample, tokens=tokens, arrival=arrival,
                       iid_by_role=source.kind == "preset")


def shipped_formats(directory: Path, spec: WeightSpec) -> dict[str, str]:
    """transformers name -> ``fp8`` / ``fp8-f32scale`` / ``mxfp4`` for tensors the checkpoint stores quantised."""
    from ds4c.frontend.checkpoint import _planned, shipped_format  # the loader's own reading of the headers

    with _planned(directory, spec) as (files, plan):
        out: dict[str, str] = {}
        for name, src in plan.plain.items():
            if shipped_format(files, src):
                out[name] = shipped_format(files, src)
        for name, parts in plan.experts.items():
            kinds = {shipped_format(files, s) for s in parts.values()}
            if len(kinds) == 1 and None not in kinds:
                out[name] = kinds.pop()
        return out
