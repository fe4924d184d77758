"""Frame stores from http(s) URLs, downloaded once per machine into a local cache.

A URL names either a packed store (``.../frames_T16_number.zarr.zip``) or a store directory
served as static files (``.../frames_T16_number.zarr/``). For a directory, `manifest.json` lists
every file, so exactly those files are fetched (no directory listing needed) and each one's size
and sha256 are checked as it arrives; a zip is downloaded whole and every member is checked
against the manifest inside it. Only a complete, verified copy is renamed into the cache, so an
interrupted download never looks valid.

The cache (``$DVSPREP_CACHE``, else ``$XDG_CACHE_HOME/dvsprep``, else ``~/.cache/dvsprep``) is keyed
by URL; a cached copy is used without contacting the server (training runs offline, and
DataLoader workers never download). `refresh=True` fetches again. A fingerprint can be pinned in
the URL fragment, ``URL#fingerprint=<sha256 or a prefix of >= 12 hex digits>``: a cached copy
with another fingerprint is fetched again and the new one must match.

Processes on one machine (DDP ranks, several runs) share the cache: an exclusive `flock` on a
lock file per URL lets one of them download while the others wait and then use its copy.

Bounds: a download is refused at once when the server declares (Content-Length) more than the
download limit (`max_download`: ``--max-download`` on `dvsprep verify`, else ``$DVSPREP_MAX_DOWNLOAD``,
else 8 GiB) or more than the cache's disk has free, and stopped as soon as it streams past the limit
or the disk's free space falls under a reserve. Partial downloads are PID-named temporaries removed
on any error, and by the next fetch into the same cache once their process is gone.

Transport is the standard library's urllib: stores are fetched as whole files, so range
requests, an event loop or extra dependencies (fsspec, aiohttp) would add nothing here.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator

from .. import __version__
from ..atomic import clean_stale_temps, publish_dir, remove_path, temp_sibling
from ..cache import STORES_DIR, cache_subdir
from .files import MAX_MANIFEST_BYTES, ZipFiles, check_member_name, iter_problems_against, parse_manifest
from ..errors import IntegrityError, MissingFileError, ResourceLimitError, StoreError, one_line
from ..inputs import check_url, is_url, is_zip_path  # the one URL and suffix rule (re-exported)
from ..integrity import MANIFEST_NAME, sha256_bytes
from ..resources import check_free_space, disk_full

log = logging.getLogger(__name__)

SOURCE_NAME = "source.json"
TIMEOUT_S = 60
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


def split_pin(url: str) -> tuple[str, str | None]:
    """(URL without fragment, pinned fingerprint or None) for ``URL#fingerprint=<hex>``."""
    check_url(url)
    base, _, frag = url.partition("#")
    if not frag:
        return base, None
    key, _, value = frag.partition("=")
    value = value.strip().lower()
    if key != "fingerprint" or not _FP.fullmatch(value):
        raise StoreError(f"{url}: the URL fragment must be #fingerprint=<12 to 64 hex digits>")
    return base, value


def _store_name(url: str) -> str:
    """The store's file name from the URL (``frames_T16_number.zarr`` or ``....zip``)."""
    path = urllib.parse.urlsplit(url).path.rstrip("/")
    name = urllib.parse.unquote(path.rsplit("/", 1)[-1]) or "store"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "store"
    return name[:100]


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


