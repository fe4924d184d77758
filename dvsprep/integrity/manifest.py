"""Manifests: sha256 of every stored file (directories) or dataset (HDF5); a store's
fingerprint is the sha256 of its canonical manifest bytes. Also the md5s a release is checked by."""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from ..atomic import atomic_write
from ..constants import MANIFEST_NAME

MANIFEST_FORMAT = "dvsprep-manifest/1"
_BUF = 1 << 22


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no whitespace) so equal content hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUF):
            h.update(chunk)
    return h.hexdigest()


def md5_stream(f: BinaryIO) -> str:
    """md5 of what is left to read in `f` (the release's published checksums are md5s)."""
    h = hashlib.md5()
    while chunk := f.read(_BUF):
        h.update(chunk)
    return h.hexdigest()


def md5_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return md5_stream(f)


def md5_files(folder: Path, jobs: int) -> dict[str, str]:
    """{name: md5} of every file directly in `folder`, sorted by name, hashed on `jobs` threads
    (hashlib releases the GIL on large buffers)."""
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return dict(zip((p.name for p in paths), pool.map(md5_file, paths)))


def fingerprint(manifest: dict) -> str:
    """The fingerprint of a store: sha256 of its canonical manifest."""
    return sha256_bytes(canonical_json(manifest))


def dir_manifest(root: str | os.PathLike, kind: str) -> dict:
    """Manifest of every regular file under `root` (except the manifest itself), by posix path."""
    root = Path(root)
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            files[rel] = {"sha256": sha256_file(full), "size": full.stat().st_size}
    return {"format": MANIFEST_FORMAT, "kind": kind, "files": files}


def write_dir_manifest(root: str | os.PathLike, manifest: dict) -> str:
    """Write `root/manifest.json` atomically; returns the store fingerprint."""
    root = Path(root)
    data = canonical_json(manifest)
    atomic_write(root / MANIFEST_NAME, lambda tmp: tmp.write_bytes(data))
    return sha256_bytes(data)
