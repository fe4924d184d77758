"""Exceptions raised by dvsg_train. Each subclasses a builtin so callers can catch broadly.

The CLI prints ``str(exc)`` as one line; messages therefore name the file and the problem.
"""
from __future__ import annotations


class TrainError(Exception):
    """Base of every error dvsg_train raises on purpose."""


class ConfigError(TrainError, ValueError):
    """An option value that cannot work (bad range, device that does not exist, ...)."""


class CheckpointError(TrainError, ValueError):
    """A checkpoint is missing, unreadable, corrupt, or not one of ours."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint was trained with a configuration that differs from the one asked for."""


class DataMismatchError(TrainError, ValueError):
    """The frame store does not fit the run (different T, different data than a checkpoint)."""


class BackendUnavailableError(TrainError, RuntimeError):
    """The requested neuron backend (cupy) cannot run here; the message says what to install."""


class ExportError(TrainError, ValueError):
    """A network cannot be exported as asked (no ``nir`` installed, a shape the target lacks)."""