def _open_url(url: str):
    req = urllib.request.Request(url, headers={"User-Agent": f"dvsprep/{__version__}"})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise StoreError(f"{url}: HTTP {exc.code}: redirect loop or too many redirects") from None
        err = MissingFileError if exc.code == 404 else StoreError
        raise err(f"{url}: HTTP {exc.code} {one_line(exc.reason)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StoreError(f"{url}: cannot download ({one_line(reason)})") from None


def download(url: str, out: BinaryIO, max_bytes: int, *, dest: Path | None = None,
             limit_name: str = "the manifest's size") -> tuple[str, int]:
    """Stream `url` into `out`; returns (sha256, size).

    Refused at once when the server declares more than `max_bytes`, or (with `dest`, the file
    being written) more than `dest`'s disk has free; stopped when it streams past `max_bytes` or
    the free space falls under resources.FREE_SPACE_RESERVE. StoreError also for fewer bytes than declared
    (a cut connection) and for network errors and timeouts, naming the URL; a full disk is a
    ResourceLimitError naming `dest`.
    """
    h = hashlib.sha256()
    n = 0
    next_check = _SPACE_CHECK_EVERY
    with _open_url(url) as resp:
        declared_text = resp.headers.get("Content-Length")
        declared = int(declared_text) if declared_text is not None and declared_text.isdigit() else None
        if declared is not None and declared > max_bytes:
            raise ResourceLimitError(f"{url}: declares {declared:,} bytes, more than {limit_name} "
                                     f"({max_bytes:,} bytes); not downloading it")
        if dest is not None and declared is not None:
            check_free_space(url, dest.parent, declared)
        while True:
            try:
                chunk = resp.read(_BUF)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                raise StoreError(f"{url}: download failed after {n:,} bytes ({one_line(exc) or type(exc).__name__})") \
                    from None
            if not chunk:
                break
            n += len(chunk)
            if n > max_bytes:
                raise ResourceLimitError(f"{url}: more than {limit_name} ({max_bytes:,} bytes); download stopped")
            h.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                where = dest if dest is not None else url
                if disk_full(exc):
                    raise ResourceLimitError(f"{where}: No space left on device (downloading {url})") from None
                raise StoreError(f"{where}: cannot write ({exc.strerror or one_line(exc)})") from None
            if dest is not None and n >= next_check:
                next_check += _SPACE_CHECK_EVERY
                check_free_space(url, dest.parent, 0)
        if declared is not None and n != declared:
            raise StoreError(f"{url}: download ended after {n} of {declared} bytes")
    return h.hexdigest(), n


def _fetch_dir(url: str, dest: Path, limit: int) -> str:
    """Download a store directory served at `url` into `dest`; returns its fingerprint."""
    base = url.rstrip("/") + "/"
    buf = _MemoryFile()
    download(base + MANIFEST_NAME, buf, MAX_MANIFEST_BYTES, limit_name="the manifest size limit")
    raw = buf.getvalue()
    manifest = parse_manifest(raw, base + MANIFEST_NAME)
    files = manifest["files"]
    total = sum(e["size"] for e in files.values())
    if total > limit:
        raise ResourceLimitError(f"{url}: its manifest lists {total:,} bytes, more than the download limit "
                                 f"({limit:,} bytes; --max-download or ${MAX_DOWNLOAD_ENV})")
    check_free_space(url, dest.parent, total)
    dest.mkdir()
    t0 = time.monotonic()
    for name in sorted(files):
        check_member_name(name, base + MANIFEST_NAME)
        target = dest.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            digest, size = download(base + urllib.parse.quote(name), f, files[name]["size"], dest=target)
        if size != files[name]["size"] or digest != files[name]["sha256"]:
            raise IntegrityError(f"{base}{name}: arrived with {size} bytes and a sha256 that differs from "
                                 f"the store's manifest (corrupt on the server or in transit)")
    # The manifest is written last, as when the store was made.
    (dest / MANIFEST_NAME).write_bytes(raw)
    total = sum(e["size"] for e in files.values())
    log.info("downloaded %s: %d files, %.1f MB in %.1f s", url, len(files), total / 1e6, time.monotonic() - t0)
    return sha256_bytes(raw)


def _fetch_zip(url: str, dest: Path, limit: int) -> str:
    """Download a packed store into the file `dest`, check every member; returns its fingerprint."""
    t0 = time.monotonic()
    with open(dest, "wb") as f:
        _, size = download(url, f, limit, dest=dest,
                           limit_name=f"the download limit (--max-download or ${MAX_DOWNLOAD_ENV})")
    return check_zip(dest, url, size=size, t0=t0)


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


class _MemoryFile:
    """Minimal writable sink for small downloads."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, b: bytes) -> int:
        self._parts.append(bytes(b))
        return len(b)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


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
    `max_download()`)."""
    base, pinned = split_pin(url)
    limit = max_bytes if max_bytes is not None else max_download()
    entry = cache_entry(base, cache_dir)
    entry.parent.mkdir(parents=True, exist_ok=True)
    name = _store_name(base)
    with _locked(entry.parent / f"{entry.name}.lock"):
        clean_stale_temps(entry.parent, entry.name)  # partial downloads of killed processes
        hit = None if refresh else _cached(entry, base)
        if hit is not None and (pinned is None or hit[1].startswith(pinned)):
            log.info("using cached %s (%s)", base, hit[0])
            return hit[0], pinned
        tmp = temp_sibling(entry)
        tmp.mkdir()
        try:
            local = tmp / name
            is_zip = is_zip_path(name)
            fp = _fetch_zip(base, local, limit) if is_zip else _fetch_dir(base, local, limit)
            (tmp / SOURCE_NAME).write_text(json.dumps({"url": base, "name": name, "fingerprint": fp,
                                                       "kind": "zip" if is_zip else "dir",
                                                       "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            publish_dir(tmp, entry)
        except BaseException as exc:
            remove_path(tmp)
            if disk_full(exc):
                raise ResourceLimitError(f"{entry}: No space left on device (downloading {base})") from None
            raise
    return entry / name, pinned
