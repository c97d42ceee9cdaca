"""Lightweight runtime: load artifacts, own model state, run entry points, generate."""

from ds4c.runtime.model import CompiledModel, load

__all__ = ["CompiledModel", "load"]
