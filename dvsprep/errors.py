"""Exceptions raised by dvsprep. Each subclasses a builtin so callers can catch broadly.

The CLI prints ``str(exc)`` as one line; messages therefore name the file and the problem.
"""
from __future__ import annotations


def one_line(text: object) -> str:
    """A message as one line, whatever a library (or an archive, or a server) put in it."""
    return " ".join(str(text).split())


class DvsprepError(Exception):
    """Base of every error dvsprep raises on purpose."""


class AedatFormatError(DvsprepError, ValueError):
    """A malformed AEDAT file (message names file, byte offset and problem)."""


class LabelFormatError(DvsprepError, ValueError):
    """A malformed label csv, trial list or gesture mapping."""


class ReleaseError(DvsprepError, ValueError):
    """The raw release is incomplete or laid out wrongly."""


class MissingFileError(DvsprepError, FileNotFoundError):
    """A file the release or a store needs does not exist."""


class UnsafeArchiveError(DvsprepError, ValueError):
    """An archive member would escape its extraction directory, or is a link/device."""


class StoreError(DvsprepError, ValueError):
    """A store is missing parts, corrupt, or not what was asked for."""


class StoreExistsError(DvsprepError, FileExistsError):
    """The output path exists and --force was not given."""


class UntrustedStoreError(StoreError):
    """A store contains codecs, dtypes, shapes or members we never write."""


class IntegrityError(StoreError):
    """Stored bytes do not match their manifest."""


class OutputLockedError(DvsprepError, BlockingIOError):
    """Another process is writing the same output (store, events.h5, run folder) right now."""


class InputOutputClashError(DvsprepError, ValueError):
    """A command was asked to write onto its own input."""


class ResourceLimitError(DvsprepError, OSError):
    """Not enough disk or memory for what an input declares, or a declared size over a bound."""


class DiskSpaceError(ResourceLimitError):
    """Not enough free disk where an output or a download goes: a property of this machine, so
    another source of the same input (a mirror) would meet it too."""


class OutputWriteError(DvsprepError, OSError):
    """The system refused to write an output (read-only filesystem, file too large, I/O error);
    the message names the output, never its temporary or its lock."""


class WorkerDiedError(DvsprepError, RuntimeError):
    """A worker process of a pool died in the middle of a task (killed, out of memory)."""
