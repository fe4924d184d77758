"""`dvsprep push` and `dvsprep pull`: a frame store to object storage and back, never half.

push uploads a verified local store so that a reader never accepts a partial upload: a store
folder's files first and its manifest.json last (a reader starts from the manifest); a packed
store to a temporary key, then a server-side copy to its name (atomic on S3) and the temporary
deleted. An interrupted push leaves no manifest (folder) or no final object (zip), and a rerun
skips the folder files already there with the same size and MD5 (ETag), or restarts the zip.

pull is the cache's download (`remote.fetch_into`: retries, range resumes, mirrors, the store
verified in full) published to a path through the output protocol (`atomic.publishing`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ..atomic import publishing
from ..errors import IntegrityError, StoreError, StoreExistsError
from ..inputs import url_scheme
from ..integrity import MANIFEST_NAME
from . import remote, transport
from .store import open_frame_store

UPLOAD_TAG = ".dvsprep-upload-"     # the temporary key of a zip being pushed: <key>.dvsprep-upload-<hex>
MAX_COPY_BYTES = 5 << 30            # S3's limit for one server-side copy (CopyObject)


@dataclasses.dataclass
class ShareSummary:
    verb: str           # "pushed" or "pulled"
    source: str
    target: str
    files: int
    sent_bytes: int     # bytes that crossed the network (a resumed push skips what is there)
    seconds: float
    fingerprint: str
    pinned_url: str = ""

    def lines(self) -> list[str]:
        rate = self.sent_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        out = [f"{self.verb} {self.source} -> {self.target}: {self.files} files, "
               f"{self.sent_bytes / 1e6:.1f} MB in {self.seconds:.1f} s ({rate:.0f} MB/s)",
               f"  fingerprint {self.fingerprint}"]
        if self.pinned_url:
            out.append(f"  share it as: {self.pinned_url}")
        return out


def _target_url(store: Path, url: str, is_zip: bool) -> str:
    """The store's URL: `url`, or `url` + the store's name when `url` ends with a slash."""
    if url_scheme(url) != "s3":
        raise StoreError(f"{url}: dvsprep push writes to s3:// URLs (serve http(s) stores as static files)")
    if "#" in url:
        raise StoreError(f"{url}: push takes a URL without a #fragment (it prints the pinned URL)")
    remote.check_url(url.rstrip("/") + "/x" if url.endswith("/") else url)
    if url.endswith("/"):
        url += store.name
    if remote.is_zip_path(url) != is_zip:
        want = "a .zip name" if is_zip else "a name that does not end in .zip"
        raise StoreError(f"{url}: {store} is a {'packed store' if is_zip else 'store folder'}; give {want}")
    return url.rstrip("/") if not is_zip else url


def _call(url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One obstore call, its failure as one of our one-line errors (transient ones retried)."""
    def attempt() -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - obstore's exceptions, mapped
            raise transport.s3_error(url, exc) from None
    return transport.with_retries(attempt, url)


def _exists(obstore: Any, store: Any, url: str, key: str) -> dict | None:
    from obstore.exceptions import NotFoundError

    try:
        return obstore.head(store, key)
    except (NotFoundError, FileNotFoundError):
        return None
    except Exception as exc:  # noqa: BLE001
        err = transport.s3_error(url, exc)
        if isinstance(err, FileNotFoundError) and "no such object" in str(err):
            return None
        raise err from None


def push_store(path: str | os.PathLike, url: str, *, force: bool = False) -> ShareSummary:
    """Upload the frame store at `path` (folder or .zip, verified first) to the s3:// `url`."""
    t0 = time.monotonic()
    local = open_frame_store(path, verify=True)
    is_zip = local.kind == "zip"
    url = _target_url(Path(path), url, is_zip)
    obstore = transport.obstore_module()
    bucket, key = transport.split_s3(url)
    s3 = transport.s3_store(bucket)
    if is_zip:
        files, sent = 1, _push_zip(obstore, s3, url, key, Path(local.path), force)
    else:
        files, sent = _push_dir(obstore, s3, url, key, Path(local.path), local.manifest, force)
    return ShareSummary("pushed", str(path), url, files, sent, time.monotonic() - t0, local.fingerprint,
                        f"{url}#fingerprint={local.fingerprint}")


