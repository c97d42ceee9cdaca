import os
import tempfile

# Keep caches out of the user's home and out of the repo.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ds4c-triton-"))
os.environ.setdefault("MPLBACKEND", "Agg")
