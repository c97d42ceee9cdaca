"""Where a model comes from: a preset, a checkpoint directory, an ONNX file, or a transformers module.

A ``ModelSource`` knows the model config and how to produce the weights, but never produces them
unless asked: compiling ``flash`` or ``pro`` must not materialise their weights. ``describe()`` is
the reference an artifact's manifest stores; ``reference()`` adds, for weights left in a checkpoint
or ONNX file, the size and sha256 of every file the load reads (``ds4c.frontend.file_record``),
so that ``load_weights`` refuses a changed file and can be re-pointed (``weights_from``) where it moved.

Weights are refused when they hold NaN or Inf (checkpoints while they are read, modules and
ONNX initializers once loaded) unless the source allows them (``allow_nonfinite``, recorded in
the reference, so the artifact loads as it compiled).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import CheckpointError, ConfigError

WeightSpec = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
DEFAULT_PRESET_SEED = 0


@dataclass
class ModelSource:
    kind: str  # "preset" | "checkpoint" | "module" | "onnx"
    name: str
    config: dict[str, Any]
    path: Path | None = None
    seed: int | None = None
    module_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    allow_nonfinite: bool = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.path is not None:
            out["path"] = str(self.path)
        if self.seed is not None:
            out["seed"] = self.seed
        if self.allow_nonfinite:
            out["allow_nonfinite"] = True
        return out

    def reference(self, expected: WeightSpec) -> dict[str, Any]:
        """``describe()`` plus, for a checkpoint or ONNX file, ``files``: name -> size and sha256
        of every file loading ``expected`` reads (hashed here: one read of the checkpoint)."""
        from ds4c.frontend.file_record import record_files

        out = self.describe()
        if self.kind == "checkpoint" and self.path is not None:
            from ds4c.frontend.checkpoint import checkpoint_files

            out["files"] = record_files(self.path, checkpoint_files(self.path, expected))
        elif self.kind == "onnx" and self.path is not None:
            out["files"] = record_files(self.path.parent, [self.path])
        return out

    def provided_spec(self, spec: WeightSpec, assignment: Mapping[str, str], keep: Any = ()
                      ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What ``load_weights`` is asked for: ``spec``, except that weights a checkpoint stores in
        their assigned format (``assignment``: name -> format) come as their packed tensors, the
        checkpoint's bytes (ds4c.frontend.checkpoint.packable); those in ``keep`` come unpacked too."""
        from ds4c.quant.packing import provided_spec

        if self.kind != "checkpoint" or self.path is None or not assignment:
            return dict(spec)
        from ds4c.frontend.checkpoint import packable

        return provided_spec(spec, packable(self.path, spec, assignment), keep)

    def load_weights(self, expected: WeightSpec, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
        """Materialise the weights named in ``expected`` in HF naming, as ``dtype`` (integer tensors keep theirs)."""
        return load_weights(self.describe(), expected, dtype=dtype, device=device, progress=progress,
                            module_state=self.module_state)


def load_weights(ref: Mapping[str, Any], expected: WeightSpec, *, dtype: torch.dtype,
                 device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                 module_state: Mapping[str, torch.Tensor] | None = None, weights_from: str | Path | None = None,
                 artifact: str | None = None, shard: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Weights from a source reference (as stored in an artifact manifest).

    A checkpoint or ONNX reference with a ``files`` record is checked against it before any data
    is read. ``weights_from``: where a referenced checkpoint directory (or ONNX file, or the
    folder holding it) is now; ``artifact`` names the artifact in messages. ``shard``: name -> slices
    (a rank of a sharded artifact): ``expected`` gives those tensors' slice shapes; each is read
    whole and cut to the rank's slice (a checkpoint's experts stored one per tensor: the rank's
    alone). A preset's are drawn by the runtime's streamed load (``init_preset_weights(shard=)``)."""
    if shard:
        from ds4c.distributed.shards import slice_tensor, whole_spec

        whole = whole_spec(expected, shard)
        if ref["kind"] == "checkpoint":  # routed experts stored one per tensor: only the rank's are read
            from ds4c.frontend.checkpoint import load_checkpoint

            origin = f"the artifact {artifact}" if artifact else "the artifact"
            path = _referenced(ref, weights_from, origin, artifact, want_dir=True)
            return load_checkpoint(path, whole, dtype=dtype, device=device, progress=progress,
                                   allow_nonfinite=bool(ref.get("allow_nonfinite", False)),
                                   record=_record(ref, origin, artifact), shard=shard)
        out = load_weights(ref, whole, dtype=dtype, device=device, progress=progress, module_state=module_state,
                           weights_from=weights_from, artifact=artifact)
        return {k: slice_tensor(t, shard[k], k).clone() if k in shard else t for k, t in out.items()}
    kind = ref["kind"]
    allow_nonfinite = bool(ref.get("allow_nonfinite", False))
    origin = f"the artifact {artifact}" if artifact else "the artifact"
    if weights_from is not None and kind not in ("checkpoint", "onnx"):
        raise ConfigError(f"--weights-from {weights_from}: {origin} takes its weights from a {kind} "
                          f"('{ref.get('name')}'), not from a checkpoint; drop --weights-from")

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    if kind == "preset":
        from ds4c.models.deepseek_v4.presets import init_preset_weights

        out: dict[str, torch.Tensor] = {}
        total = len(expected)
        for i, (name, t) in enumerate(init_preset_weights(expected, ref["seed"], device, dtype)):
            out[name] = t
            if progress:
                progress(i + 1, total)
        return out
    if kind == "checkpoint":
        from ds4c.frontend.checkpoint import load_checkpoint

        path = _referenced(ref, weights_from, origin, artifact, want_dir=True)
        return load_checkpoint(path, expected, dtype=dtype, device=device, progress=progress,
                               allow_nonfinite=allow_nonfinite, record=_record(ref, origin, artifact))
    if kind == "onnx":  # the file's dtypes are the graph's: no cast
        from ds4c.frontend.onnx_import import load_onnx_weights

        path = _referenced(ref, weights_from, origin, artifact, want_dir=False)
        record = _record(ref, origin, artifact)
        if record is not None:
            record.before_reading(path.parent)
            record.files_read(path.parent, [path])
        out = load_onnx_weights(path, expected, device=device)
        if not allow_nonfinite:
            _check_finite(out, str(path))
        return out
    if kind == "module":
        if module_state is None:
            raise ConfigError("weights come from a transformers module that is not available here; "
                              "save the artifact with embedded weights")
        out = {}
        for i, name in enumerate(expected):
            out[name] = cast(module_state[name].detach())
            if progress:
                progress(i + 1, len(expected))
        if not allow_nonfinite:
            _check_finite(out, f"the {ref.get('name', 'module')}'s state_dict")
        return out
    raise ConfigError(f"unknown weight source kind '{kind}'")


def _referenced(ref: Mapping[str, Any], weights_from: str | Path | None, origin: str, artifact: str | None,
                *, want_dir: bool) -> Path:
    """The checkpoint directory (``want_dir``) or ONNX file a reference points at, re-pointed by
    ``weights_from``; an error that says what the artifact references, and how to re-point it."""
    recorded = Path(str(ref.get("path") or ref.get("name")))
    what = "checkpoint directory" if want_dir else "ONNX file"
    if weights_from is None:
        path = recorded
        ok = path.is_dir() if want_dir else path.is_file()
        if artifact is not None and not ok:  # loading an artifact: say it references it, and the fix
            raise CheckpointError(f"{path}: not found; {origin} references this {what} for its weights (compiled "
                                  "with weights by reference): pass its new location with --weights-from "
                                  f"{'DIR' if want_dir else 'FILE'} (ds4c.load(..., weights_from=...)), or "
                                  "recompile with --weights embed")
        return path
    path = Path(weights_from).expanduser()
    if not want_dir and path.is_dir():
        path = path / recorded.name
    ok = path.is_dir() if want_dir else path.is_file()
    if not ok:
        raise CheckpointError(f"--weights-from {weights_from}: no {what} there ({origin} was compiled against "
                              f"{recorded}); pass the {what} holding its weights")
    return path


def _record(ref: Mapping[str, Any], origin: str, artifact: str | None) -> Any:
    from ds4c.frontend.file_record import RecordCheck

    if "files" in ref:
        recorded = Path(str(ref.get("path") or ref.get("name")))
        base = recorded if ref["kind"] == "checkpoint" else recorded.parent
        return RecordCheck(ref["files"], origin, str(base))
    if artifact is not None:
        warnings.warn(f"{artifact}: references {ref.get('path')} without a record of its files (compiled by an "
                      "older ds4c), so a changed checkpoint cannot be detected; recompile it to record them",
                      stacklevel=4)
    return None


def _check_finite(weights: Mapping[str, torch.Tensor], where: str) -> None:
    for name, t in weights.items():
        # one-byte floats (FP8 values of packed weights) have no isfinite kernel: widen them first
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all()):
            raise ConfigError(f"{where}: weight '{name}' holds NaN/Inf values; they would make every logit NaN: "
                              "fix the weights, or pass --allow-nonfinite-weights (ds4c.compile(..., "
                              "allow_nonfinite=True)) if they are meant")


def resolve_model(model: Any, *, seed: int | None = None, allow_nonfinite: bool = False) -> ModelSource:
    """Accept a preset name, a checkpoint directory, an ONNX file, or a transformers DeepseekV4ForCausalLM."""
    import dataclasses

    return dataclasses.replace(_resolve(model, seed), allow_nonfinite=allow_nonfinite)


def _resolve(model: Any, seed: int | None) -> ModelSource:
    from ds4c.models.deepseek_v4.presets import PRESETS

    if isinstance(model, str | Path):
        text = str(model)
        if isinstance(model, str) and text in PRESETS:
            return ModelSource("preset", text, dict(PRESETS[text]),
                               seed=DEFAULT_PRESET_SEED if seed is None else seed)
        path = Path(text)
        if path.is_dir():
            from ds4c.frontend.checkpoint import read_config

            return ModelSource("checkpoint", str(path), read_config(path), path=path.resolve())
        if path.is_file() and path.suffix == ".onnx":
            from ds4c.frontend.onnx_import import onnx_config

            return ModelSource("onnx", str(path), onnx_config(path), path=path.resolve())
        if path.exists():
            raise ConfigError(f"model '{text}' is a file; pass a checkpoint directory holding config.json and "
                              f"*.safetensors, an ONNX file (*.onnx), or a preset name ({', '.join(PRESETS)})")
        raise ConfigError(f"model '{text}' is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint "
                          "directory; check the path")
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        cfg = model.config.to_dict()
        state = {k: v for k, v in model.state_dict().items()}
        return ModelSource("module", type(model).__name__, cfg, module_state=state)
    raise ConfigError(f"cannot compile a {type(model).__name__}; pass a preset name, a checkpoint directory or a "
                      "transformers DeepseekV4ForCausalLM")
