"""Atomic publication of files and directories, output locks, and temporaries that never outlive
their process.

Every temporary is a hidden sibling named ``.<name>.<tag>-<pid>-<hex>`` (or ``.dvsprep-<what>-<pid>-
<hex>`` for scratch folders), so that a later run in the same place can tell whose it is and
remove those of processes that no longer exist (`clean_stale_temps`). An interrupted run leaves at
most such a temporary, never a file or store that looks complete.

An output being written is held by an exclusive lock (`output_lock`): a second writer of the same
path refuses at once with one line instead of mixing its work into the first one's.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputOutputClashError, OutputLockedError

_TEMP_RE = re.compile(r"^\..+\.(?:tmp|old|part|extract|convert)[-.]?(\d+)(?:-[0-9a-f]+)?$")
_SCRATCH_RE = re.compile(r"^\.dvsprep-[a-z]+-(\d+)-")


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden sibling of `path` (same filesystem, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def scratch_dir(parent: Path, what: str) -> Path:
    """A new hidden scratch folder ``parent/.dvsprep-<what>-<pid>-<random>`` (removable by
    `clean_stale_temps` once this process is gone)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".dvsprep-{what}-{os.getpid()}-", dir=parent))


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (ours counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_owner(name: str) -> int | None:
    """The PID in a temporary's name written by dvsprep, or None if the name is not one of ours."""
    m = _TEMP_RE.match(name) or _SCRATCH_RE.match(name)
    return int(m.group(1)) if m else None


def clean_stale_temps(directory: Path, name: str | None = None) -> list[Path]:
    """Remove our temporaries in `directory` whose process is gone (all of them, or only those
    of the output `name`). Returns what was removed; never raises."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        n = entry.name
        if name is not None and not (n.startswith(f".{name}.") or n.startswith(".dvsprep-")):
            continue
        pid = temp_owner(n)
        if pid is None or pid_alive(pid):
            continue
        try:
            remove_path(entry)
            removed.append(entry)
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename `tmp` onto `path`; on any error the temporary is removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree (never following a link into a tree)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move the completed directory `tmp` to `final`. An existing `final` is moved aside first
    and removed only after the new one is in place."""
    if final.exists() or final.is_symlink():
        trash = temp_sibling(final, "old")
        os.replace(final, trash)
        os.replace(tmp, final)
        remove_path(trash)
    else:
        os.replace(tmp, final)


def same_or_inside(a: Path, b: Path) -> bool:
    """Whether path `a` (existing or not) is `b` (also as a hard link), or lies inside it; links
    resolved."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    if ra == rb or ra.is_relative_to(rb):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_own_input(src: Path, out: Path, verb: str) -> None:
    """No command writes onto its own input: `out` must not be `src`, lie inside it, or hold it
    (replacing a folder that holds the input destroys the input too)."""
    if same_or_inside(out, src):
        raise InputOutputClashError(f"{out}: is {src} or inside it; {verb} would overwrite its own input")
    if same_or_inside(src, out):
        raise InputOutputClashError(f"{out}: holds {src}; replacing it would destroy the input of {verb}")


def lock_path(path: Path) -> Path:
    """The lock file that guards output `path`: ``.<name>.lock`` beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextmanager
def output_lock(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive lock on output `path` (a file or folder, existing or not) while the body
    runs; a second holder in any process raises OutputLockedError at once, naming `path`.

    The lock is ``flock`` on ``.<name>.lock`` beside `path` (its parent must exist or is created):
    the kernel drops it when the process dies, so a killed writer never blocks the next one.
    Stale temporaries of dead processes for `path` are removed once the lock is held.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lp = lock_path(path)
    while True:
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputLockedError(f"{path}: {what} is being written by another process{by}; "
                                    f"wait for it to finish") from None
        # the previous holder unlinks the lock file on release: if we locked an unlinked
        # inode, someone else may lock the new file, so start again on the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        clean_stale_temps(path.parent, path.name)
        yield path
    finally:
        try:
            os.unlink(lp)
        except OSError:
            pass
        os.close(fd)
