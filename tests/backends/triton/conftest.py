"""Kernel tests run Triton's interpreter on CPU unless a GPU is present (set before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


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
