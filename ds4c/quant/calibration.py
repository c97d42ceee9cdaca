"""What ``assign_precision`` may read besides the IR: the weights (all of them, or samples) and tokens.

The compiler builds a ``Calibration`` from the model source (ds4c.frontend.weight_samples). Small
models hand over every weight, so sensitivity is measured on real activations; models too large to
materialise hand over samples (a few experts, a slab of rows), measured in weight space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ds4c.quant.formats import FP8_BLOCK

Shape = tuple[int, ...]


@dataclass
class Calibration:
    load_all: Callable[[], dict[str, torch.Tensor]] | None = None  # None: too large to materialise
    sample: Callable[[str, Shape], torch.Tensor | None] | None = None  # a representative slice of a weight
    tokens: torch.Tensor | None = None  # [N, S] calibration token ids; None: generated from the model
    arrival: Mapping[str, str] = field(default_factory=dict)  # param -> format the checkpoint ships it in
    # Samples of weights with the same role and shape are draws of one distribution (preset weights):
    # one measurement per (role, shapes) then stands for every layer.
    iid_by_role: bool = False
    errors_cache: dict = field(default_factory=dict, repr=False)
    _weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def materialised(self) -> bool:
        return self.load_all is not None

    def weights(self) -> dict[str, torch.Tensor] | None:
        """Every weight (loaded once and kept: the compiler embeds the same tensors)."""
        if self._weights is None and self.load_all is not None:
            self._weights = self.load_all()
        return self._weights


def sample_shape(shape: Shape, max_elements: int = 1 << 20) -> Shape:
    """A slice of a weight worth measuring: one expert of a stack, whole FP8 block rows (128) of a matrix."""
    shape = tuple(shape)
    if len(shape) == 3:
        return (1, *sample_shape(shape[1:], max_elements))
    rows = shape[0]
    per_row = max(1, shape[-1])
    if rows * per_row <= max_elements:
        return shape
    return (max(FP8_BLOCK, (max_elements // per_row) // FP8_BLOCK * FP8_BLOCK), *shape[1:])
