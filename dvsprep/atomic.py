"""Atomic publication of files and directories: build under a hidden sibling, then rename.

An interrupted run leaves at most a hidden temporary, never a file or store that looks complete.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden sibling of `path` (same filesystem, so the final rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename `tmp` onto `path`; on any error the temporary is removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
