"""Kernel tests run Triton's interpreter on CPU unless a GPU is present (set before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

from ds4c.backends.triton.kernels.configs import KernelContext  # noqa: E402
from ds4c.targets import get_target  # noqa: E402

# What the tests that call launchers directly hand them: the h100 record (Triton's interpreter has
# no device of its own to choose one), the target's configurations; PDL per the hardware (off in
# the interpreter).
CTX = KernelContext(get_target("h100"))


def kernel_context(target: str = "h100", **tuning: dict) -> KernelContext:
    """A kernel context for ``target`` with tuning overrides per family (``topk={"select": 0}``)."""
    return KernelContext(get_target(target), tuning=tuning or None)


@pytest.fixture(scope="session")
def tiny_fp8_artifact(tmp_path_factory):
    """tiny compiled for h100 with FP8 weights (max context 64), shared by the packed-weight tests."""
    import ds4c

    path = tmp_path_factory.mktemp("fp8") / "tiny-fp8.ds4"
    ds4c.compile("tiny", target="h100", precision="fp8", max_context=64, progress=False).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_fp32_artifact(tmp_path_factory):
    """tiny compiled for h100 in fp32 (max context 64), shared by the executor tests."""
    import ds4c

    path = tmp_path_factory.mktemp("fp32") / "t.ds4"
    ds4c.compile("tiny", target="h100", precision="fp32", max_context=64, progress=False).save(path)
    return path
