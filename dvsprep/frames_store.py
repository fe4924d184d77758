"""Frame stores: chunked zarr v3 directories holding [N, T, 2, H, W] integer frames per split.

Layout (``frames_T<T>_<split_by>.zarr``)::

    zarr.json                 root group; attributes describe the store (see `store_attributes`)
    train/frames              [N, T, 2, H, W] uint8|uint16, inner chunk = one sample, sharded
    train/label               [N] uint8
    train/recording           [N] variable-length UTF-8 strings
    train/row, t_start, t_end, n_events
    test/...                  same
    manifest.json             sha256 of every other file, written last; its hash = store fingerprint

Stores are written to a temporary sibling directory and renamed into place when complete.
Reading goes through `open_frame_store`, which takes a directory, a `.zip` (`dvsprep pack`) or an
http(s) URL of either (downloaded once into a local cache, see `dvsprep.remote`). Every store is
treated as untrusted: its metadata is checked against `dvsprep.frames_schema` before zarr opens
it. A sample is read straight from its shard (a file, or a zip member by offset) with one pread
and one bounded decompress; zarr reads the small metadata arrays.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import zarr
import zarr.codecs
from zarr.storage import LocalStore

from . import frames_schema as schema
from .atomic import publish_dir, remove_path, temp_sibling
from .framing import check_params
from .container import MAX_MANIFEST_BYTES, StoreFiles, open_store_files, parse_manifest, read_json

from . import __version__
from .constants import (
    FRAMES_FORMAT,
    FRAME_AXES,
    N_CLASSES,
    N_POLARITIES,
    ROW_DTYPE,
    SENSOR_SIZE,
    SPLITS,
    T_DTYPE,
)
from .errors import IntegrityError, MissingFileError, StoreError, StoreExistsError
from .manifest import MANIFEST_NAME, dir_manifest, sha256_bytes, write_dir_manifest

log = logging.getLogger(__name__)

FRAME_DTYPES = (np.dtype("u1"), np.dtype("u2"))
N_EVENTS_DTYPE = schema.N_EVENTS_DTYPE
# Raw bytes per shard we aim for: few hundred files for the real release, shards small enough
# that one worker holds a shard of uint16 frames comfortably.
SHARD_TARGET_BYTES = 16 << 20
# Chosen by measurement (benchmarks/bench_frames.py codecs): see the README table.
# blosc lz4 + bitshuffle decodes fastest (the loader reads every sample every epoch), encodes
# fastest, and blosc is a core zarr v3 codec; zstd stores are ~20-30% smaller but decode slower.
DEFAULT_CODEC: dict[str, Any] = {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}

_META_FIELDS = schema.META_FIELDS
_META_DTYPES = schema.META_DTYPES


# ----------------------------------------------------------------------------- naming, output


def frame_store_name(T: int, split_by: str) -> str:
    """Canonical store directory name, e.g. ``frames_T16_number.zarr``."""
    return f"frames_T{T}_{split_by}.zarr"


def samples_per_shard(T: int, dtype: np.dtype | str) -> int:
    """Samples per shard so a shard holds about `SHARD_TARGET_BYTES` of raw frames."""
    sample_bytes = T * N_POLARITIES * SENSOR_SIZE[0] * SENSOR_SIZE[1] * np.dtype(dtype).itemsize
    return int(max(1, min(256, SHARD_TARGET_BYTES // sample_bytes)))


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing output unless `force`; returns the path."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise StoreExistsError(f"{path}: already exists (use --force to replace it)")
    if not path.parent.is_dir():
        raise MissingFileError(f"{path.parent}: output directory does not exist")
    return path


def publish(tmp: Path, final: Path, force: bool) -> None:
    """Move the completed store `tmp` to `final`; the old store (force) is removed only after."""
    if (final.exists() or final.is_symlink()) and not force:
        raise StoreExistsError(f"{final}: already exists (use --force to replace it)")
    publish_dir(tmp, final)


# ----------------------------------------------------------------------------- writing


def make_codec(spec: Mapping[str, Any]) -> Any:
    """zarr v3 bytes->bytes codec from a small spec: {"name": "zstd", "level": 3},
    {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"} or {"name": "gzip", "level": 6}."""
    name = spec["name"]
    if name == "zstd":
        return zarr.codecs.ZstdCodec(level=int(spec.get("level", 3)))
    if name == "blosc":
        # typesize is left to zarr, which takes it from the array dtype.
        return zarr.codecs.BloscCodec(
            cname=spec.get("cname", "lz4"),
            clevel=int(spec.get("clevel", 5)),
            shuffle=spec.get("shuffle", "bitshuffle"),
        )
    if name == "gzip":
        return zarr.codecs.GzipCodec(level=int(spec.get("level", 6)))
    raise StoreError(f"unknown codec {name!r}")


def store_attributes(
    *,
    T: int,
    split_by: str,
    dtype: np.dtype,
    counts: Mapping[str, Mapping[str, Any]],
    events_fingerprint: str,
    codec: Mapping[str, Any],
    shard_samples: int,
) -> dict[str, Any]:
    """Root attributes of a frame store."""
    return {
        "format": FRAMES_FORMAT,
        "tool": "dvsprep",
        "tool_version": __version__,
        "T": int(T),
        "split_by": split_by,
        "sensor_size": list(SENSOR_SIZE),
        "axes": list(FRAME_AXES),
        "dtype": np.dtype(dtype).name,
        "splits": {k: dict(v) for k, v in counts.items()},
        "events_fingerprint": events_fingerprint,
        "codec": dict(codec),
        "shard_samples": int(shard_samples),
    }


def split_counts(labels: np.ndarray) -> dict[str, Any]:
    """{"n_samples": N, "per_class": [count of label 0, ..., label 10]}."""
    labels = np.asarray(labels)
    per_class = np.bincount(labels.astype(np.int64), minlength=N_CLASSES) if labels.size else np.zeros(N_CLASSES, int)
    return {"n_samples": int(labels.size), "per_class": [int(c) for c in per_class]}


def create_layout(
    root: Path,
    *,
    T: int,
    sizes: Mapping[str, int],
    dtype: np.dtype,
    codec: Mapping[str, Any],
    shard_samples: int,
) -> zarr.Group:
    """Create the (empty) groups and arrays of a store under `root`; returns the root group."""
    H, W = SENSOR_SIZE
    group = zarr.open_group(LocalStore(root), mode="w", zarr_format=3)
    for name, n in sizes.items():
        g = group.create_group(name)
        create_frames_array(g, n=n, T=T, dtype=dtype, codec=codec, shard_samples=shard_samples)
        meta_chunk = max(1, n)
        for field, dt in _META_DTYPES.items():
            g.create_array(field, shape=(n,), chunks=(meta_chunk,), dtype=dt, fill_value=0,
                           compressors=zarr.codecs.ZstdCodec(level=3))
        g.create_array("recording", shape=(n,), chunks=(meta_chunk,), dtype=str,
                       compressors=zarr.codecs.ZstdCodec(level=3))
    return group


def create_frames_array(
    group: zarr.Group, *, n: int, T: int, dtype: np.dtype, codec: Mapping[str, Any], shard_samples: int,
    name: str = "frames",
) -> zarr.Array:
    H, W = SENSOR_SIZE
    sample = (1, T, N_POLARITIES, H, W)
    return group.create_array(
        name,
        shape=(n, T, N_POLARITIES, H, W),
        chunks=sample,
        shards=(max(1, min(shard_samples, max(n, 1))), T, N_POLARITIES, H, W),
        dtype=dtype,
        fill_value=0,
        compressors=make_codec(codec),
        dimension_names=list(FRAME_AXES),
    )


def write_metadata(group: zarr.Group, split: str, meta: Mapping[str, Any]) -> None:
    """Write the per-sample metadata arrays of one split (all of length N)."""
    g = group[split]
    n = g["frames"].shape[0]
    for field in _META_FIELDS:
        if field not in meta:
            raise StoreError(f"split {split!r}: missing {field!r}")
        values = meta[field]
        if field == "recording":
            arr = np.array([str(r) for r in values], dtype=np.dtypes.StringDType())
        else:
            arr = np.asarray(values)
            if arr.size and np.issubdtype(arr.dtype, np.integer):
                info = np.iinfo(_META_DTYPES[field])
                if arr.min() < info.min or arr.max() > info.max:
                    raise StoreError(f"split {split!r}: {field} values do not fit {_META_DTYPES[field].name}")
            arr = arr.astype(_META_DTYPES[field])
        if arr.shape != (n,):
            raise StoreError(f"split {split!r}: {field} has shape {arr.shape}, expected ({n},)")
        if n:
            g[field][:] = arr


def finish_store(tmp: Path, final: Path, force: bool) -> str:
    """Write the manifest (last) and rename the store into place; returns the fingerprint."""
    fp = write_dir_manifest(tmp, dir_manifest(tmp, kind="frames"))
    publish(tmp, final, force)
    return fp


def write_frame_store_from_arrays(
    path: str | os.PathLike,
    *,
    T: int,
    split_by: str = "number",
    splits: Mapping[str, Mapping[str, Any]],
    events_fingerprint: str = "",
    force: bool = False,
    codec: Mapping[str, Any] | None = None,
) -> str:
    """Write a frame store from in-memory arrays; returns the store fingerprint.

    splits: {"train": {"frames": uint8|uint16 [N, T, 2, H, W], "label": [N], "recording": [N] str,
    "row": [N], "t_start": [N], "t_end": [N], "n_events": [N]}, "test": {...}}.
    """
    T, split_by = check_params(T, split_by)
    final = check_output(path, force)
    codec = dict(codec or DEFAULT_CODEC)
    H, W = SENSOR_SIZE
    dtypes = set()
    for name, sp in splits.items():
        if name not in SPLITS:
            raise StoreError(f"unknown split {name!r}; expected {', '.join(SPLITS)}")
        fr = np.asarray(sp["frames"])
        if fr.ndim != 5 or fr.shape[1:] != (T, N_POLARITIES, H, W):
            raise StoreError(f"split {name!r}: frames shape {fr.shape}, expected [N, {T}, {N_POLARITIES}, {H}, {W}]")
        if fr.dtype not in FRAME_DTYPES:
            raise StoreError(f"split {name!r}: frames dtype {fr.dtype}, expected uint8 or uint16")
        dtypes.add(fr.dtype)
    dtype = max(dtypes, key=lambda d: d.itemsize) if dtypes else FRAME_DTYPES[0]
    shard = samples_per_shard(T, dtype)
    tmp = temp_sibling(final)
    try:
        sizes = {name: int(np.asarray(sp["frames"]).shape[0]) for name, sp in splits.items()}
        group = create_layout(tmp, T=T, sizes=sizes, dtype=dtype, codec=codec, shard_samples=shard)
        counts = {}
        for name, sp in splits.items():
            fr = np.asarray(sp["frames"]).astype(dtype, copy=False)
            if fr.shape[0]:
                group[name]["frames"][:] = fr
            write_metadata(group, name, sp)
            counts[name] = split_counts(np.asarray(sp["label"]))
        group.attrs.update(store_attributes(T=T, split_by=split_by, dtype=dtype, counts=counts,
                                            events_fingerprint=events_fingerprint, codec=codec,
                                            shard_samples=shard))
        return finish_store(tmp, final, force)
    except BaseException:
        remove_path(tmp)
        raise


# ----------------------------------------------------------------------------- reading


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
    """Uncompressed size from a blosc frame header (bytes 4..8, little-endian)."""
    return int.from_bytes(buf[4:8], "little") if len(buf) >= 16 else -1


class _ShardReader:
    """Reads single inner chunks (samples) straight from shard files or zip members.

    Shard layout (zarr v3 sharding, index at the end): the encoded chunks, then per inner chunk
    (offset, nbytes) as little-endian uint64, then a crc32c of that index. Every (offset, nbytes)
    is bounded by the shard's size, and the decoded size a chunk declares must be one sample's,
    before anything is read or allocated.
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
        self._indexes: dict[int, np.ndarray | None] = {}
        self._codec = decoder.codec_id
        self._fds: dict[int, tuple[int, int, int]] = {}  # shard -> (fd, offset, size); pread is fork-safe

    def _shard_name(self, s: int) -> str:
        return f"{self.split}/frames/c/{s}/0/0/0/0"

    def _where(self, s: int) -> str:
        return f"{self.files.path}/{self._shard_name(s)}" if self.files.kind == "dir" else \
            f"{self.files.path}: {self._shard_name(s)}"

    def _open(self, s: int) -> tuple[int, int, int] | None:
        if s not in self._fds:
            span = self.files.span(self._shard_name(s))
            if span is None:
                return None
            self._fds[s] = (os.open(span.path, os.O_RDONLY), span.offset, span.size)
        return self._fds[s]

    def _index(self, s: int) -> np.ndarray | None:
        if s in self._indexes:
            return self._indexes[s]
        import google_crc32c

        opened = self._open(s)
        size = 16 * self.n_inner + 4
        if opened is None:
            index = None  # shard never written: every sample is the fill value (all zeros)
        else:
            fd, base, total = opened
            raw = os.pread(fd, size, base + total - size) if total >= size else b""
            if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise StoreError(f"{self._where(s)}: corrupt shard index")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.n_inner, 2)
            empty = index[:, 0] == np.iinfo(np.uint64).max
            ends = index[:, 0].astype(object) + index[:, 1].astype(object)
            if any(not e and end > total - size for e, end in zip(empty.tolist(), ends.tolist())):
                raise StoreError(f"{self._where(s)}: shard index points past the end of the shard")
        self._indexes[s] = index
        return index

    def read(self, i: int) -> np.ndarray:
        s, k = divmod(i, self.shard)
        index = self._index(s)
        out = np.zeros(self.sample_shape, dtype=self.dtype)
        if index is None or index[k, 0] == np.iinfo(np.uint64).max:
            return out
        off, n = int(index[k, 0]), int(index[k, 1])
        fd, base, _ = self._fds[s]
        buf = os.pread(fd, n, base + off)
        if len(buf) != n:
            raise StoreError(f"{self._where(s)}: truncated shard")
        declared = _blosc_nbytes(buf) if self._codec == "blosc" else \
            schema.zstd_content_size(buf) if self._codec == "zstd" else out.nbytes
        if declared != out.nbytes:
            raise StoreError(f"{self._where(s)}: sample {i} has the wrong decoded size")
        try:
            self.decoder.decode(buf, out=out)
        except Exception as exc:  # codec libraries raise assorted types on corrupt input
            raise StoreError(f"{self._where(s)}: cannot decode sample {i}: {exc}") from exc
        return out

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1][0])

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass


class FrameSplit:
    """One split of a frame store. Frames are read lazily per sample (`sp[i]`) or all at once
    (`load_all`); metadata arrays are loaded when the split is opened."""

    def __init__(self, store: "FrameStore", name: str):
        self._store = store
        self.name = name
        store._check_meta_chunks(name)
        try:
            g = store._group[name]
            self.frames: zarr.Array = g["frames"]
        except (KeyError, ValueError) as exc:
            raise StoreError(f"{store.path}: cannot open split {name!r} ({exc})") from None
        n = self.frames.shape[0]
        self.labels = np.asarray(g["label"][:]).astype(np.int64) if n else np.zeros(0, np.int64)
        recs = g["recording"][:] if n else np.zeros(0, dtype=str)
        self.recordings: list[str] = [str(r) for r in recs]
        self.rows = np.asarray(g["row"][:]) if n else np.zeros(0, ROW_DTYPE)
        self.t_start = np.asarray(g["t_start"][:]) if n else np.zeros(0, T_DTYPE)
        self.t_end = np.asarray(g["t_end"][:]) if n else np.zeros(0, T_DTYPE)
        self.n_events = np.asarray(g["n_events"][:]) if n else np.zeros(0, N_EVENTS_DTYPE)
        for field in ("labels", "rows", "t_start", "t_end", "n_events"):
            if getattr(self, field).shape != (n,):
                raise StoreError(f"{store.path}: {name}/{field} does not have {n} entries")
        if len(self.recordings) != n:
            raise StoreError(f"{store.path}: {name}/recording does not have {n} entries")
        if n and int(self.labels.max()) >= N_CLASSES:
            raise StoreError(f"{store.path}: {name}/label holds {int(self.labels.max())}, outside 0..{N_CLASSES - 1}")
        self._reader = store._make_reader(name)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def ids(self) -> list[tuple[str, int]]:
        """Sample identities (recording stem, row in its label csv), in store order."""
        return list(zip(self.recordings, (int(r) for r in self.rows)))

    def __getitem__(self, i: int) -> np.ndarray:
        """Frames of sample i: [T, 2, H, W] in the store dtype."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for split {self.name!r} of {n} samples")
        if self._reader is not None:
            return self._reader.read(i)
        return np.asarray(self.frames[i])

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def load_all(self) -> np.ndarray:
        """All frames of the split: [N, T, 2, H, W] in the store dtype."""
        if len(self) == 0:
            return np.zeros(self.frames.shape, dtype=self.frames.dtype)
        if self._reader is not None:
            out = np.empty(self.frames.shape, dtype=self.frames.dtype)
            for i in range(len(self)):
                out[i] = self._reader.read(i)
            return out
        return np.asarray(self.frames[:])

    def __getstate__(self) -> dict:
        # Picklable for DataLoader workers: reopen from the path on the other side.
        return {"path": str(self._store.path), "name": self.name}

    def __setstate__(self, state: dict) -> None:
        other = open_frame_store(state["path"]).split(state["name"])
        self.__dict__.update(other.__dict__)


