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

Transport is the standard library's urllib: stores are fetched as whole files, so range
requests, an event loop or extra dependencies (fsspec, aiohttp) would add nothing here.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Iterator

from . import __version__
from .atomic import publish_dir, temp_sibling
from .container import MAX_MANIFEST_BYTES, ZipFiles, check_member_name, iter_problems_against, parse_manifest
from .errors import IntegrityError, MissingFileError, StoreError
from .manifest import MANIFEST_NAME, sha256_bytes

log = logging.getLogger(__name__)

SOURCE_NAME = "source.json"
TIMEOUT_S = 60
_BUF = 1 << 20
_FP = re.compile(r"[0-9a-f]{12,64}")


def is_url(path: object) -> bool:
    return str(path).lower().startswith(("http://", "https://"))


def default_cache_dir() -> Path:
    """$DVSPREP_CACHE, else $XDG_CACHE_HOME/dvsprep, else ~/.cache/dvsprep."""
    env = os.environ.get("DVSPREP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dvsprep"


def split_pin(url: str) -> tuple[str, str | None]:
    """(URL without fragment, pinned fingerprint or None) for ``URL#fingerprint=<hex>``."""
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
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "stores" / f"{hashlib.sha256(base.encode()).hexdigest()[:16]}-{_store_name(base)}"


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
        err = MissingFileError if exc.code == 404 else StoreError
        raise err(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreError(f"{url}: cannot download ({reason})") from None


def download(url: str, out: BinaryIO, max_bytes: int) -> tuple[str, int]:
    """Stream `url` into `out`; returns (sha256, size). StoreError when the server sends more than
    `max_bytes` or fewer bytes than its Content-Length (a cut connection)."""
    h = hashlib.sha256()
    n = 0
    with _open_url(url) as resp:
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise StoreError(f"{url}: {declared} bytes, more than the {max_bytes} expected")
        while chunk := resp.read(_BUF):
            n += len(chunk)
            if n > max_bytes:
                raise StoreError(f"{url}: more than the {max_bytes} bytes expected")
            h.update(chunk)
            out.write(chunk)
        if declared is not None and declared.isdigit() and n != int(declared):
            raise StoreError(f"{url}: download ended after {n} of {declared} bytes")
    return h.hexdigest(), n


def _check_space(where: Path, need: int, url: str) -> None:
    free = shutil.disk_usage(where).free
    if need > free:
        raise StoreError(f"{url}: needs {need / 1e9:.2f} GB in {where}, only {free / 1e9:.2f} GB free")


def _fetch_dir(url: str, dest: Path) -> str:
    """Download a store directory served at `url` into `dest`; returns its fingerprint."""
    base = url.rstrip("/") + "/"
    buf = _MemoryFile()
    download(base + MANIFEST_NAME, buf, MAX_MANIFEST_BYTES)
    raw = buf.getvalue()
    manifest = parse_manifest(raw, base + MANIFEST_NAME)
    files = manifest["files"]
    _check_space(dest.parent, sum(e["size"] for e in files.values()), url)
    dest.mkdir()
    t0 = time.monotonic()
    for name in sorted(files):
        check_member_name(name, base + MANIFEST_NAME)
        target = dest.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            digest, size = download(base + urllib.parse.quote(name), f, files[name]["size"])
        if size != files[name]["size"] or digest != files[name]["sha256"]:
            raise IntegrityError(f"{base}{name}: arrived with {size} bytes and a sha256 that differs from "
                                 f"the store's manifest (corrupt on the server or in transit)")
    # The manifest is written last, as when the store was made.
    (dest / MANIFEST_NAME).write_bytes(raw)
    total = sum(e["size"] for e in files.values())
    log.info("downloaded %s: %d files, %.1f MB in %.1f s", url, len(files), total / 1e6, time.monotonic() - t0)
    return sha256_bytes(raw)


def _fetch_zip(url: str, dest: Path) -> str:
    """Download a packed store into the file `dest`, check every member; returns its fingerprint."""
    t0 = time.monotonic()
    with open(dest, "wb") as f:
        _, size = download(url, f, 1 << 42)
    return check_zip(dest, url, size=size, t0=t0)


def check_zip(path: Path, url: str, size: int = 0, t0: float | None = None) -> str:
    """Every member of a packed store against its manifest; returns the fingerprint."""
    files = ZipFiles(path)
    raw = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
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


def fetch_store(url: str, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> tuple[Path, str | None]:
    """The local copy of the store at `url` (downloading and verifying it once), and the
    fingerprint pinned in the URL (or None)."""
    base, pinned = split_pin(url)
    entry = cache_entry(base, cache_dir)
    entry.parent.mkdir(parents=True, exist_ok=True)
    name = _store_name(base)
    with _locked(entry.parent / f"{entry.name}.lock"):
        hit = None if refresh else _cached(entry, base)
        if hit is not None and (pinned is None or hit[1].startswith(pinned)):
            log.info("using cached %s (%s)", base, hit[0])
            return hit[0], pinned
        tmp = temp_sibling(entry)
        tmp.mkdir()
        try:
            local = tmp / name
            is_zip = name.lower().endswith(".zip")
            fp = _fetch_zip(base, local) if is_zip else _fetch_dir(base, local)
            (tmp / SOURCE_NAME).write_text(json.dumps({"url": base, "name": name, "fingerprint": fp,
                                                       "kind": "zip" if is_zip else "dir",
                                                       "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            publish_dir(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry / name, pinned
