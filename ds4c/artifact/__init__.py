"""Artifacts: the on-disk container and the compiled-model layer on top of it."""

from ds4c.artifact.container import FORMAT_VERSION, Container, open_container, write_container

__all__ = ["FORMAT_VERSION", "Container", "open_container", "write_container"]