def _push_zip(obstore: Any, s3: Any, url: str, key: str, path: Path, force: bool) -> int:
    if path.stat().st_size > MAX_COPY_BYTES:  # checked before any byte is sent
        raise StoreError(f"{path}: {path.stat().st_size:,} bytes, more than one S3 copy takes "
                         f"({MAX_COPY_BYTES:,}); push the store folder instead (dvsprep unpack)")
    if not force and _exists(obstore, s3, url, key) is not None:
        raise StoreExistsError(f"{url}: already exists (use --force to replace it)")
    folder = key.rpartition("/")[0] or None  # obstore lists whole path segments: filter the names here
    for stale in _call(url, lambda: [m["path"] for m in obstore.list_with_delimiter(s3, prefix=folder)["objects"]
                                     if m["path"].startswith(key + UPLOAD_TAG)]):
        _call(url, obstore.delete, s3, stale)  # an interrupted push's temporary
    tmp = f"{key}{UPLOAD_TAG}{uuid.uuid4().hex[:12]}"
    try:
        _call(url, obstore.put, s3, tmp, path)
        _call(url, obstore.copy, s3, tmp, key)   # server-side: the name appears complete or not at all
    finally:
        try:
            obstore.delete(s3, tmp)
        except Exception:  # noqa: BLE001 - best effort; the next push removes it
            pass
    return path.stat().st_size


def _push_dir(obstore: Any, s3: Any, url: str, prefix: str, path: Path, manifest: dict, force: bool) -> tuple[int, int]:
    prefix = prefix.rstrip("/") + "/"
    if _exists(obstore, s3, url, prefix + MANIFEST_NAME) is not None:
        if not force:
            raise StoreExistsError(f"{url}: already exists (use --force to replace it)")
        _call(url, obstore.delete, s3, prefix + MANIFEST_NAME)  # no reader takes it while it changes
    there = {m["path"][len(prefix):]: m for batch in _call(url, lambda: list(obstore.list(s3, prefix=prefix)))
             for m in batch}
    sent = 0
    for name in sorted(manifest["files"]):
        data = path.joinpath(*name.split("/")).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
            raise IntegrityError(f"{path}: {name} changed while pushing; nothing more sent")
        have = there.get(name)
        if have is not None and have["size"] == len(data) and \
                (have.get("e_tag") or "").strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest():
            continue  # an earlier, interrupted push sent it already
        _call(url, obstore.put, s3, prefix + name, data, use_multipart=False)
        sent += len(data)
    raw = (path / MANIFEST_NAME).read_bytes()
    _call(url, obstore.put, s3, prefix + MANIFEST_NAME, raw, use_multipart=False)  # last: now readers see it
    return len(manifest["files"]) + 1, sent + len(raw)


def pull_store(url: str, out: str | os.PathLike, *, force: bool = False, max_bytes: int | None = None) -> ShareSummary:
    """Download the store at `url` (mirrors and pin in its fragment) to `out`, verified in full."""
    t0 = time.monotonic()
    base, pinned, mirrors = remote.split_source(url)
    limit = max_bytes if max_bytes is not None else remote.max_download()
    is_zip = remote.is_zip_path(remote.store_name(base))
    with publishing(out, "frame store", force=force, kind="file" if is_zip else "dir") as tmp:
        served, fp = remote.fetch_first([base, *mirrors], tmp, None, limit, pinned)
    if is_zip:
        files, size = 1, Path(out).stat().st_size
    else:
        entries = remote.parse_manifest((Path(out) / MANIFEST_NAME).read_bytes(), str(out))["files"]
        files, size = len(entries) + 1, sum(e["size"] for e in entries.values())
    return ShareSummary("pulled", served, str(out), files, size, time.monotonic() - t0, fp)