@dataclass
class FrameStore:
    """An opened frame store (see `open_frame_store`).

    path: the local store (directory or .zip; for a URL, its copy in the cache); source: what was
    opened (path or URL); fingerprint: sha256 of the store's manifest.json."""

    path: Path
    attrs: dict[str, Any]
    fingerprint: str
    _group: zarr.Group
    _files: StoreFiles
    manifest: dict[str, Any]
    array_meta: dict[str, dict[str, dict[str, Any]]]
    source: str = ""

    @property
    def T(self) -> int:
        return int(self.attrs["T"])

    @property
    def split_by(self) -> str:
        return str(self.attrs["split_by"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

    @property
    def events_fingerprint(self) -> str:
        return str(self.attrs.get("events_fingerprint", ""))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in self.attrs["splits"])

    def split(self, name: str) -> FrameSplit:
        if name not in self.splits:
            raise StoreError(f"{self.path}: no split {name!r} (has {', '.join(self.splits) or 'none'})")
        return FrameSplit(self, name)

    @property
    def kind(self) -> str:
        """"dir" or "zip"."""
        return self._files.kind

    def samples_per_shard(self, split: str) -> int:
        return int(self.array_meta[split]["frames"]["chunk_grid"]["configuration"]["chunk_shape"][0])

    def _make_reader(self, split: str) -> _ShardReader | None:
        meta = self.array_meta[split]["frames"]
        decoder = _fast_codec(meta)
        return None if decoder is None else _ShardReader(self._files, split, meta, decoder)

    def _check_meta_chunks(self, split: str) -> None:
        """Bound the decoded size every metadata chunk declares before zarr decodes it."""
        listed = self.manifest["files"]
        for field in _META_FIELDS:
            chunk = int(self.array_meta[split][field]["chunk_grid"]["configuration"]["chunk_shape"][0])
            bound = schema.max_decoded_bytes(field, chunk)
            for key in schema.chunk_keys(split, field, int(self.attrs["splits"][split]["n_samples"]), chunk):
                if key in listed and self._files.span(key) is not None:
                    schema.check_meta_chunk(str(self.path), key, self._files.head(key, 32), bound)


def _check_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    schema.check_root_attrs(str(path), attrs)


def _store_layout(files: StoreFiles, attrs: Mapping[str, Any]) -> tuple[dict, set[str], set[str]]:
    """Check every group and array document against the schema; returns (array metadata by
    split and array, names the manifest may list, names it must list)."""
    where = str(files.path)
    T, dtype = int(attrs["T"]), str(attrs["dtype"])
    metas: dict[str, dict[str, dict[str, Any]]] = {}
    required = {"zarr.json"}
    allowed = {"zarr.json"}
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
            allowed.update(schema.chunk_keys(split, field, n, info["chunk"]))
    return metas, allowed | required, required


def open_frame_store(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    verify: bool = False,
    expected_fingerprint: str | None = None,
    refresh: bool = False,
) -> FrameStore:
    """Open a frame store: a directory, a `.zip` made by `dvsprep pack`, or an http(s) URL of
    either (fetched once into `cache_dir`, default `$DVSPREP_CACHE` or ~/.cache/dvsprep, and
    checked file by file against its manifest as it arrives; `refresh` fetches it again).

    Metadata is checked against what dvsprep writes before zarr reads any of it. `verify` also
    recomputes the sha256 of every file (IntegrityError listing what differs);
    `expected_fingerprint` (the full sha256 or a prefix of at least 12 hex digits) must match the
    store's manifest hash. Raises MissingFileError when absent, StoreError (UntrustedStoreError,
    IntegrityError) when the store is incomplete, corrupt, or not one dvsprep would write.
    """
    from . import remote

    source = str(path)
    if remote.is_url(source):
        local, pinned = remote.fetch_store(source, cache_dir=cache_dir, refresh=refresh)
        expected_fingerprint = expected_fingerprint or pinned
    else:
        local = Path(path)
    files = open_store_files(local)
    where = files.path
    root = read_json(files, "zarr.json") if files.span("zarr.json") is not None else None
    if files.span(MANIFEST_NAME) is None:
        raise StoreError(f"{where}: incomplete frame store (no {MANIFEST_NAME})")
    if root is None:
        raise StoreError(f"{where}: not a zarr v3 group (no zarr.json)")
    schema.check_group_meta(f"{where}: zarr.json", {k: v for k, v in root.items() if k != "attributes"}
                            if isinstance(root, dict) else root)
    attrs = root.get("attributes")
    _check_attrs(where, attrs)
    raw_manifest = files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    manifest = parse_manifest(raw_manifest, str(where))
    fingerprint = sha256_bytes(raw_manifest)
    if manifest.get("kind") != "frames":
        raise StoreError(f"{where}: manifest is for a {manifest.get('kind')!r} store, not a frame store")
    metas, allowed, required = _store_layout(files, attrs)
    schema.check_manifest_names(str(where), manifest["files"], allowed, required)
    if expected_fingerprint:
        check_fingerprint(fingerprint, expected_fingerprint, source)
    if verify:
        from .verify import verify_files

        report = verify_files(files, manifest, source)
        if not report.ok:
            listed = "; ".join(f"{p.kind} {p.name}" for p in report.problems[:5])
            raise IntegrityError(f"{source}: {report.headline()}: {listed}"
                                 f"{' ...' if len(report.problems) > 5 else ''} (dvsprep verify lists them)")
    try:
        group = zarr.open_group(files.zarr_store(), mode="r", zarr_format=3)
    except Exception as exc:  # zarr raises assorted errors for broken metadata
        raise StoreError(f"{where}: cannot open as a zarr v3 group: {exc}") from exc
    return FrameStore(path=Path(where), attrs=dict(attrs), fingerprint=fingerprint, _group=group, _files=files,
                      manifest=manifest, array_meta=metas, source=source)


def check_fingerprint(store: "FrameStore | str", expected: str | None = None, what: str = "") -> str:
    """The store's fingerprint (a FrameStore or the fingerprint itself), checked against
    `expected` (full sha256 or a prefix of >= 12 hex digits) when given; IntegrityError if it differs."""
    fp = store.fingerprint if isinstance(store, FrameStore) else str(store)
    what = what or (store.source if isinstance(store, FrameStore) else "store")
    if expected:
        exp = expected.strip().lower()
        if len(exp) < 12 or any(c not in "0123456789abcdef" for c in exp):
            raise StoreError(f"{what}: expected fingerprint {expected!r} is not 12 to 64 hex digits")
        if not fp.startswith(exp):
            raise IntegrityError(f"{what}: fingerprint {fp[:16]}... differs from the expected {exp[:16]}...")
    return fp


def describe_frame_store(path: str | os.PathLike) -> dict[str, Any]:
    """What `dvsprep info` prints for a frame store."""
    store = open_frame_store(path)
    return {
        "kind": "frames",
        "path": str(store.path),
        "format": store.attrs["format"],
        "T": store.T,
        "split_by": store.split_by,
        "dtype": store.dtype.name,
        "sensor_size": list(store.attrs["sensor_size"]),
        "splits": {s: store.attrs["splits"][s] for s in store.splits},
        "codec": store.attrs.get("codec"),
        "size_bytes": store._files.total_size() if store.kind == "dir" else store.path.stat().st_size,
        "source": store.source,
        "fingerprint": store.fingerprint,
        "events_fingerprint": store.events_fingerprint,
    }
