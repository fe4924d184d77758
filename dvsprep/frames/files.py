"""The files of a store, read from a directory or from an uncompressed zip, without trusting them.

A frame store travels as a directory or as one zip (``dvsprep pack``). Both are read through
`StoreFiles`: names and sizes, bounded reads, and the (path, offset, size) of each file so shard
readers can `pread` straight from a zip member as from a plain file.

Zip members are refused when their name is absolute, contains ``..`` or a backslash, when they
are links, encrypted, compressed (we write ZIP_STORED: chunks are compressed already), listed twice,
or when their data would lie outside the archive (a truncated download). The manifest is parsed
with its size bounded and every entry checked before any of it is used to build a path.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
import os
import re
import stat
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import MissingFileError, StoreError, UntrustedStoreError
from ..inputs import is_zip_path  # the one suffix rule (re-exported)
from ..integrity import MANIFEST_FORMAT, MANIFEST_NAME
from ..integrity import stamp, stamp_path

# Bounds on what a store may declare, checked before anything is read or allocated.
MAX_MANIFEST_BYTES = 16 << 20
MAX_JSON_BYTES = 1 << 20          # one zarr.json
MAX_FILES = 200_000
MAX_FILE_BYTES = 1 << 40          # one stored file (a shard), 1 TiB
_BUF = 1 << 22
_HASH_BUF = 8 << 20               # one pread while hashing
_buffers = threading.local()
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_ZIP_LOCAL_SIG = b"PK\x03\x04"


def _read_buffer() -> memoryview:
    """This thread's hashing buffer (_HASH_BUF bytes), allocated once per thread."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(_HASH_BUF))
    return buf


def check_member_name(name: str, where: str) -> str:
    """A relative posix path with no empty, '.' or '..' parts; raises UntrustedStoreError."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise UntrustedStoreError(f"{where}: bad file name {name!r}")
    if name.startswith("/") or "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name):
        raise UntrustedStoreError(f"{where}: file name {name!r} is absolute or not a posix path; refusing it")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UntrustedStoreError(f"{where}: file name {name!r} has an empty, '.' or '..' part; refusing it")
    return name


@dataclass(frozen=True)
class FileSpan:
    """Where a stored file's bytes are: `size` bytes at `offset` of the plain file `path`."""

    path: Path
    offset: int
    size: int


