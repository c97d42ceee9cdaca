"""A small model with a trained model's confidence: a hf_configs model fitted briefly to a synthetic
bigram language (each token is followed by its successor with probability 0.8, by a random token
otherwise). Random-weight models are near-uniform: their top-2 logits are within bf16 noise at
many positions, so greedy agreement there measures ties, not quantisation."""

from __future__ import annotations

import copy
import functools

import torch

from tests.hf_configs import SMALL_CONFIGS, make_hf_model


def bigram_batch(successor: torch.Tensor, n: int, length: int, g: torch.Generator, p: float = 0.8) -> torch.Tensor:
    vocab = successor.numel()
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for i in range(1, length):
        keep = torch.rand(n, generator=g) < p
        x[:, i] = torch.where(keep, successor[x[:, i - 1]], torch.randint(0, vocab, (n,), generator=g))
    return x


@functools.lru_cache(maxsize=2)
def _trained(name: str, steps: int, seed: int):
    return _train(name, steps, seed)


def trained_model(name: str = "mixed", steps: int = 100, seed: int = 1234):
    """(model, successor table, generator) after ``steps`` AdamW steps on the bigram language; the
    model is trained once per process and each caller gets its own copy (and a fresh generator
    in the state training left it in)."""
    model, successor, g = _trained(name, steps, seed)
    fresh = torch.Generator()
    fresh.set_state(g.get_state())
    return copy.deepcopy(model), successor.clone(), fresh


def _train(name: str, steps: int, seed: int):
    torch.manual_seed(seed)
    model = make_hf_model(SMALL_CONFIGS[name], seed=seed)
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(model.config.vocab_size, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = bigram_batch(successor, 8, 64, g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), successor, g
