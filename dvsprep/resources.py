"""What this machine has room for: free disk space before writing, memory before allocating."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterable

from .errors import DiskSpaceError, DvsprepError, OutputWriteError, ResourceLimitError

FREE_SPACE_RESERVE = 64 << 20   # left free on a disk we write to (extraction, downloads)


def check_free_space(who: str | os.PathLike, where: os.PathLike, need: int) -> None:
    """DiskSpaceError naming `who` (the input being written out) unless the disk of folder
    `where` has `need` bytes free plus FREE_SPACE_RESERVE."""
    free = shutil.disk_usage(where).free
    if need + FREE_SPACE_RESERVE > free:
        raise DiskSpaceError(f"{who}: needs {need / 1e6:,.1f} MB in {where} (plus {FREE_SPACE_RESERVE >> 20} MB "
                             f"kept free), only {free / 1e6:,.1f} MB free")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def size_text(n: float) -> str:
    """Bytes as GiB (from 1 GiB) or MiB, one decimal: the unit of every memory refusal."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def memory_refusal(who: str | os.PathLike, task: str, need: int, have: int, hint: str,
                   where: str = "memory") -> str:
    """The one wording of "this will not fit": `who` (the input or output), what would allocate
    `need` bytes, the `have` bytes free, and what to do instead."""
    return f"{who}: {task} needs about {size_text(need)} of {where}, but only {size_text(have)} is free ({hint})"


def check_memory(who: str | os.PathLike, task: str, need: int, hint: str) -> None:
    """ResourceLimitError (`memory_refusal`) when `need` bytes exceed `available_memory()`:
    callers estimate what they will allocate and ask before allocating it (a refusal instead of
    a MemoryError traceback, or of the machine swapping). Unknown available memory: no check."""
    have = available_memory()
    if have is not None and need > have:
        raise ResourceLimitError(memory_refusal(who, task, need, have, hint))


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the operating system's "no space left" (ENOSPC, or a quota: EDQUOT),
    as opposed to one of our own errors that subclass OSError."""
    return isinstance(exc, OSError) and not isinstance(exc, DvsprepError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def no_space_error(output: str | os.PathLike) -> DiskSpaceError:
    """The one line for a full disk, naming the output being written (never its temporary)."""
    return DiskSpaceError(f"{output}: No space left on device")


# What the system says about the writing itself when it names no file (h5py, zarr and Pillow
# often drop the name): said of the output being written.
_WRITE_ERRNOS = frozenset({errno.EFBIG, errno.EROFS, errno.EIO})


def _names_one_of(filename: object, hidden: Iterable[Path]) -> bool:
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    f = Path(os.path.abspath(os.fsdecode(filename)))
    return any(f == h or f.is_relative_to(h) for h in (Path(os.path.abspath(h)) for h in hidden))


def output_error(exc: BaseException, output: str | os.PathLike, hidden: Iterable[Path]) -> DvsprepError | None:
    """The one line for an OS error met while writing `output` through its `hidden` paths (the
    temporary, the lock): a full disk is `no_space_error`; an error that names one of them, or
    a write error that names no file, is OutputWriteError naming `output`. None: leave `exc` as
    it is (one of ours, or an error about an input, which names that input)."""
    if not isinstance(exc, OSError) or isinstance(exc, DvsprepError) or exc.errno is None:
        return None
    if disk_full(exc):
        return no_space_error(output)
    hidden = [Path(h) for h in hidden if h is not None]
    if _names_one_of(exc.filename, hidden) or _names_one_of(exc.filename2, hidden) or (
            exc.filename is None and exc.errno in _WRITE_ERRNOS):
        # the system's words for the errno, not the library's text (HDF5's names the temporary)
        return OutputWriteError(f"{output}: {os.strerror(exc.errno)}")
    return None
