"""Verified-markers: what makes a second open of an unchanged store cheap.

A store (frame store directory or zip, events.h5) is verified in full the first time a reader
opens it on this machine: every file hashed against its manifest and every array checked. Then a
small marker is written into the per-user cache (`dvsprep.cache`: ``$DVSPREP_CACHE``, else
``$XDG_CACHE_HOME/dvsprep``, else ``~/.cache/dvsprep``; never inside the store, which may be
read-only), keyed by the store's real path. It records the fingerprint and, for every file of the
store, (size, mtime_ns, ctime_ns, inode, device). A later open whose fingerprint and stamps all
match skips the hashing; anything else (a file rewritten, replaced, added, removed, a copy of
the store elsewhere) verifies in full again.

ctime cannot be set from user space (``touch -d`` restores mtime, not ctime), so a file edited
in place and given back its old mtime still misses the marker. Timestamps are coarse (a clock
tick), so files changed within `RACY_NS` before a verification began are not trusted to a
marker: that verification writes none and the next open verifies again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..atomic import atomic_write, clean_stale_temps
from ..cache import MARKERS_DIR, cache_subdir
from ..errors import IntegrityError

log = logging.getLogger(__name__)

# Bump when the checks a full verification makes change: older markers then no longer count.
CHECKS_VERSION = 2
RACY_NS = 1_000_000_000
MAX_MARKER_BYTES = 64 << 20

Stamp = tuple[int, int, int, int, int]


def stamp(st: os.stat_result) -> Stamp:
    """What identifies a file's content cheaply: (size, mtime_ns, ctime_ns, inode, device)."""
    return (int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino), int(st.st_dev))


def stamp_path(path: str | os.PathLike) -> Stamp:
    return stamp(os.stat(path))


def marker_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_subdir(MARKERS_DIR, cache_dir)


def _marker_file(kind: str, path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    key = hashlib.sha256(f"{kind}\0{os.path.realpath(path)}".encode("utf-8", "surrogateescape")).hexdigest()
    return marker_dir(cache_dir) / f"{kind}-{key[:40]}.json"


def _body(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Mapping[str, Stamp]) -> dict:
    return {"checks": CHECKS_VERSION, "kind": kind, "path": os.path.realpath(path), "fingerprint": fingerprint,
            "stamps": {k: list(v) for k, v in sorted(stamps.items())}}


def is_verified(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Mapping[str, Stamp],
                cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether a marker says this store, with exactly these files, was verified here."""
    marker = _marker_file(kind, path, cache_dir)
    try:
        if marker.stat().st_size > MAX_MARKER_BYTES:
            return False
        stored = json.loads(marker.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return stored == _body(kind, path, fingerprint, stamps)


def record_verified(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Mapping[str, Stamp],
                    started_ns: int, cache_dir: str | os.PathLike | None = None) -> bool:
    """Write the marker after a full verification that began at `started_ns` (time.time_ns()).

    Skipped (False) when a file changed less than RACY_NS before that, or the cache is not
    writable: the store is then simply verified again next time."""
    if any(s[2] >= started_ns - RACY_NS for s in stamps.values()):
        return False
    marker = _marker_file(kind, path, cache_dir)
    data = json.dumps(_body(kind, path, fingerprint, stamps), sort_keys=True).encode()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(marker.parent)  # markers half-written by killed processes
        atomic_write(marker, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        log.debug("no verified-marker for %s: %s", path, exc)
        return False
    return True


def forget(kind: str, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
    """Remove the marker of a store that failed verification."""
    try:
        _marker_file(kind, path, cache_dir).unlink(missing_ok=True)
    except OSError:
        pass


def now_ns() -> int:
    return time.time_ns()


def ensure_verified(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Mapping[str, Stamp],
                    source: str, verify: Callable[[], tuple[str, Sequence[tuple[str, str, str]]]], *,
                    force: bool = False) -> None:
    """Use the marker of this store if it matches (unless `force`), else verify it in full:
    ``verify()`` returns (headline, [(kind, name, detail), ...]). A store with problems loses its
    marker and is refused (IntegrityError naming `source` and the first problems); one without
    gets a marker."""
    if not force and is_verified(kind, path, fingerprint, stamps):
        return
    started = now_ns()
    headline, problems = verify()
    if problems:
        forget(kind, path)
        listed = "; ".join(f"{k} {name} ({detail})" for k, name, detail in problems[:3])
        raise IntegrityError(f"{source}: {headline}: {listed}"
                             f"{' ...' if len(problems) > 3 else ''} (dvsprep verify lists them)")
    record_verified(kind, path, fingerprint, stamps, started)
