"""Where a model comes from: a preset, a checkpoint directory, an ONNX file, or a transformers module.

A ``ModelSource`` knows the model config and how to produce the weights, but never produces them
unless asked: compiling ``flash`` or ``pro`` must not materialise their weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ds4c.errors import ConfigError

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

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.path is not None:
            out["path"] = str(self.path)
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def load_weights(self, expected: WeightSpec, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> dict[str, torch.Tensor]:
        """Materialise the weights named in ``expected`` in HF naming, as ``dtype`` (integer tensors keep theirs)."""
        return load_weights(self.describe(), expected, dtype=dtype, device=device, progress=progress,
                            module_state=self.module_state)


def load_weights(ref: Mapping[str, Any], expected: WeightSpec, *, dtype: torch.dtype,
                 device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                 module_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Weights from a source reference (as stored in an artifact manifest)."""
    kind = ref["kind"]

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

        return load_checkpoint(Path(ref["path"]), expected, dtype=dtype, device=device, progress=progress)
    if kind == "onnx":  # the file's dtypes are the graph's: no cast
        from ds4c.frontend.onnx_import import load_onnx_weights

        return load_onnx_weights(Path(ref["path"]), expected, device=device)
    if kind == "module":
        if module_state is None:
            raise ConfigError("weights come from a transformers module that is not available here; "
                              "save the artifact with embedded weights")
        out = {}
        for i, name in enumerate(expected):
            out[name] = cast(module_state[name].detach())
            if progress:
                progress(i + 1, len(expected))
        return out
    raise ConfigError(f"unknown weight source kind '{kind}'")


def resolve_model(model: Any, *, seed: int | None = None) -> ModelSource:
    """Accept a preset name, a checkpoint directory, an ONNX file, or a transformers DeepseekV4ForCausalLM."""
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
