"""Frame stores from http(s) and s3:// URLs, downloaded once per machine into a local cache.

A URL names either a packed store (``.../frames_T16_number.zarr.zip``) or a store directory
(``.../frames_T16_number.zarr/``). For a directory, `manifest.json` lists every file, so exactly
those files are fetched (no listing needed) and each one's size and sha256 are checked as it
arrives; a zip is downloaded whole and every member is checked against the manifest inside it.
Only a complete, verified copy is renamed into the cache, so an interrupted download never looks
valid. Transport (`transport`): urllib for http(s), obstore (the s3 extra) for s3://.

The cache (``$DVSPREP_CACHE``, else ``$XDG_CACHE_HOME/dvsprep``, else ``~/.cache/dvsprep``) is keyed
by URL; a cached copy is used without contacting the server (training runs offline, and
DataLoader workers never download). `refresh=True` fetches again. The URL fragment pins a
fingerprint and may name mirrors: ``URL#fingerprint=<sha256 or a prefix of >= 12 hex
digits>&mirror=URL2&mirror=URL3``: a cached copy with another fingerprint is fetched again and
the new one must match; the sources are tried in order, the first whose copy matches wins.

Processes on one machine (DDP ranks, several runs) share the cache: an exclusive `flock` on a
lock file per URL lets one of them download while the others wait and then use its copy.

Bounds: a download is refused at once when the server declares more than the download limit
(`max_download`: ``--max-download``, else ``$DVSPREP_MAX_DOWNLOAD``, else 8 GiB) or more than the
cache's disk has free, and stopped as soon as it streams past the limit or the disk's free space
falls under a reserve.

Networks fail: transient errors (5xx, resets, timeouts, a cut stream) are retried with backoff
(`transport.retry_delays`), each try resuming with a range request from the bytes already
written. A download in progress lives in ``.<entry>.partial/`` under the URL's lock: removed on
any error the command reports, kept when the process is interrupted or killed, so the next fetch
of that URL resumes it (and a fetch of any other URL removes it once nobody holds its lock).
PID-named temporaries of dead processes are removed by the next fetch of any URL.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

from ..atomic import clean_stale_temps, publish_dir, remove_path
from ..cache import STORES_DIR, cache_subdir
from . import transport
from .files import MAX_MANIFEST_BYTES, ZipFiles, check_member_name, iter_problems_against, parse_manifest
from ..errors import DiskSpaceError, DvsprepError, IntegrityError, MissingFileError, ResourceLimitError, StoreError, one_line
from ..inputs import check_url, is_url, is_zip_path  # the one URL and suffix rule (re-exported)
from ..integrity import MANIFEST_NAME, sha256_bytes
from ..resources import check_free_space, disk_full

log = logging.getLogger(__name__)

SOURCE_NAME = "source.json"
PARTIAL_SUFFIX = ".partial"      # ``.<entry>.partial/``: a download in progress, resumable
_BUF = 1 << 20
_FP = re.compile(r"[0-9a-f]{12,64}")
DEFAULT_MAX_DOWNLOAD = 8 << 30   # bytes; the real release's frame stores are a few GB at most
MAX_DOWNLOAD_ENV = "DVSPREP_MAX_DOWNLOAD"
_SPACE_CHECK_EVERY = 64 << 20    # bytes streamed between free-space checks
_max_download: contextvars.ContextVar[int | None] = contextvars.ContextVar("dvsprep_max_download", default=None)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``512M``, ``8G``, ``1.5GiB`` (K, M, G, T are powers of 1024).
    ValueError for anything else."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T)")
    n = float(m.group(1)) * (1024 ** " kmgt".index(m.group(2).lower() or " "))
    if n < 1:
        raise ValueError(f"{text!r}: a size must be at least 1 byte")
    return int(n)


def max_download() -> int:
    """The download limit in bytes: `download_limit` if set, else $DVSPREP_MAX_DOWNLOAD, else 8 GiB."""
    override = _max_download.get()
    if override is not None:
        return override
    env = os.environ.get(MAX_DOWNLOAD_ENV)
    if env:
        try:
            return parse_size(env)
        except ValueError as exc:
            raise StoreError(f"${MAX_DOWNLOAD_ENV}: {exc}") from None
    return DEFAULT_MAX_DOWNLOAD


@contextlib.contextmanager
def download_limit(nbytes: int | None) -> Iterator[None]:
    """Downloads started inside the block are limited to `nbytes` (None: the default)."""
    token = _max_download.set(nbytes)
    try:
        yield
    finally:
        _max_download.reset(token)


def split_source(url: str) -> tuple[str, str | None, list[str]]:
    """(URL without fragment, pinned fingerprint or None, mirror URLs) for
    ``URL#fingerprint=<hex>[&mirror=URL2[&mirror=URL3...]]``; mirrors need a pin (it is what a
    mirror's copy is checked against)."""
    check_url(url)
    base, _, frag = url.partition("#")
    pinned, mirrors = None, []
    for part in frag.split("&") if frag else ():
        key, _, value = part.partition("=")
        if key == "fingerprint" and pinned is None and _FP.fullmatch(value.strip().lower()):
            pinned = value.strip().lower()
        elif key == "mirror" and value:
            mirror = urllib.parse.unquote(value)
            if not is_url(mirror) or "#" in mirror:
                raise StoreError(f"{base}: mirror {mirror!r} is not an http(s) or s3:// URL without a fragment")
            check_url(mirror)
            mirrors.append(mirror)
        else:
            raise StoreError(f"{url}: the URL fragment must be #fingerprint=<12 to 64 hex digits>"
                             f"[&mirror=URL...]")
    if mirrors and pinned is None:
        raise StoreError(f"{base}: mirrors need #fingerprint=<hex> first (each copy is checked against it)")
    return base, pinned, mirrors


