import os
import tempfile

# Under pytest-xdist (CI runs `-n 2`): one core's worth of threads per worker, for the worker and
# the processes it starts (notebook kernels, the README job). torch's OpenMP threads spin while
# waiting; two workers with a thread per core each on two cores slowed the matmul-heavy tests
# (training the synthetic model, the precision notebook) five- to tenfold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Keep caches out of the user's home and out of the repo.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ds4c-triton-"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Traces on disk (ds4c.frontend.trace_cache): one directory for the whole run, shared by the xdist
# workers (set before they start) and the processes tests start (notebooks, the README job).
if "DS4C_CACHE_DIR" not in os.environ:
    import atexit
    import shutil

    os.environ["DS4C_CACHE_DIR"] = tempfile.mkdtemp(prefix="ds4c-cache-")
    atexit.register(shutil.rmtree, os.environ["DS4C_CACHE_DIR"], ignore_errors=True)  # in the process that made it
# Signing keys and trusted keys (ds4c.artifact.signing) of the run, not the user's: one directory
# for the whole run, shared by the xdist workers and the processes tests start.
if "DS4C_HOME" not in os.environ:
    import atexit
    import shutil

    os.environ["DS4C_HOME"] = tempfile.mkdtemp(prefix="ds4c-home-")
    atexit.register(shutil.rmtree, os.environ["DS4C_HOME"], ignore_errors=True)
# Ahead-of-time Triton binaries cost 10-40 s per GPU-target compile on 2 cores; the tests that are
# about them (tests/backends/triton/test_aot.py) ask for them explicitly, the rest compile without.
os.environ.setdefault("DS4C_KERNEL_BINARIES", "0")


import pytest  # noqa: E402 - after the environment above is set


@pytest.fixture(scope="session")
def tiny_cpu_artifact(tmp_path_factory):
    """tiny compiled for the cpu target in fp32 (max context 32), signed with the run's key
    (DS4C_HOME, above); shared by the artifact tests and the IR tests that edit its IR."""
    import ds4c

    path = tmp_path_factory.mktemp("tiny-cpu") / "tiny-cpu.ds4"
    ds4c.compile("tiny", target="cpu", precision="fp32", max_context=32, progress=False).save(path)
    return path
