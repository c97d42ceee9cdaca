import os
import tempfile

# Keep caches out of the user's home and out of the repo.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ds4c-triton-"))
os.environ.setdefault("MPLBACKEND", "Agg")
# Ahead-of-time Triton binaries cost 10-40 s per GPU-target compile on 2 cores; the tests that are
# about them (tests/backends/cuda/test_aot.py) ask for them explicitly, the rest compile without.
os.environ.setdefault("DS4C_KERNEL_BINARIES", "0")
