"""`dvsprep pack` / `unpack`: a frame store as one uncompressed zip, and back.

The zip holds the store's files at its root, manifest included, each member STORED (the shards
are compressed already, and uncompressed members can be read in place by offset, so zarr and
the shard reader use the zip without extracting it). Members are written in name order with a
fixed timestamp and mode, so packing the same store twice gives the same bytes. Every file is
checked against the manifest as it is copied, in both directions: a corrupt store is never
packed or unpacked. Outputs go through the output protocol (`dvsprep.atomic.publishing`).
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .files import MAX_MANIFEST_BYTES, StoreFiles, is_zip_path, parse_manifest
from ..errors import IntegrityError, MissingFileError, StoreError
from ..atomic import check_output, publishing
from .store import open_frame_store, vouch_store
from ..integrity import MANIFEST_NAME, sha256_bytes

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class PackSummary:
    """What pack/unpack wrote. `files` counts what `dvsprep verify` counts: the files the manifest
    lists (each checked as it was copied); the output holds them plus manifest.json."""

    source: Path
    out: Path
    files: int
    size_bytes: int
    fingerprint: str

    def lines(self) -> list[str]:
        kind = "zip members" if is_zip_path(self.out) else "files"
        return [f"{self.out}: {self.files} files match the manifest ({self.files + 1} {kind} with {MANIFEST_NAME}), "
                f"{self.size_bytes / 1e6:.1f} MB",
                f"  fingerprint {self.fingerprint} (same as {self.source})"]


def _copy_checked(files: StoreFiles, name: str, want: dict, dst, where: str) -> int:
    """Copy one stored file to `dst`, hashing as it goes; IntegrityError when it differs."""
    h = hashlib.sha256()
    n = 0
    try:
        for chunk in files.chunks(name):
            h.update(chunk)
            dst.write(chunk)
            n += len(chunk)
    except MissingFileError:
        raise IntegrityError(f"{where}: {name} is listed in the manifest but missing (run dvsprep verify)") from None
    if n != want["size"] or h.hexdigest() != want["sha256"]:
        raise IntegrityError(f"{where}: {name} differs from the manifest (run dvsprep verify); nothing written")
    return n


def _checked_source(store: Path) -> tuple[StoreFiles, dict, bytes]:
    """The store's files and manifest, after the untrusted-store checks; refuses stray files."""
    st = open_frame_store(store)
    files = st._files
    raw = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw, str(store))
    extra = sorted(set(files.names()) - set(manifest["files"]) - {MANIFEST_NAME})
    if extra:
        raise IntegrityError(f"{store}: {len(extra)} file(s) not in the manifest ({', '.join(extra[:3])}"
                             f"{' ...' if len(extra) > 3 else ''}); run dvsprep verify")
    return files, manifest, raw


def pack_store(store: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False) -> PackSummary:
    """Write the frame store `store` (directory or zip) as one uncompressed zip at `out`
    (default: `<store>.zip`)."""
    store = Path(store)
    if out is None:
        if is_zip_path(store):
            raise StoreError(f"{store}: already a zip; give -o to re-pack it elsewhere")
        out = Path(f"{store}.zip")
    out = Path(out)
    if not is_zip_path(out):
        raise StoreError(f"{out}: a packed store's name must end in .zip")
    check_output(out, "packed store", force=force, inputs=[store])
    files, manifest, raw = _checked_source(store)
    publication = publishing(out, "packed store", force=force, inputs=[store])
    with publication as tmp:
        vouch_store(publication, sha256_bytes(raw))   # every member was checked as it was copied
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in sorted(manifest["files"]):
                want = manifest["files"][name]
                with zf.open(_zip_info(name, want["size"]), "w", force_zip64=want["size"] >= zipfile.ZIP64_LIMIT) as dst:
                    _copy_checked(files, name, want, dst, str(store))
            zf.writestr(_zip_info(MANIFEST_NAME, len(raw)), raw)
    return PackSummary(store, out, len(manifest["files"]), out.stat().st_size, sha256_bytes(raw))


def _zip_info(name: str, size: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    zi.compress_type = zipfile.ZIP_STORED
    zi.create_system = 3  # unix: the mode below is a regular file, 0644
    zi.external_attr = 0o100644 << 16
    zi.file_size = size
    return zi


def unpack_store(archive: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False) -> PackSummary:
    """Extract a packed store into the directory `out` (default: the zip's name without .zip),
    checking every member against the manifest and refusing members that are not in it."""
    archive = Path(archive)
    if not is_zip_path(archive):
        raise StoreError(f"{archive}: not a .zip (dvsprep unpack takes what dvsprep pack writes)")
    if out is None:
        out = archive.with_name(archive.name[: -len(".zip")])
    out = Path(out)
    check_output(out, "store", force=force, inputs=[archive], kind="dir")
    files, manifest, raw = _checked_source(archive)
    publication = publishing(out, "store", force=force, inputs=[archive], kind="dir")
    with publication as tmp:
        vouch_store(publication, sha256_bytes(raw))   # every file is checked as it is copied
        tmp.mkdir()
        for name in sorted(manifest["files"]):
            target = tmp.joinpath(*name.split("/"))  # names were checked: relative, no '..'
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as dst:
                _copy_checked(files, name, manifest["files"][name], dst, str(archive))
        (tmp / MANIFEST_NAME).write_bytes(raw)  # last, as when the store was written
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return PackSummary(archive, out, len(manifest["files"]), size, sha256_bytes(raw))


__all__ = ["PackSummary", "pack_store", "unpack_store"]
