"""Manifests: sha256 of every stored file (directories) or dataset (HDF5); a store's
fingerprint is the sha256 of its canonical manifest bytes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

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