class StoreFiles(ABC):
    """Read access to the files of a store (see `open_store_files`)."""

    path: Path
    kind: str  # "dir" or "zip"

    @abstractmethod
    def names(self) -> dict[str, int]:
        """Every stored file (posix path relative to the store root) and its size."""

    @abstractmethod
    def span(self, name: str) -> FileSpan | None:
        """Where `name`'s bytes are, or None when it is absent."""

    def read(self, name: str, max_bytes: int) -> bytes:
        """All bytes of `name`; StoreError when it is larger than `max_bytes`, MissingFileError
        when absent."""
        sp = self.span(name)
        if sp is None:
            raise MissingFileError(f"{self.path}: no {name} in the store")
        if sp.size > max_bytes:
            raise UntrustedStoreError(f"{self.path}: {name} is {sp.size} bytes, more than the {max_bytes} allowed")
        with open(sp.path, "rb") as f:
            data = os.pread(f.fileno(), sp.size, sp.offset)
        if len(data) != sp.size:
            raise StoreError(f"{self.path}: {name} is truncated")
        return data

    def head(self, name: str, n: int) -> bytes:
        """The first (up to) `n` bytes of `name`."""
        sp = self.span(name)
        if sp is None:
            raise MissingFileError(f"{self.path}: no {name} in the store")
        with open(sp.path, "rb") as f:
            return os.pread(f.fileno(), min(n, sp.size), sp.offset)

    def chunks(self, name: str, missing: str | None = None) -> Iterator[bytes]:
        """The bytes of `name` in pieces of at most 4 MiB (fewer bytes than its size when the
        underlying file is truncated). MissingFileError (with `missing` as message) when absent."""
        sp = self.span(name)
        if sp is None:
            raise MissingFileError(missing or f"{self.path}: no {name} in the store")
        n = 0
        with open(sp.path, "rb") as f:
            while n < sp.size:
                chunk = os.pread(f.fileno(), min(_BUF, sp.size - n), sp.offset + n)
                if not chunk:
                    return
                n += len(chunk)
                yield chunk

    def crc_differs(self, name: str) -> bool:
        """Whether the container's own checksum of `name` (a zip's CRC-32) disagrees with its
        bytes, as found by the last `sha256` of it (zip readers such as zarr's refuse such members)."""
        return False

    def sha256_of(self, name: str, data: bytes) -> str:
        """sha256 hex of `name`'s bytes `data`, read already (zips: their CRC-32 checked too,
        as by `sha256`)."""
        return hashlib.sha256(data).hexdigest()

    def sha256(self, name: str) -> tuple[str, int]:
        """(sha256 hex, bytes read) of `name`, streamed."""
        digest, n, _ = self._hash(name, crc=False)
        return digest, n

    def _hash(self, name: str, crc: bool) -> tuple[str, int, int]:
        """(sha256 hex, bytes read, CRC-32 when `crc` else 0) of `name`, read with preads into
        this thread's buffer: no allocation per read, which costs a page fault per 4 KiB of a
        fresh buffer (a fifth of sha256's own time here). Fewer bytes than its size when the
        underlying file is truncated."""
        sp = self.span(name)
        if sp is None:
            raise MissingFileError(f"{self.path}: no {name} in the store")
        h, value, n, buf = hashlib.sha256(), 0, 0, _read_buffer()
        fd = os.open(sp.path, os.O_RDONLY)
        try:
            while n < sp.size:
                got = os.preadv(fd, [buf[:min(len(buf), sp.size - n)]], sp.offset + n)
                if not got:
                    break
                h.update(buf[:got])    # hashlib and zlib release the GIL on buffers this large
                if crc:
                    value = zlib.crc32(buf[:got], value)
                n += got
        finally:
            os.close(fd)
        return h.hexdigest(), n, value

    @abstractmethod
    def zarr_store(self) -> Any:
        """A read-only zarr Store over these files."""

    def total_size(self) -> int:
        return sum(self.names().values())

    @abstractmethod
    def stamps(self) -> dict[str, tuple[int, int, int, int, int]]:
        """(size, mtime_ns, ctime_ns, inode, device) of what holds the store (see dvsprep.integrity.trust)."""

    def close(self) -> None:
        pass


class DirFiles(StoreFiles):
    """A store directory. Symbolic links inside it are refused (a store never contains any)."""

    kind = "dir"

    def __init__(self, path: Path):
        self.path = path
        self._names: dict[str, int] | None = None
        self._stamps: dict[str, tuple[int, int, int, int, int]] = {}
        self._plain: set[str] = set()   # folders inside the store known not to be links

    def names(self) -> dict[str, int]:
        if self._names is None:
            out: dict[str, int] = {}
            self._walk(os.fspath(self.path), out)
            self._names = out
        return self._names

    def _walk(self, root: str, out: dict[str, int]) -> None:
        """Add the files under `root`: each folder's files in name order, then its subfolders,
        as os.walk would, with a stack rather than recursion (a crafted store may nest folders
        thousands deep); a folder that cannot be listed holds nothing (its files are then
        reported missing)."""
        todo = [(root, "")]
        while todo:
            folder, prefix = todo.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            subfolders = []
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    subfolders.append((entry.path, f"{prefix}{entry.name}/"))
                    continue
                rel = prefix + entry.name
                if not stat.S_ISREG(st.st_mode):
                    raise UntrustedStoreError(f"{self.path}: {rel} is a link or special file; refusing it")
                out[rel] = st.st_size
                self._stamps[rel] = stamp(st)
                if len(out) > MAX_FILES:
                    raise UntrustedStoreError(f"{self.path}: more than {MAX_FILES} files")
            todo.extend(reversed(subfolders))

    def stamps(self) -> dict[str, tuple[int, int, int, int, int]]:
        self.names()
        return dict(self._stamps)

    def span(self, name: str) -> FileSpan | None:
        check_member_name(name, str(self.path))
        full = self.path.joinpath(*name.split("/"))
        try:
            st = full.lstat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        # A link (the file itself or a folder above it inside the store) could lead outside it.
        if not stat.S_ISREG(st.st_mode) or not self._folders_plain(name):
            raise UntrustedStoreError(f"{self.path}: {name} is a link or special file; refusing it")
        return FileSpan(full, 0, st.st_size)

    def _folders_plain(self, name: str) -> bool:
        """Whether every folder on `name`'s path inside the store is a folder, not a link (each
        checked once per opening of the store)."""
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in self._plain:
                try:
                    if not stat.S_ISDIR(os.lstat(self.path.joinpath(*parts[:i])).st_mode):
                        return False
                except OSError:
                    return False
                self._plain.add(folder)
        return True

    def zarr_store(self) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.path, read_only=True)


