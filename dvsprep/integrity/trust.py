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

A writer vouches for what it wrote (`vouch`, `record_written`): convert, frames, pack and unpack
record the marker of their output from the hashes they computed while writing, once it is
published and with its lock still held, so the next reader on this machine does not hash it
again. Its files were changed an instant ago, so the racy window cannot be waited out (that
would take RACY_NS per command); the writer instead waits out the filesystem's own clock tick:
it touches its lock file (beside the output, so on the same filesystem) until that file's ctime
is past the newest ctime of the output's files (a few milliseconds; up to the granularity, e.g.
1-2 s, on filesystems with coarse timestamps, and no marker when it takes longer), then stats
the output again and records the marker only if nothing changed. From then on every change to
the output gets a later ctime, so a byte changed after the writer finished is caught by the
stamps and the next open verifies in full, exactly as with a verifier's marker. What stamps
cannot see is a change by another process within the same clock tick as the writer's own last
write (while the writer is still publishing): the one residual case, of the same nature as the
racy window that the verifier's rule closes by not writing a marker.

Decoded-records (`is_decoded`, `record_decoded`) are about content, not files: a frame store's
fingerprint (the sha256 of its manifest, which holds every file's sha256) names its bytes, so
once every sample of the content with that fingerprint was decoded on this machine (by a full
verification, or by the writer that encoded it), a later full verification that hashes every
file against that manifest has proved the bytes identical and need not decode them again. It
still reads and hashes every byte: only the decoding, which costs several times the hashing, is
skipped. No stamps are involved, so copies and moves of the store keep the benefit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..atomic import Publication, atomic_write, clean_stale_temps, lock_path
from ..cache import MARKERS_DIR, cache_subdir
from ..errors import IntegrityError

log = logging.getLogger(__name__)

# Bump when the checks a full verification makes change: older markers then no longer count.
CHECKS_VERSION = 2
RACY_NS = 1_000_000_000
# How long a writer waits for the filesystem's clock to move past its output (`record_written`):
# more than the coarsest timestamps it may meet (FAT: 2 s); a few milliseconds on ext4, xfs, tmpfs.
TICK_WAIT_S = 3.0
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
    return _holds(_marker_file(kind, path, cache_dir), _body(kind, path, fingerprint, stamps))


def _holds(file: Path | None, body: dict) -> bool:
    """Whether the cache file `file` (a marker or a decoded-record) holds exactly `body`: at
    most MAX_MARKER_BYTES, parsed as JSON; anything unreadable holds nothing."""
    if file is None:
        return False
    try:
        if file.stat().st_size > MAX_MARKER_BYTES:
            return False
        return json.loads(file.read_bytes()) == body
    except (OSError, ValueError, RecursionError):
        return False


def _write(file: Path, body: dict, what: str) -> bool:
    """Write `body` into the cache file `file` (atomically; nothing when it holds exactly that
    already, so a repeated verification writes nothing); False, logging why, when the cache
    is not writable."""
    data = json.dumps(body, sort_keys=True).encode()
    try:
        if file.stat().st_size == len(data) and file.read_bytes() == data:
            return True
    except OSError:
        pass
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(file.parent)  # cache files half-written by killed processes
        atomic_write(file, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        log.debug("no %s: %s", what, exc)
        return False
    return True


def _remove(file: Path | None) -> None:
    try:
        if file is not None:
            file.unlink(missing_ok=True)
    except OSError:
        pass


def record_verified(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Mapping[str, Stamp],
                    started_ns: int, cache_dir: str | os.PathLike | None = None) -> bool:
    """Write the marker after a full verification that began at `started_ns` (time.time_ns()).

    Skipped (False) when a file changed less than RACY_NS before that, or the cache is not
    writable: the store is then simply verified again next time."""
    if any(s[2] >= started_ns - RACY_NS for s in stamps.values()):
        return False
    return _write_marker(kind, path, fingerprint, stamps, cache_dir)


def record_written(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Callable[[], Mapping[str, Stamp]],
                   *, probe: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   max_wait_s: float = TICK_WAIT_S) -> bool:
    """The writer's marker: `path` was just written with this `fingerprint` (from the hashes the
    writer computed), and ``stamps()`` gives the stamps of its files as published.

    Waits until the filesystem's clock has passed the newest ctime of those files, probing with
    `probe` (default: the output's lock file, which the writer holds; it lies beside `path`, on
    the same filesystem), then takes the stamps again: the marker is written only if they did not
    change. Any later change to the output then gets a later ctime and misses the marker. False
    (no marker: the next reader verifies in full) when the clock does not move past within
    `max_wait_s`, a stamp changed, the probe is missing, or the cache is not writable."""
    try:
        first = dict(stamps())
        if not first:
            return False
        newest = max(s[2] for s in first.values())   # ctime: what no one can set back
        probe = Path(probe) if probe is not None else lock_path(Path(path))
        deadline = time.monotonic() + max_wait_s
        delay = 0.0005
        while True:
            os.utime(probe)  # now, as the filesystem sees it: sets the probe's mtime and ctime
            if os.stat(probe).st_ctime_ns > newest:
                break
            if time.monotonic() >= deadline:
                log.debug("no verified-marker for %s: the filesystem clock did not move past it", path)
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        if dict(stamps()) != first:
            return False
    except (OSError, ValueError) as exc:
        log.debug("no verified-marker for %s: %s", path, exc)
        return False
    return _write_marker(kind, path, fingerprint, first, cache_dir)


def vouch(publication: Publication, kind: str, fingerprint: str, stamps: Callable[[], Mapping[str, Stamp]]) -> None:
    """Have `publication` record the writer's marker of its output (`record_written`) once it is
    published, with its lock still held."""
    final = publication.final
    publication.on_published(lambda: record_written(kind, final, fingerprint, stamps))


def _write_marker(kind: str, path: str | os.PathLike, fingerprint: str, stamps: Mapping[str, Stamp],
                  cache_dir: str | os.PathLike | None) -> bool:
    return _write(_marker_file(kind, path, cache_dir), _body(kind, path, fingerprint, stamps),
                  f"verified-marker for {path}")


def _decoded_file(kind: str, fingerprint: str, cache_dir: str | os.PathLike | None) -> Path | None:
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        return None  # not a sha256: never a file name
    return marker_dir(cache_dir) / f"decoded-{kind}-{fingerprint}.json"


def _decoded_body(kind: str, fingerprint: str) -> dict:
    return {"checks": CHECKS_VERSION, "kind": kind, "decoded": fingerprint}


def is_decoded(kind: str, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether every sample of the content with this fingerprint was decoded on this machine."""
    return _holds(_decoded_file(kind, fingerprint, cache_dir), _decoded_body(kind, fingerprint))


def record_decoded(kind: str, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Record that every sample of the content with this fingerprint decodes (after a full
    verification that decoded them all without a problem, or by the writer that encoded them).
    False when the cache is not writable or the fingerprint is not a sha256."""
    record = _decoded_file(kind, fingerprint, cache_dir)
    return record is not None and _write(record, _decoded_body(kind, fingerprint), f"decoded-record for {fingerprint}")


def forget_decoded(kind: str, fingerprint: str, cache_dir: str | os.PathLike | None = None) -> None:
    """Remove the decoded-record of content that failed to decode (a record no writer or
    verification of ours would have made)."""
    _remove(_decoded_file(kind, fingerprint, cache_dir))


def forget(kind: str, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> None:
    """Remove the marker of a store that failed verification."""
    _remove(_marker_file(kind, path, cache_dir))


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
