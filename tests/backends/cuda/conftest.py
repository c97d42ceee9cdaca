"""Kernel tests run Triton's interpreter on CPU unless a GPU is present (set before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