class ZipFiles(StoreFiles):
    """An uncompressed zip holding a store's files at its root (what `dvsprep pack` writes)."""

    kind = "zip"

    def __init__(self, path: Path):
        self.path = path
        self._spans: dict[str, FileSpan] = {}
        self._crcs: dict[str, int] = {}
        self._crc_bad: set[str] = set()
        try:
            zf = zipfile.ZipFile(path, "r")
        except zipfile.BadZipFile as exc:
            raise StoreError(f"{path}: not a complete zip file (truncated or not a zip: {exc})") from None
        except FileNotFoundError:
            raise MissingFileError(f"{path}: no such file") from None
        except (NotImplementedError, ValueError, EOFError, OverflowError) as exc:  # mangled directory fields
            raise StoreError(f"{path}: not a readable zip file ({exc})") from None
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_FILES:
                raise UntrustedStoreError(f"{path}: more than {MAX_FILES} members")
            archive_size = path.stat().st_size
            with open(path, "rb") as f:
                for info in infos:
                    self._add(info, f.fileno(), archive_size)

    def _add(self, info: zipfile.ZipInfo, fd: int, archive_size: int) -> None:
        where = str(self.path)
        name = info.filename
        mode = info.external_attr >> 16
        if info.create_system == 3 and mode and stat.S_ISLNK(mode):
            raise UntrustedStoreError(f"{where}: member {name!r} is a symbolic link; refusing it")
        if name.endswith("/"):  # a directory entry (zip -r writes them): holds nothing
            check_member_name(name.rstrip("/"), where)
            if info.file_size:
                raise UntrustedStoreError(f"{where}: directory member {name!r} has data")
            return
        check_member_name(name, where)
        if info.create_system == 3 and stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: type not recorded
            raise UntrustedStoreError(f"{where}: member {name!r} is not a regular file; refusing it")
        if info.flag_bits & 0x1:
            raise UntrustedStoreError(f"{where}: member {name!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise UntrustedStoreError(f"{where}: member {name!r} is compressed; stores travel as uncompressed "
                                      f"zips (make one with dvsprep pack)")
        if info.file_size > MAX_FILE_BYTES:
            raise UntrustedStoreError(f"{where}: member {name!r} declares {info.file_size} bytes")
        if name in self._spans:
            raise UntrustedStoreError(f"{where}: member {name!r} appears twice")
        if not 0 <= info.header_offset <= archive_size - _ZIP_LOCAL_HEADER.size:
            raise StoreError(f"{where}: member {name!r} lies outside the archive (truncated or corrupt zip)")
        head = os.pread(fd, _ZIP_LOCAL_HEADER.size, info.header_offset)
        if len(head) != _ZIP_LOCAL_HEADER.size or head[:4] != _ZIP_LOCAL_SIG:
            raise StoreError(f"{where}: member {name!r} has no local header (truncated or corrupt zip)")
        fields = _ZIP_LOCAL_HEADER.unpack(head)
        flags, n_name, n_extra = fields[2], fields[-2], fields[-1]
        local = os.pread(fd, n_name, info.header_offset + _ZIP_LOCAL_HEADER.size)
        try:
            local_name = local.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            local_name = None
        if local_name != info.orig_filename:  # zipfile (and so zarr) refuses such a member
            raise StoreError(f"{where}: member {name!r} has another name in its local header (corrupt zip)")
        offset = info.header_offset + _ZIP_LOCAL_HEADER.size + n_name + n_extra
        if offset + info.file_size > archive_size:
            raise StoreError(f"{where}: member {name!r} runs past the end of the archive (truncated)")
        self._spans[name] = FileSpan(self.path, offset, info.file_size)
        self._crcs[name] = info.CRC

    def sha256(self, name: str) -> tuple[str, int]:
        digest, n, crc = self._hash(name, crc=True)
        self._note_crc(name, crc)
        return digest, n

    def sha256_of(self, name: str, data: bytes) -> str:
        self._note_crc(name, zlib.crc32(data))
        return hashlib.sha256(data).hexdigest()

    def _note_crc(self, name: str, crc: int) -> None:
        if crc != self._crcs.get(name, crc):
            self._crc_bad.add(name)
        else:
            self._crc_bad.discard(name)

    def crc_differs(self, name: str) -> bool:
        return name in self._crc_bad

    def names(self) -> dict[str, int]:
        return {k: v.size for k, v in self._spans.items()}

    def span(self, name: str) -> FileSpan | None:
        return self._spans.get(name)

    def stamps(self) -> dict[str, tuple[int, int, int, int, int]]:
        return {"": stamp_path(self.path)}

    def zarr_store(self) -> Any:
        from zarr.storage import ZipStore

        return ZipStore(self.path, mode="r", read_only=True)


