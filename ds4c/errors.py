"""Typed errors. Every message names the thing that is wrong (file, field, tensor, op) and the fix."""

from __future__ import annotations


class Ds4cError(Exception):
    """Base class of every error ds4c raises on purpose."""


class ConfigError(Ds4cError):
    """A model config is missing, malformed or describes an unsupported architecture."""


class CheckpointError(Ds4cError):
    """A checkpoint directory has missing, extra, mis-shaped or unreadable tensors."""


class TargetError(Ds4cError):
    """An unknown target name, or a target that cannot run what was asked."""


class IRError(Ds4cError):
    """Malformed IR text, or a graph the verifier rejects."""


class VerificationError(IRError):
    """The verifier rejected a graph; the message names the op."""


class PassError(Ds4cError):
    """A pass failed or its pipeline is malformed."""


class ArtifactError(Ds4cError):
    """An artifact is truncated, tampered with, of a newer format, or does not match its use."""


class InputError(Ds4cError):
    """Bad runtime input: token ids out of range, context longer than compiled maximum, ..."""


class KernelError(Ds4cError):
    """A device kernel failed to compile ahead of time, or an artifact's stored binaries are unusable."""


class RankFailure(Ds4cError):
    """A collective of a sharded program failed: another rank exited or stopped answering. Passed
    through the executors unwrapped, so every rank's last line says so."""
