"""Artifacts: the on-disk ``.ds4`` container (this package's ``container``) and the compiled-model
layer on top of it (``ds4c.artifact.artifact``, imported on its own because it needs torch)."""

from ds4c.artifact.container import (
    DATA_ALIGNMENT,
    EAGER_VERIFY_BYTES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SIGNATURE,
    Container,
    check_member_name,
    open_container,
    remove_stale_temps,
    rewrite_signature,
    temp_beside,
    write_container,
)

__all__ = [
    "DATA_ALIGNMENT",
    "EAGER_VERIFY_BYTES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SIGNATURE",
    "Container",
    "check_member_name",
    "open_container",
    "remove_stale_temps",
    "rewrite_signature",
    "temp_beside",
    "write_container",
]