def open_store_files(path: str | os.PathLike) -> StoreFiles:
    """The files of a store directory or `.zip`. MissingFileError when absent."""
    path = Path(path)
    if path.is_dir():
        return DirFiles(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such frame store")
    if not is_zip_path(path):
        raise StoreError(f"{path}: not a frame store (a directory or a .zip)")
    return ZipFiles(path)


def parse_manifest(data: bytes, where: str) -> dict:
    """A directory manifest, checked entry by entry: {"format", "kind", "files": {name: {sha256, size}}}."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise UntrustedStoreError(f"{where}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreError(f"{where}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise StoreError(f"{where}: {MANIFEST_NAME} is not a dvsprep manifest (format {fmt!r})")
    files = manifest.get("files")
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise StoreError(f"{where}: {MANIFEST_NAME} has no valid file list")
    for name, entry in files.items():
        check_member_name(name, f"{where}: {MANIFEST_NAME}")
        if name == MANIFEST_NAME:
            raise UntrustedStoreError(f"{where}: {MANIFEST_NAME} lists itself")
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not _HEX64.fullmatch(entry["sha256"]) or type(entry.get("size")) is not int
                or not 0 <= entry["size"] <= MAX_FILE_BYTES):
            raise StoreError(f"{where}: {MANIFEST_NAME} entry {name!r} is not {{sha256, size}}")
    return manifest


def read_json(files: StoreFiles, name: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A bounded JSON document from the store; StoreError naming it when unreadable."""
    data = files.read(name, max_bytes)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreError(f"{files.path}: {name} is not valid JSON (cannot open as a zarr v3 group: {exc})") from None


def check_file(files: StoreFiles, name: str, want: dict, present: dict[str, int],
               keep: bool = False) -> tuple[tuple[str, str, str] | None, bytes | None]:
    """(problem or None, its bytes when `keep` and it matches) of one file listed in a manifest
    with entry `want`: "missing", or "corrupt" (size, sha256, a zip's CRC-32). Reads it once:
    streamed, or whole when `keep`."""
    if name not in present:
        return ("missing", name, "listed in the manifest, not in the store"), None
    if present[name] != want["size"]:
        return ("corrupt", name, f"{present[name]} bytes, manifest says {want['size']}"), None
    data = files.read(name, want["size"]) if keep else None
    digest = files.sha256_of(name, data) if data is not None else files.sha256(name)[0]
    if digest != want["sha256"]:
        return ("corrupt", name, "sha256 differs from the manifest"), None
    if files.crc_differs(name):
        return ("corrupt", name, "the zip's CRC-32 of this member does not match its bytes"), None
    return None, data


def iter_problems_against(files: StoreFiles, manifest: dict) -> Iterator[tuple[str, str, str]]:
    """(kind, name, detail) for every file that differs from `manifest`: "corrupt", "missing"
    or "extra". Reads every listed file once."""
    listed = manifest["files"]
    present = files.names()
    for name in sorted(listed):
        problem, _ = check_file(files, name, listed[name], present)
        if problem is not None:
            yield problem
    for name in sorted(set(present) - set(listed) - {MANIFEST_NAME}):
        yield "extra", name, "not in the manifest"
