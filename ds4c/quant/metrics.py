"""How far a quantised model's next-token distribution is from a reference (the fp32 oracle)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Agreement:
    positions: int
    greedy_agreement: float  # fraction of positions whose argmax matches the reference
    kl: float  # mean KL(reference || model) of the next-token distributions, nats

    def __str__(self) -> str:
        return f"greedy agreement {self.greedy_agreement:.2%} over {self.positions} positions, KL {self.kl:.2e}"


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """Compare logits [.., vocab] with reference logits of the same positions."""
    got, want = logits.double().reshape(-1, logits.shape[-1]), reference.double().reshape(-1, reference.shape[-1])
    same = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    logp, logq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    return Agreement(got.shape[0], same, kl)
