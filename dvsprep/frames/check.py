"""Checking a frame store below zarr, trusting nothing in it: the reads and checks that
`dvsprep.frames.store` (opening a store) and `dvsprep.verify` (reporting on one) share.

- `check_layout`: everything checked without reading a chunk: the root group and its attributes,
  the manifest, every group and array document against `dvsprep.frames.schema`, and that the
  manifest lists exactly the documents and chunks those declare.
- `read_meta_arrays`, `check_meta_content`: the metadata arrays decoded by us (every zstd frame
  bounded, vlen-utf8 strings parsed) and the values the readers rely on.
- `_ShardReader`: one sample read straight from its shard (a file, or a zip member by offset)
  with one pread and one bounded decompress; the index and every size checked first.
- `content_problems`, `verify_files`, `full_report`: the full verification of a store, every file
  against its manifest and every array read back as the readers read it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import schema
from ..constants import N_CLASSES, SPLITS, recording_name_ok
from .files import MAX_MANIFEST_BYTES, StoreFiles, check_file, parse_manifest, read_json
from ..errors import MissingFileError, StoreError, UntrustedStoreError
from ..integrity import MANIFEST_NAME, sha256_bytes, trust
from ..integrity import Problem, VerifyReport


# ----------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """A store's structure, checked against what dvsprep writes (see `check_layout`).

    metas: array metadata by split and array; fingerprint: sha256 of manifest.json."""

    attrs: dict[str, Any]
    manifest: dict[str, Any]
    fingerprint: str
    metas: dict[str, dict[str, dict[str, Any]]]


def _store_layout(files: StoreFiles, attrs: Mapping[str, Any], listed: int) -> tuple[dict, set[str], set[str]]:
    """Check every group and array document against the schema; returns (array metadata by
    split and array, names the manifest may list, names it must list: every document and every
    chunk the arrays declare). `listed`: files in the manifest; a store declaring more chunks
    is refused before their names are even made."""
    where = str(files.path)
    T, dtype = int(attrs["T"]), str(attrs["dtype"])
    metas: dict[str, dict[str, dict[str, Any]]] = {}
    declared = 0
    required = {"zarr.json"}
    for split in SPLITS:
        if split not in attrs["splits"]:
            continue
        n = int(attrs["splits"][split]["n_samples"])
        schema.check_group_meta(f"{where}: {split}/zarr.json", read_json(files, f"{split}/zarr.json"))
        required.add(f"{split}/zarr.json")
        metas[split] = {}
        for field in schema.ARRAYS:
            key = f"{split}/{field}/zarr.json"
            try:
                meta = read_json(files, key)
            except MissingFileError:
                raise StoreError(f"{where}: split {split!r} has no {field} array") from None
            info = schema.check_array_meta(f"{where}: {key}", meta, field=field, n=n, T=T, dtype=dtype)
            metas[split][field] = meta
            required.add(key)
            declared += -(-n // info["chunk"])
            if declared > listed:
                raise StoreError(f"{where}: declares more chunks ({declared} and counting, for {n} {split} "
                                 f"samples) than its manifest lists files ({listed})")
            required.update(schema.chunk_keys(split, field, n, info["chunk"]))
    return metas, set(required), required


def check_layout(files: StoreFiles) -> Layout:
    """Everything about a store that is checked without reading its chunks: the root group and
    its attributes, the manifest (parsed with bounds, kind "frames"), every group and array
    document against `frames_schema`, and that the manifest lists exactly the documents and
    chunks those declare (no implicit fill-value chunks). StoreError naming the store."""
    where = files.path
    if files.span(MANIFEST_NAME) is None:
        raise StoreError(f"{where}: incomplete frame store (no {MANIFEST_NAME})")
    if files.span("zarr.json") is None:
        raise StoreError(f"{where}: not a zarr v3 group (no zarr.json)")
    root = read_json(files, "zarr.json")
    schema.check_group_meta(f"{where}: zarr.json", {k: v for k, v in root.items() if k != "attributes"}
                            if isinstance(root, dict) else root)
    attrs = root.get("attributes")
    schema.check_root_attrs(str(where), attrs)
    raw_manifest = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw_manifest, str(where))
    if manifest.get("kind") != "frames":
        raise StoreError(f"{where}: manifest is for a {str(manifest.get('kind'))[:40]!r} store, not a frame store")
    metas, allowed, required = _store_layout(files, attrs, len(manifest["files"]))
    schema.check_manifest_names(str(where), manifest["files"], allowed, required)
    return Layout(attrs=dict(attrs), manifest=manifest, fingerprint=sha256_bytes(raw_manifest), metas=metas)


def content_problems(files: StoreFiles, layout: Layout, skip: set[str] = frozenset(),
                     checked: Mapping[str, str] | None = None, *,
                     frames: bool = True) -> list[tuple[str, str, str]]:
    """(kind, name, detail) for every array that does not read back as the readers need it:
    the metadata arrays decoded and checked (`check_meta_content`), every frames shard's index
    and every sample decoded (not with `frames=False`: content already decoded on this machine,
    `trust.is_decoded`). Files named in `skip` (already known corrupt) are not decoded, nor
    shards in `checked` (decoded while hashed, `scan_files`: their problem, or "")."""
    checked = checked or {}
    problems: list[tuple[str, str, str]] = []
    where = str(files.path)
    for split, metas in layout.metas.items():
        n = int(layout.attrs["splits"][split]["n_samples"])
        if not any(name.startswith(f"{split}/") and "/frames/" not in name for name in skip):
            try:
                meta = read_meta_arrays(files, split, metas, n)
                check_meta_content(where, split, meta, layout.attrs["splits"][split].get("per_class"))
            except StoreError as exc:
                problems.append(("invalid", f"{split} metadata", _detail(exc, where)))
        decoder = _fast_codec(metas["frames"])
        if decoder is None or not n or not frames:
            continue
        reader = _ShardReader(files, split, metas["frames"], decoder)
        try:
            for s in range(-(-n // reader.shard)):
                name = reader._shard_name(s)
                if name in skip or name in checked:
                    if checked.get(name):
                        problems.append(("invalid", name, checked[name]))
                    continue
                try:
                    index = reader.index(s)
                    last = min(reader.shard, n - s * reader.shard)
                    if (index[last:, 0] != np.iinfo(np.uint64).max).any():
                        raise StoreError(f"{reader._where(s)}: holds chunks beyond the split's {n} samples")
                    for i in range(s * reader.shard, s * reader.shard + last):
                        reader.read(i)
                except StoreError as exc:
                    problems.append(("invalid", name, _detail(exc, where)))
        finally:
            reader.close()
    return problems


def _detail(exc: Exception, where: str) -> str:
    """An error message without the store path it starts with (the report names the store)."""
    msg = str(exc)
    for prefix in (f"{where}/", f"{where}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


# ----------------------------------------------------------------------------- shards


def _fast_codec(meta: Mapping[str, Any]) -> Any | None:
    """A numcodecs decoder for the inner chunks of a sharded frames array (metadata already
    checked by `frames_schema.check_array_meta`), or None (then reads go through zarr)."""
    import numcodecs

    cfg = meta["codecs"][0]["configuration"]
    if cfg["chunk_shape"][0] != 1:
        return None
    name, c = cfg["codecs"][1]["name"], cfg["codecs"][1].get("configuration", {})
    if name == "zstd":
        return numcodecs.Zstd(level=c.get("level", 0))
    if name == "gzip":
        return numcodecs.GZip(level=c.get("level", 6))
    if name == "blosc":
        return numcodecs.Blosc()  # blosc frames are self-describing for decoding
    return None


def _blosc_nbytes(buf: bytes) -> int:
    """Uncompressed size from a blosc frame header (bytes 4..8, little-endian), or -1 when the
    header's compressed size (bytes 12..16) is not the frame's length."""
    if len(buf) < 16 or int.from_bytes(buf[12:16], "little") != len(buf):
        return -1
    return int.from_bytes(buf[4:8], "little")


def _gzip_nbytes(buf: bytes | memoryview) -> int:
    """Uncompressed size from a gzip stream's trailer (ISIZE: its last 4 bytes, little-endian,
    the size mod 2^32; a sample is at most 256 MiB: T <= 4096 of uint16), or -1 when the stream
    is shorter than a gzip header and trailer.
    numcodecs' GZip decodes into `out` without saying how much it wrote: a stream that decodes
    short would leave the rest of `out` as it was, so its declared size is checked first (and
    gzip itself checks the trailer against what the stream decodes to)."""
    if len(buf) < 18:
        return -1
    return int.from_bytes(bytes(buf[-4:]), "little")


class _ShardReader:
    """Reads single inner chunks (samples) straight from shard files or zip members.

    Shard layout (zarr v3 sharding, index at the end): the encoded chunks, then per inner chunk
    (offset, nbytes) as little-endian uint64, then a crc32c of that index. Every (offset, nbytes)
    is bounded by the shard's size, and the decoded size a chunk declares must be one sample's,
    before anything is read or allocated. Every sample of the split must be stored (dvsprep
    writes all-zero samples too): an absent shard or inner chunk is an error, not zeros.
    """

    def __init__(self, files: StoreFiles, split: str, meta: Mapping[str, Any], decoder: Any):
        self.files = files
        self.split = split
        self.shard = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.shape = tuple(meta["shape"])
        self.sample_shape = tuple(self.shape[1:])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.decoder = decoder
        self.n_inner = self.shard
        self._indexes: dict[int, np.ndarray] = {}
        self._codec = decoder.codec_id
        self._fds: dict[int, tuple[int, int, int]] = {}  # shard -> (fd, offset, size); pread is fork-safe

    def _shard_name(self, s: int) -> str:
        return f"{self.split}/frames/c/{s}/0/0/0/0"

    def _where(self, s: int) -> str:
        return f"{self.files.path}/{self._shard_name(s)}" if self.files.kind == "dir" else \
            f"{self.files.path}: {self._shard_name(s)}"

    def _open(self, s: int) -> tuple[int, int, int]:
        if s not in self._fds:
            span = self.files.span(self._shard_name(s))
            if span is None:
                raise StoreError(f"{self._where(s)}: shard missing (the store declares its samples)")
            self._fds[s] = (os.open(span.path, os.O_RDONLY), span.offset, span.size)
        return self._fds[s]

    def index(self, s: int) -> np.ndarray:
        """The (offset, nbytes) of every inner chunk of shard s, [n_inner, 2] uint64, checked."""
        if s in self._indexes:
            return self._indexes[s]
        fd, base, total = self._open(s)
        size = 16 * self.n_inner + 4
        raw = os.pread(fd, size, base + total - size) if total >= size else b""
        self._indexes[s] = self._parse_index(s, raw, total)
        return self._indexes[s]

    def _parse_index(self, s: int, raw: bytes, total: int) -> np.ndarray:
        import google_crc32c

        size = 16 * self.n_inner + 4
        if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise StoreError(f"{self._where(s)}: corrupt shard index")
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.n_inner, 2)
        empty = index[:, 0] == np.iinfo(np.uint64).max
        ends = index[:, 0].astype(object) + index[:, 1].astype(object)
        if any(not e and end > total - size for e, end in zip(empty.tolist(), ends.tolist())):
            raise StoreError(f"{self._where(s)}: shard index points past the end of the shard")
        return index

    def read(self, i: int) -> np.ndarray:
        s, k = divmod(i, self.shard)
        index = self.index(s)
        if index[k, 0] == np.iinfo(np.uint64).max:
            raise StoreError(f"{self._where(s)}: sample {i} is absent from its shard")
        off, n = int(index[k, 0]), int(index[k, 1])
        fd, base, _ = self._fds[s]
        buf = os.pread(fd, n, base + off)
        if len(buf) != n:
            raise StoreError(f"{self._where(s)}: truncated shard")
        return self._decode(s, i, buf)

    def check_shard(self, s: int, data: bytes | memoryview, n: int) -> None:
        """Everything `content_problems` checks of shard s (of a split of n samples), on the
        shard's bytes already in memory: its index, no chunks beyond the split, every sample
        decoded. StoreError naming the shard."""
        size = 16 * self.n_inner + 4
        index = self._parse_index(s, bytes(data[-size:]) if len(data) >= size else b"", len(data))
        last = min(self.shard, n - s * self.shard)
        if (index[last:, 0] != np.iinfo(np.uint64).max).any():
            raise StoreError(f"{self._where(s)}: holds chunks beyond the split's {n} samples")
        out = np.empty(self.sample_shape, dtype=self.dtype)
        for k in range(last):
            if index[k, 0] == np.iinfo(np.uint64).max:
                raise StoreError(f"{self._where(s)}: sample {s * self.shard + k} is absent from its shard")
            off, nb = int(index[k, 0]), int(index[k, 1])
            self._decode(s, s * self.shard + k, data[off:off + nb], out)

    def _decode(self, s: int, i: int, buf: bytes | memoryview, out: np.ndarray | None = None) -> np.ndarray:
        """Sample i from its encoded bytes, every declared size checked before decoding."""
        out = np.empty(self.sample_shape, dtype=self.dtype) if out is None else out
        declared = _blosc_nbytes(buf) if self._codec == "blosc" else \
            schema.zstd_content_size(buf) if self._codec == "zstd" else _gzip_nbytes(buf)
        if declared != out.nbytes:
            raise StoreError(f"{self._where(s)}: sample {i} has the wrong decoded size")
        try:
            got = self.decoder.decode(buf, out=out)
        except Exception as exc:  # codec libraries raise assorted types on corrupt input
            raise StoreError(f"{self._where(s)}: cannot decode sample {i}: {exc}") from exc
        if np.asarray(got).nbytes != out.nbytes:
            raise StoreError(f"{self._where(s)}: sample {i} decodes to the wrong size")
        return out

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1][0])

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass


# ----------------------------------------------------------------------------- metadata arrays


def _meta_chunk(files: StoreFiles, key: str, field: str, chunk: int, where: str) -> np.ndarray | list[str]:
    """One metadata chunk decoded by us, not by zarr: the zstd frame must declare exactly the
    chunk's size (strings: at most their bound), and every byte must be accounted for."""
    import numcodecs

    bound = schema.max_decoded_bytes(field, chunk)
    try:
        data = files.read(key, bound + (bound >> 7) + 1024)  # zstd's worst-case expansion is smaller
    except MissingFileError:
        raise StoreError(f"{where}: {key} is missing (the store declares it)") from None
    size = schema.zstd_content_size(data)
    exact = None if field == "recording" else chunk * schema.META_DTYPES[field].itemsize
    if size is None or size > bound or (exact is not None and size != exact):
        want = f"{exact}" if exact is not None else f"at most {bound}"
        raise UntrustedStoreError(f"{where}: {key} declares {size if size is not None else 'no'} decoded "
                                  f"bytes ({want} expected)")
    try:
        raw = bytes(numcodecs.Zstd().decode(data))
    except Exception as exc:  # zstd raises RuntimeError (and others) on corrupt frames
        raise StoreError(f"{where}: {key}: cannot decompress ({exc})") from None
    if len(raw) != size:
        raise StoreError(f"{where}: {key} decompresses to {len(raw)} bytes, its header says {size}")
    if field != "recording":
        return np.frombuffer(raw, dtype=schema.META_DTYPES[field]).copy()
    return _vlen_utf8(raw, chunk, f"{where}: {key}")


