"""The installed ds4c version (from package metadata, with a fallback for source trees)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ds4c")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"