def split_pin(url: str) -> tuple[str, str | None]:
    """(URL without fragment, pinned fingerprint or None) for ``URL#fingerprint=<hex>``."""
    base, pinned, _ = split_source(url)
    return base, pinned


def _store_name(url: str) -> str:
    """The store's file name from the URL (``frames_T16_number.zarr`` or ``....zip``)."""
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    name = urllib.parse.unquote(path.rsplit("/", 1)[-1]) or "store"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "store"
    return name[:100]


store_name = _store_name


def cache_entry(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder for a store URL (fragment ignored)."""
    base, _ = split_pin(url)
    return cache_subdir(STORES_DIR, cache_dir) / f"{hashlib.sha256(base.encode()).hexdigest()[:16]}-{_store_name(base)}"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive lock across processes (fcntl.flock); without fcntl, no locking."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads each use their own temp folder
        yield
        return
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class _Partial:
    """A download in progress, kept in the cache as ``.<entry>.partial/`` (owned by the URL's lock):
    what it downloads (`url`) and each object's validator (ETag), so that the next try, in this
    process or the next, resumes each file from the bytes it already has."""

    STATE = "partial.json"

    def __init__(self, folder: Path, url: str) -> None:
        self.folder = folder
        try:
            state = json.loads((folder / self.STATE).read_text())
            keep = state.get("url") == url and isinstance(state.get("validators"), dict)
        except (OSError, ValueError, AttributeError):
            state, keep = {}, False
        if not keep:  # another URL's or a broken one: start afresh
            remove_path(folder)
            state = {"url": url, "validators": {}}
        folder.mkdir(parents=True, exist_ok=True)
        self.state = state

    def validator(self, key: str) -> str | None:
        return self.state["validators"].get(key)

    def remember(self, key: str, validator: str | None) -> None:
        if self.state["validators"].get(key) != validator:
            self.state["validators"][key] = validator
            (self.folder / self.STATE).write_text(json.dumps(self.state))


def _hash_prefix(path: Path, n: int) -> "hashlib._Hash":
    """sha256 of the first `n` bytes of `path` (what an earlier try already wrote)."""
    h = hashlib.sha256()
    if n <= 0:
        return h
    with open(path, "rb") as f:
        while n > 0:
            block = f.read(min(_BUF, n))
            if not block:
                break
            h.update(block)
            n -= len(block)
    return h


def download_file(url: str, path: Path, max_bytes: int, *, partial: _Partial | None = None, key: str = "",
                  size: int | None = None, limit_name: str = "the manifest's size") -> tuple[str, int]:
    """Download `url` into the file `path`, resuming from the bytes `path` already holds (range
    requests; transient failures retried with backoff, each resuming); returns (sha256, size).

    Refused at once when the server declares more than `max_bytes` or more than `path`'s disk has
    free; stopped when it streams past `max_bytes` or the free space falls under the reserve.
    `size` (from a manifest): a file already that long is only hashed. A full disk is a
    DiskSpaceError naming `path`; everything else a StoreError naming the URL."""
    def attempt() -> tuple[str, int]:
        exists = path.exists()
        have = path.stat().st_size if exists else 0
        if exists and size is not None and have >= size:  # an empty file still has to be made
            if have == size:
                return _hash_prefix(path, have).hexdigest(), have
            have = _truncate(path, 0)
        try:
            reply = transport.open_range(url, have, partial.validator(key) if partial and have else None)
        except transport.ObjectChangedError:  # the object is not the one the partial began with
            have = _truncate(path, 0)
            reply = transport.open_range(url, 0)
        try:
            return _stream(url, reply, path, have, max_bytes, partial, key, limit_name)
        finally:
            reply.close()
    return transport.with_retries(attempt, url)


def _truncate(path: Path, n: int) -> int:
    with open(path, "ab") as f:
        f.truncate(n)
    return n


def _stream(url: str, reply: transport.Reply, path: Path, have: int, max_bytes: int, partial: _Partial | None,
            key: str, limit_name: str) -> tuple[str, int]:
    if reply.start != have:  # the server sent the whole object: start over
        have = _truncate(path, reply.start)
    if reply.total is not None and reply.total > max_bytes:
        raise ResourceLimitError(f"{url}: declares {reply.total:,} bytes, more than {limit_name} "
                                 f"({max_bytes:,} bytes); not downloading it")
    if reply.total is not None:
        check_free_space(url, path.parent, reply.total - have)
    if partial is not None:
        partial.remember(key, reply.validator)
    h = _hash_prefix(path, have)
    n, next_check = have, have + _SPACE_CHECK_EVERY
    with open(path, "ab") as out:
        for chunk in reply.chunks:
            n += len(chunk)
            if n > max_bytes:
                raise ResourceLimitError(f"{url}: more than {limit_name} ({max_bytes:,} bytes); download stopped")
            h.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                if disk_full(exc):
                    raise DiskSpaceError(f"{path}: No space left on device (downloading {url})") from None
                raise StoreError(f"{path}: cannot write ({exc.strerror or one_line(exc)})") from None
            if n >= next_check:
                next_check += _SPACE_CHECK_EVERY
                check_free_space(url, path.parent, 0)
    if reply.total is not None and n != reply.total:
        raise transport.TransientError(f"{url}: download ended after {n:,} of {reply.total:,} bytes")
    return h.hexdigest(), n


def download_bytes(url: str, max_bytes: int, limit_name: str) -> bytes:
    """A small object (a manifest) into memory, with the same bounds and retries."""
    def attempt() -> bytes:
        reply = transport.open_range(url)
        try:
            if reply.total is not None and reply.total > max_bytes:
                raise ResourceLimitError(f"{url}: declares {reply.total:,} bytes, more than {limit_name} "
                                         f"({max_bytes:,} bytes); not downloading it")
            parts, n = [], 0
            for chunk in reply.chunks:
                n += len(chunk)
                if n > max_bytes:
                    raise ResourceLimitError(f"{url}: more than {limit_name} ({max_bytes:,} bytes); download stopped")
                parts.append(chunk)
            if reply.total is not None and n != reply.total:
                raise transport.TransientError(f"{url}: download ended after {n:,} of {reply.total:,} bytes")
            return b"".join(parts)
        finally:
            reply.close()
    return transport.with_retries(attempt, url)


def _fetch_dir(url: str, dest: Path, limit: int, partial: _Partial | None = None) -> str:
    """Download a store directory served at `url` into `dest` (files already there are resumed
    or, when complete, only checked); returns its fingerprint."""
    base = url.rstrip("/") + "/"
    raw = download_bytes(base + MANIFEST_NAME, MAX_MANIFEST_BYTES, "the manifest size limit")
    manifest = parse_manifest(raw, base + MANIFEST_NAME)
    files = manifest["files"]
    total = sum(e["size"] for e in files.values())
    if total > limit:
        raise ResourceLimitError(f"{url}: its manifest lists {total:,} bytes, more than the download limit "
                                 f"({limit:,} bytes; --max-download or ${MAX_DOWNLOAD_ENV})")
    check_free_space(url, dest.parent, total)
    dest.mkdir(exist_ok=True)
    (dest / MANIFEST_NAME).unlink(missing_ok=True)  # written last, once every file is in
    t0 = time.monotonic()
    for name in sorted(files):
        check_member_name(name, base + MANIFEST_NAME)
        target = dest.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = download_file(base + urllib.parse.quote(name), target, files[name]["size"],
                                     partial=partial, key=name, size=files[name]["size"])
        if size != files[name]["size"] or digest != files[name]["sha256"]:
            target.unlink(missing_ok=True)
            raise IntegrityError(f"{base}{name}: arrived with {size} bytes and a sha256 that differs from "
                                 f"the store's manifest (corrupt on the server or in transit)")
    # The manifest is written last, as when the store was made.
    (dest / MANIFEST_NAME).write_bytes(raw)
    log.info("downloaded %s: %d files, %.1f MB in %.1f s", url, len(files), total / 1e6, time.monotonic() - t0)
    return sha256_bytes(raw)


def _fetch_zip(url: str, dest: Path, limit: int, partial: _Partial | None = None) -> str:
    """Download a packed store into the file `dest` (resuming what it holds), check every
    member; returns its fingerprint."""
    t0 = time.monotonic()
    _, size = download_file(url, dest, limit, partial=partial, key=dest.name,
                            limit_name=f"the download limit (--max-download or ${MAX_DOWNLOAD_ENV})")
    return check_zip(dest, url, size=size, t0=t0)


def fetch_into(url: str, dest: Path, limit: int, partial: _Partial | None = None) -> str:
    """Download the store at `url` (no fragment) to `dest` (a zip file or a store folder) and
    verify it in full; returns its fingerprint."""
    return (_fetch_zip if is_zip_path(_store_name(url)) else _fetch_dir)(url, dest, limit, partial)


def check_zip(path: Path, url: str, size: int = 0, t0: float | None = None) -> str:
    """Every member of a packed store against its manifest; returns the fingerprint."""
    try:
        files = ZipFiles(path)
        raw = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except (StoreError, MissingFileError) as exc:  # name the URL, not the temporary download
        msg = str(exc)
        if not msg.startswith(str(path)):
            raise
        raise type(exc)(url + msg[len(str(path)):]) from None
    manifest = parse_manifest(raw, f"{url}: {MANIFEST_NAME}")
    problems = list(iter_problems_against(files, manifest))
    if problems:
        listed = "; ".join(f"{kind} {name}" for kind, name, _ in problems[:5])
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise IntegrityError(f"{url}: {len(problems)} file(s) differ from the store's manifest: {listed}{more}")
    if t0 is not None:
        log.info("downloaded %s: %.1f MB in %.1f s", url, size / 1e6, time.monotonic() - t0)
    return sha256_bytes(raw)


def _cached(entry: Path, url: str) -> tuple[Path, str] | None:
    """(local store, fingerprint) of a complete cache entry for `url`, or None."""
    try:
        src = json.loads((entry / SOURCE_NAME).read_text())
        local = entry / src["name"]
        if src["url"] != url or not local.exists():
            return None
        # Cheap consistency check: the manifest still hashes to what was verified on download.
        if local.is_dir():
            raw = (local / MANIFEST_NAME).read_bytes()
        else:
            raw = ZipFiles(local).read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        if sha256_bytes(raw) != src["fingerprint"]:
            log.warning("cached copy of %s changed since it was downloaded; fetching it again", url)
            return None
        return local, src["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, StoreError):
        return None


def fetch_store(url: str, cache_dir: str | os.PathLike | None = None, refresh: bool = False,
                max_bytes: int | None = None) -> tuple[Path, str | None]:
    """The local copy of the store at `url` (downloading and verifying it once), and the
    fingerprint pinned in the URL (or None). `max_bytes`: the download limit (default
    `max_download()`). With mirrors in the fragment, each source is tried in order and the first
    whose copy verifies and matches the pin wins (each failure one warning line)."""
    base, pinned, mirrors = split_source(url)
    limit = max_bytes if max_bytes is not None else max_download()
    entry = cache_entry(base, cache_dir)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent / f"{entry.name}.lock"):
        clean_stale_temps(entry.parent)  # every URL's temporaries whose process is gone
        _drop_other_partials(entry.parent, entry.name)
        hit = None if refresh else _cached(entry, base)
        if hit is not None and (pinned is None or hit[1].startswith(pinned)):
            log.info("using cached %s (%s)", base, hit[0])
            return hit[0], pinned
        tmp = entry.parent / f".{entry.name}{PARTIAL_SUFFIX}"
        try:
            served, fp = fetch_first([base, *mirrors], tmp / _store_name(base), tmp, limit,
                                     pinned if mirrors else None)
            (tmp / SOURCE_NAME).write_text(json.dumps({"url": base, "name": _store_name(base), "fingerprint": fp,
                                                       "kind": "zip" if is_zip_path(_store_name(base)) else "dir",
                                                       "served_by": served,
                                                       "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            (tmp / _Partial.STATE).unlink(missing_ok=True)
            publish_dir(tmp, entry)
        except (KeyboardInterrupt, SystemExit):
            raise  # interrupted: the partial stays for the next fetch of this URL to resume
        except BaseException as exc:
            remove_path(tmp)
            if disk_full(exc):
                raise DiskSpaceError(f"{entry}: No space left on device (downloading {base})") from None
            raise
    return entry / _store_name(base), pinned


def fetch_first(sources: list[str], dest: Path, partial_dir: Path | None, limit: int,
                pinned: str | None) -> tuple[str, str]:
    """(the source that served it, fingerprint): download the store into `dest` from each source
    in turn until one verifies (and matches `pinned`, when given); the last failure is raised.
    `partial_dir`: where the download's resume state lives (None: no resume across processes)."""
    for i, src in enumerate(sources):
        try:
            partial = _Partial(partial_dir, src) if partial_dir is not None else None
            fp = fetch_into(src, dest, limit, partial)
            if pinned and not fp.startswith(pinned):
                raise IntegrityError(f"{src}: fingerprint {fp[:16]}... differs from the expected {pinned[:16]}...")
            return src, fp
        except DvsprepError as exc:
            # a full disk here is full for every mirror: no point downloading again
            if i == len(sources) - 1 or isinstance(exc, DiskSpaceError):
                raise
            remove_path(partial_dir if partial_dir is not None else dest)
            log.warning("%s; trying the mirror %s", one_line(exc), sources[i + 1])
    raise AssertionError("unreachable")


def _drop_other_partials(stores: Path, keep: str) -> None:
    """Remove other URLs' partial downloads that no process is working on (a fetch of any URL
    tidies the cache; only the same URL's next fetch resumes its own)."""
    try:
        import fcntl
    except ImportError:
        return
    for p in stores.glob(f".*{PARTIAL_SUFFIX}"):
        name = p.name[1:-len(PARTIAL_SUFFIX)]
        if name == keep:
            continue
        with open(stores / f"{name}.lock", "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # being downloaded right now
            try:
                remove_path(p)
            except OSError:
                pass
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
