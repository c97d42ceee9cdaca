"""The transformers peer of ``ds4c bench serve --compare transformers``: the public
``transformers.DeepseekV4ForCausalLM`` (the numerical oracle) holding the artifact's weights,
generating padded batches with ``generate`` as a server without continuous batching would.

The weights come from the artifact's recorded source, streamed tensor by tensor into a model built
without initialisation: a preset's from its seed, a checkpoint's from its directory (checked
against the artifact's file record). Routed experts run transformers' ``grouped_mm`` kernels on
CUDA (its fastest), the eager loop elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ds4c.errors import InputError

__all__ = ["transformers_generate", "transformers_model"]


def transformers_model(manifest: dict[str, Any], device: torch.device, *, weights_from: str | None = None) -> Any:
    """transformers' DeepseekV4ForCausalLM with the weights of the artifact ``manifest`` on
    ``device``, in fp32 where the artifact computes in fp32 and bf16 otherwise."""
    import transformers

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights

    from ds4c.frontend.source import load_weights

    source = manifest["model"].get("source") or {}
    if source.get("kind") not in ("preset", "checkpoint"):
        raise InputError(f"--compare transformers: the artifact's weights came from a {source.get('kind')} "
                         "source, which cannot be rebuilt in transformers; compile from a preset or a checkpoint")
    dtype = torch.float32 if (manifest.get("precision") or {}).get("compute_dtype") == "float32" else torch.bfloat16
    config = transformers.DeepseekV4Config(**manifest["model"]["config"])
    config._experts_implementation = "grouped_mm" if device.type == "cuda" else "eager"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype directly: an fp32 copy of a large model would not fit
    try:
        with no_init_weights(), torch.device(device):
            model = transformers.DeepseekV4ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    params = {n: t for n, t in model.state_dict().items() if not (n.endswith("inv_freq") or "rotary" in n)}
    expected = {n: (tuple(t.shape), t.dtype) for n, t in params.items()}
    with torch.no_grad():
        if source["kind"] == "preset":  # one tensor at a time
            from ds4c.models.deepseek_v4.presets import init_preset_weights

            for name, t in init_preset_weights(expected, source["seed"], device, dtype):
                params[name].copy_(t)
        else:
            for name, t in load_weights(source, expected, dtype=dtype, device=device,
                                        weights_from=weights_from).items():
                params[name].copy_(t)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class _FirstToken:
    """A ``generate`` streamer that notes when the first generated tokens reached the host."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.calls, self.first = sync, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.sync()
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def transformers_generate(model: Any, sync: Callable[[], None]) -> Callable[[list[list[int]], int], float]:
    """``run_static``'s ``generate`` on transformers: greedy ``generate`` of exactly ``steps`` tokens
    per row; returns when the first ones were on the host."""
    def run(ids: list[list[int]], steps: int) -> float:
        streamer = _FirstToken(sync)
        device = next(model.parameters()).device
        with torch.no_grad():
            model.generate(torch.tensor(ids, device=device), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, streamer=streamer)
        return streamer.first if streamer.first is not None else time.perf_counter()
    return run