def _vlen_utf8(raw: bytes, count: int, where: str) -> list[str]:
    """zarr's vlen-utf8 chunk: uint32 count, then per item uint32 length + UTF-8 bytes."""
    if len(raw) < 4 or int.from_bytes(raw[:4], "little") != count:
        raise StoreError(f"{where}: string chunk does not hold {count} items")
    out, pos, end = [], 4, len(raw)
    for _ in range(count):
        if pos + 4 > end:
            raise StoreError(f"{where}: string chunk is cut short")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        if n > schema.MAX_NAME_BYTES or pos + n > end:
            raise StoreError(f"{where}: string of {n} bytes (at most {schema.MAX_NAME_BYTES}, within the chunk)")
        try:
            out.append(raw[pos:pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise StoreError(f"{where}: a recording name is not valid UTF-8") from None
        pos += n
    if pos != end:
        raise StoreError(f"{where}: {end - pos} bytes after the last string")
    return out


def read_meta_arrays(files: StoreFiles, split: str, metas: Mapping[str, Mapping[str, Any]],
                     n: int, fields: tuple[str, ...] = schema.META_FIELDS) -> dict[str, Any]:
    """The metadata arrays of one split, each of length n: label/row/t_start/t_end/n_events
    as numpy arrays in the store dtypes, recording as a list of str. StoreError naming the
    chunk when one is missing or does not decode to what its metadata says."""
    where = str(files.path)
    out: dict[str, Any] = {}
    for field in fields:
        chunk = int(metas[field]["chunk_grid"]["configuration"]["chunk_shape"][0])
        parts = [_meta_chunk(files, key, field, chunk, where) for key in schema.chunk_keys(split, field, n, chunk)]
        if field == "recording":
            out[field] = [s for part in parts for s in part][:n]
        else:
            out[field] = np.concatenate(parts)[:n] if parts else np.zeros(0, schema.META_DTYPES[field])
    return out


def check_meta_content(where: str, split: str, meta: Mapping[str, Any], per_class: Any = None) -> None:
    """What the readers rely on: labels 0..10, rows >= 0, t_start <= t_end, n_events >= 0,
    recording names that are plain file stems, and the split's per-class counts (when given)."""
    labels = np.asarray(meta["label"])
    n = labels.shape[0]
    for field in schema.META_FIELDS:
        if len(meta[field]) != n:
            raise StoreError(f"{where}: {split}/{field} has {len(meta[field])} entries, label has {n}")
    if n and (int(labels.max()) >= N_CLASSES or int(labels.min()) < 0):
        bad_label = int(labels.max()) if int(labels.max()) >= N_CLASSES else int(labels.min())
        raise StoreError(f"{where}: {split}/label holds {bad_label}, outside 0..{N_CLASSES - 1}")
    if n and int(np.min(meta["row"])) < 0:
        raise StoreError(f"{where}: {split}/row holds {int(np.min(meta['row']))}, a negative row")
    if n and int(np.min(meta["n_events"])) < 0:
        raise StoreError(f"{where}: {split}/n_events holds a negative count")
    bad = np.flatnonzero(np.asarray(meta["t_start"]) > np.asarray(meta["t_end"]))
    if bad.size:
        raise StoreError(f"{where}: {split} sample {int(bad[0])} ends (t_end) before it starts (t_start)")
    for i, name in enumerate(meta["recording"]):
        if not recording_name_ok(name):
            raise StoreError(f"{where}: {split}/recording {i} is {name[:40]!r}, not a recording name")
    if per_class is not None:
        counts = np.bincount(labels.astype(np.int64), minlength=N_CLASSES).tolist() if n else [0] * N_CLASSES
        if per_class != counts:
            raise StoreError(f"{where}: the store's attributes count {per_class!r} samples per class in {split}, "
                             f"its labels {counts}")


# ----------------------------------------------------------------------------- verification


def verify_files(files: StoreFiles, manifest: dict, path: str) -> VerifyReport:
    """Compare every file of a store with its manifest (reads every file once); a file that
    cannot be read is a problem of its own."""
    return scan_files(files, manifest, path)[0]


# A frames shard up to this size is read whole once: hashed, then decoded from memory.
_IN_MEMORY = 256 << 20


def scan_files(files: StoreFiles, manifest: dict, path: str, layout: Layout | None = None,
               jobs: int | None = None) -> tuple[VerifyReport, dict[str, str]]:
    """Every file against the manifest, on `jobs` threads (default: CPUs; hashlib, zlib and the
    codecs release the GIL), each read once: with a `layout`, a frames shard that hashes right
    is decoded from the same bytes (`_ShardReader.check_shard`; pass no layout to hash only).
    Returns the report of the files and {shard: its content problem, or ""} for the shards so
    checked (`content_problems`)."""
    raw = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    report = VerifyReport(path=path, kind="frames", checked=len(manifest["files"]), fingerprint=sha256_bytes(raw))
    listed, present = manifest["files"], files.names()
    shards = _shard_plan(files, layout) if layout is not None else {}
    where = str(files.path)

    def one(name: str) -> tuple[tuple[str, str, str] | None, str | None]:
        """(the file's problem, the shard's content problem or "" when decoded here)."""
        want = listed[name]
        plan = shards.get(name) if want["size"] <= _IN_MEMORY else None
        problem, data = check_file(files, name, want, present, keep=plan is not None)
        if problem is not None or plan is None:
            return problem, None
        reader, s, n = plan
        try:
            reader.check_shard(s, data, n)
        except StoreError as exc:
            return None, _detail(exc, where)
        return None, ""

    checked: dict[str, str] = {}
    names = sorted(listed)
    threads = max(1, jobs or os.cpu_count() or 1)
    try:
        # one thread: no pool (handing each file to a worker costs more than the gain)
        with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
            for name, (problem, shard) in zip(names, pool.map(one, names) if pool else map(one, names)):
                if problem is not None:
                    report.problems.append(Problem(*problem))
                if shard is not None:
                    checked[name] = shard
        for name in sorted(set(present) - set(listed) - {MANIFEST_NAME}):
            report.problems.append(Problem("extra", name, "not in the manifest"))
    except (OSError, StoreError) as exc:
        report.problems.append(Problem("invalid", "files", f"cannot read the store's files ({exc})"))
    return report, checked


def _shard_plan(files: StoreFiles, layout: Layout) -> dict[str, tuple[_ShardReader, int, int]]:
    """{shard file: (reader, shard number, samples in its split)} of every frames shard that
    `content_problems` would decode."""
    out = {}
    for split, metas in layout.metas.items():
        n = int(layout.attrs["splits"][split]["n_samples"])
        decoder = _fast_codec(metas["frames"])
        if decoder is None or not n:
            continue
        reader = _ShardReader(files, split, metas["frames"], decoder)
        for s in range(-(-n // reader.shard)):
            out[reader._shard_name(s)] = (reader, s, n)
    return out


def full_report(files: StoreFiles, layout: Layout, source: str, jobs: int | None = None, *,
                decode: bool = False) -> VerifyReport:
    """Every file against the manifest, then (for the files that hash right) every array read
    back as the readers read it (`content_problems`); shards are decoded as they are hashed
    (`scan_files`), on `jobs` threads (default: CPUs). The samples are not decoded when this
    content (its fingerprint) was decoded on this machine before (`decoded_before`), unless
    `decode`; a store whose every sample was decoded without a problem is recorded so."""
    frames = decode or not decoded_before(layout)
    report, checked = scan_files(files, layout.manifest, source, layout if frames else None, jobs)
    skip = {p.name for p in report.problems}
    for kind, name, detail in content_problems(files, layout, skip, checked, frames=frames):
        report.problems.append(Problem(kind, name, detail))
    note_decoding(report, layout, frames)
    return report


def decoded_before(layout: Layout) -> bool:
    """Whether every sample of this store's content (its fingerprint) was decoded on this
    machine before (`trust.is_decoded`): a verification that hashes every file against the
    manifest then has nothing left to learn from decoding them."""
    return trust.is_decoded("frames", layout.fingerprint)


def note_decoding(report: VerifyReport, layout: Layout, decoded: bool) -> None:
    """After a verification: record content whose every sample was just decoded without a
    problem (`trust.record_decoded`), drop the record of content that failed to decode, and say
    in the report when the samples were not decoded."""
    if not decoded:
        report.notes.append("samples not decoded: this content (same fingerprint) was decoded on this machine "
                            "before, and every file hashes as its manifest says (--decode decodes them again)")
    elif report.ok:
        trust.record_decoded("frames", layout.fingerprint)
    elif any(p.kind == "invalid" and "/frames/" in p.name for p in report.problems):
        trust.forget_decoded("frames", layout.fingerprint)
