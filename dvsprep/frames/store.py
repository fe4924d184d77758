"""Frame stores: chunked zarr v3 directories holding [N, T, 2, H, W] integer frames per split.

Layout (``frames_T<T>_<split_by>.zarr``)::

    zarr.json                 root group; attributes describe the store (see `store_attributes`)
    train/frames              [N, T, 2, H, W] uint8|uint16, inner chunk = one sample, sharded
    train/label               [N] uint8
    train/recording           [N] variable-length UTF-8 strings
    train/row, t_start, t_end, n_events
    test/...                  same
    manifest.json             sha256 of every other file, written last; its hash = store fingerprint

Stores are written through the output protocol (`dvsprep.atomic.publishing`): a locked temporary
sibling directory, renamed into place when complete.
Reading goes through `open_frame_store`, which takes a directory, a `.zip` (`dvsprep pack`) or an
http(s) URL of either (downloaded once into a local cache, see `dvsprep.frames.remote`). Every store is
treated as untrusted: `dvsprep.frames.check` checks its metadata against `dvsprep.frames.schema`
before zarr opens it, and verifies it in full unless a verified-marker says it was (`dvsprep.integrity.trust`).
A sample is read straight from its shard (a file, or a zip member by offset) with one pread and one
bounded decompress, and the metadata arrays are decoded without zarr (both in `frames_check`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import numpy as np

from . import schema
from ..integrity import trust
from ..atomic import Publication, check_output, publishing
from .integrate import check_params
from .files import DirFiles, StoreFiles, open_store_files
from .check import (
    Layout,
    _fast_codec,
    _ShardReader,
    check_layout,
    check_meta_content,
    full_report,
    read_meta_arrays,
)

from .. import __version__
from ..constants import (
    FRAMES_FORMAT,
    FRAME_AXES,
    N_CLASSES,
    N_POLARITIES,
    SENSOR_SIZE,
    SPLITS,
)
from ..errors import IntegrityError, StoreError
from ..integrity import dir_manifest, stamp_path, write_dir_manifest

if TYPE_CHECKING:
    import zarr

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


# ----------------------------------------------------------------------------- writing


def zarr_module() -> Any:
    """zarr, imported on first use: its import takes 0.2-0.4 s, which `dvsprep frames` spends
    while its workers frame (they never need it) and commands that open no array never pay."""
    import zarr
    import zarr.codecs
    import zarr.storage

    return zarr


def make_codec(spec: Mapping[str, Any]) -> Any:
    """zarr v3 bytes->bytes codec from a small spec: {"name": "zstd", "level": 3},
    {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"} or {"name": "gzip", "level": 6}."""
    zarr = zarr_module()
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
    group = create_frames_layout(root, T=T, sizes=sizes, dtype=dtype, codec=codec, shard_samples=shard_samples)
    create_meta_arrays(group, sizes)
    return group


def create_frames_layout(
    root: Path,
    *,
    T: int,
    sizes: Mapping[str, int],
    dtype: np.dtype,
    codec: Mapping[str, Any],
    shard_samples: int,
) -> zarr.Group:
    """The root group, a group per split and its (empty) frames array: all that the frame
    writers need, so `dvsprep frames` starts them before it creates the metadata arrays."""
    zarr = zarr_module()
    group = zarr.open_group(zarr.storage.LocalStore(root), mode="w", zarr_format=3)
    for name, n in sizes.items():
        create_frames_array(group.create_group(name), n=n, T=T, dtype=dtype, codec=codec,
                            shard_samples=shard_samples)
    return group


def create_meta_arrays(group: zarr.Group, sizes: Mapping[str, int]) -> None:
    """The (empty) per-sample metadata arrays of each split (`create_frames_layout` made the
    groups): their zarr.json documents, written as zarr 3 writes them for
    ``create_array(field, shape=(n,), chunks=(max(1, n),), dtype, fill_value=0 (strings: ""),
    compressors=ZstdCodec(level=3))``, byte for byte (a test compares the two), without zarr's
    per-array machinery (a tenth of a second of CPU the frame step's workers need)."""
    root = Path(group.store.root)
    for name, n in sizes.items():
        for field in _META_FIELDS:
            folder = root / name / field
            folder.mkdir()
            (folder / "zarr.json").write_bytes(json.dumps(_meta_doc(field, n), indent=2).encode())


def _meta_doc(field: str, n: int) -> dict[str, Any]:
    """The zarr.json document of a metadata array of n samples, in one chunk."""
    if field == "recording":
        data_type, fill, first = "string", "", {"name": "vlen-utf8", "configuration": {}}
    else:
        dt = _META_DTYPES[field]
        data_type, fill = dt.name, 0
        first = {"name": "bytes"} if dt.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    return {"shape": [n], "data_type": data_type,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, n)]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": fill, "codecs": [first, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}],
            "attributes": {}, "zarr_format": 3, "node_type": "array", "storage_transformers": []}


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


_NO_CHUNK = np.iinfo(np.uint64).max  # a shard index entry for an absent inner chunk


def stored_chunk_codec(array_meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The blosc configuration of the inner chunks (samples) of a frames array whose metadata
    (its zarr.json) is `array_meta`, when it is laid out as `create_frames_array` lays it out
    with a blosc codec (the default); else None."""
    try:
        (shard_codec,) = array_meta["codecs"]
        cfg = shard_codec["configuration"]
        inner, index = cfg["codecs"], cfg["index_codecs"]
        if (shard_codec["name"] != "sharding_indexed" or cfg["chunk_shape"][0] != 1
                or cfg.get("index_location", "end") != "end" or len(inner) != 2
                or inner[0]["name"] != "bytes" or inner[0].get("configuration", {}).get("endian", "little") != "little"
                or inner[1]["name"] != "blosc"
                or [c["name"] for c in index] != ["bytes", "crc32c"]
                or index[0].get("configuration", {}).get("endian", "little") != "little"):
            return None
        return dict(inner[1]["configuration"])
    except (KeyError, TypeError, ValueError):
        return None


def chunk_codec(codec: Mapping[str, Any], dtype: np.dtype) -> dict[str, Any] | None:
    """The blosc configuration zarr stores for the samples of a frames array that
    `create_frames_array` makes with `codec` and `dtype` (what `stored_chunk_codec` then reads
    back), or None for a codec other than blosc. Known before the array exists."""
    if codec["name"] != "blosc":
        return None
    return {"typesize": np.dtype(dtype).itemsize, "cname": codec.get("cname", "lz4"),
            "clevel": int(codec.get("clevel", 5)), "shuffle": codec.get("shuffle", "bitshuffle"), "blocksize": 0}


def chunk_encoder(config: Mapping[str, Any]) -> Callable[[np.ndarray], bytes]:
    """Encoder of one sample with a blosc `config` (as `stored_chunk_codec` returns it): the
    numcodecs codec that zarr's BloscCodec builds from the same configuration."""
    import numcodecs

    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config["shuffle"]]
    codec = numcodecs.Blosc.from_config({"cname": config["cname"], "clevel": int(config["clevel"]),
                                         "shuffle": shuffle, "blocksize": int(config.get("blocksize", 0)),
                                         "typesize": int(config["typesize"])})
    return lambda sample: codec.encode(np.ascontiguousarray(sample, dtype=sample.dtype.newbyteorder("<")))


def write_frames_shard(array_dir: Path, shard_samples: int, s: int, chunks: list[bytes]) -> None:
    """Write shard `s` of the frames array at `array_dir` from its samples (inner chunks) encoded
    by `chunk_encoder`, all of them, in order, as zarr's sharding codec writes it: the chunks,
    then (offset, nbytes) per inner chunk as little-endian uint64 (absent: both 2**64-1, only
    past the array's end) and the crc32c of that index. Byte for byte what zarr writes, without
    zarr's per-chunk machinery (it took half the frame step's writing time)."""
    import google_crc32c

    index = np.full((shard_samples, 2), _NO_CHUNK, dtype="<u8")
    sizes = np.array([len(c) for c in chunks], dtype=np.uint64)
    index[: len(chunks), 0] = np.cumsum(sizes) - sizes
    index[: len(chunks), 1] = sizes
    raw = index.tobytes()
    path = array_dir / "c" / str(s) / "0" / "0" / "0" / "0"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"".join(chunks) + raw + google_crc32c.value(raw).to_bytes(4, "little"))


def writing_every_chunk() -> Any:
    """zarr config under which all-zero chunks and shards are written too: a store holds a
    file for every chunk it declares, so readers never have to trust an absent chunk to mean
    zeros (a crafted store could otherwise declare a million samples in a few bytes)."""
    return zarr_module().config.set({"array.write_empty_chunks": True})


def write_metadata(group: zarr.Group, split: str, meta: Mapping[str, Any]) -> None:
    """Write the per-sample metadata arrays of one split (all of length N; `create_meta_arrays`
    made them): each one chunk, written as zarr writes it (`_meta_chunk_bytes`)."""
    root = Path(group.store.root)
    n = group[split]["frames"].shape[0]
    for field in _META_FIELDS:
        if field not in meta:
            raise StoreError(f"split {split!r}: missing {field!r}")
    # never write what the readers would refuse
    check_meta_content(f"split {split!r}", split, {f: (list(meta[f]) if f == "recording" else np.asarray(meta[f]))
                                                   for f in _META_FIELDS})
    for field in _META_FIELDS:
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
            (root / split / field / "c").mkdir()
            (root / split / field / "c" / "0").write_bytes(_meta_chunk_bytes(field, arr))


def _meta_chunk_bytes(field: str, arr: np.ndarray) -> bytes:
    """The one chunk of a metadata array as zarr writes it (`_meta_doc`'s codecs): the values'
    little-endian bytes (strings: vlen-utf8), compressed by zstd at level 3."""
    import numcodecs

    if field == "recording":
        raw = numcodecs.VLenUTF8().encode(np.asarray([str(r) for r in arr], dtype=object))
    else:
        raw = np.ascontiguousarray(arr, dtype=_META_DTYPES[field].newbyteorder("<")).tobytes()
    return numcodecs.Zstd(level=3).encode(raw)


def finish_store(tmp: Path) -> str:
    """Write the manifest of the store being built in `tmp` (last, once every other file is
    complete); returns the fingerprint. `publishing` then renames it into place."""
    return write_dir_manifest(tmp, dir_manifest(tmp, kind="frames"))


def vouch_store(publication: Publication, fingerprint: str, *, encoded: bool = False) -> None:
    """The writer of the store (a directory or a packed .zip) that `publication` publishes vouches
    for it (every file was hashed into its manifest as it was written or copied): the
    verified-marker is recorded once it is in place, so the next open on this machine does not
    hash it again (`trust.record_written`). A writer that `encoded` the samples itself also
    records that this content decodes (`trust.record_decoded`), so a full verification of it, or
    of a copy, only hashes; a copier (pack, unpack) learns nothing new about the content."""
    final = publication.final
    trust.vouch(publication, "frames", fingerprint,
                lambda: {"": stamp_path(final)} if final.is_file() else DirFiles(final).stamps())
    if encoded:
        publication.on_published(lambda: trust.record_decoded("frames", fingerprint))


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
    final = check_output(path, "frame store", force=force, kind="dir")
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
    publication = publishing(final, "frame store", force=force, kind="dir")
    with publication as tmp:
        sizes = {name: int(np.asarray(sp["frames"]).shape[0]) for name, sp in splits.items()}
        group = create_layout(tmp, T=T, sizes=sizes, dtype=dtype, codec=codec, shard_samples=shard)
        counts = {}
        for name, sp in splits.items():
            fr = np.asarray(sp["frames"]).astype(dtype, copy=False)
            if fr.shape[0]:
                with writing_every_chunk():
                    group[name]["frames"][:] = fr
            write_metadata(group, name, sp)
            counts[name] = split_counts(np.asarray(sp["label"]))
        group.update_attributes(store_attributes(T=T, split_by=split_by, dtype=dtype, counts=counts,
                                                 events_fingerprint=events_fingerprint, codec=codec,
                                                 shard_samples=shard))
        fp = finish_store(tmp)
        vouch_store(publication, fp, encoded=True)
    return fp


# ----------------------------------------------------------------------------- opened stores


class FrameSplit:
    """One split of a frame store. Frames are read lazily per sample (`sp[i]`) or all at once
    (`load_all`); metadata arrays are decoded and checked when the split is opened."""

    def __init__(self, store: "FrameStore", name: str):
        self._store = store
        self.name = name
        n = int(store.attrs["splits"][name]["n_samples"])
        meta = read_meta_arrays(store._files, name, store.array_meta[name], n)
        check_meta_content(str(store.path), name, meta, store.attrs["splits"][name].get("per_class"))
        try:
            self.frames: zarr.Array = store._group[name]["frames"]
        except Exception as exc:  # zarr raises assorted errors for broken metadata
            raise StoreError(f"{store.path}: cannot open split {name!r} ({exc})") from None
        if self.frames.shape[0] != n:
            raise StoreError(f"{store.path}: {name}/frames holds {self.frames.shape[0]} samples, not {n}")
        self.labels = meta["label"].astype(np.int64)
        self.recordings: list[str] = meta["recording"]
        self.rows = meta["row"]
        self.t_start = meta["t_start"]
        self.t_end = meta["t_end"]
        self.n_events = meta["n_events"]
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
        try:
            return np.asarray(self.frames[i])
        except Exception as exc:  # zarr / zipfile raise assorted errors on corrupt chunks
            raise StoreError(f"{self._store.path}: cannot read {self.name} sample {i} ({exc})") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Bytes of all frames of the split in memory (what `load_all` allocates)."""
        return int(np.prod(self.frames.shape, dtype=np.int64)) * self.frames.dtype.itemsize

    def load_all(self) -> np.ndarray:
        """All frames of the split: [N, T, 2, H, W] in the store dtype."""
        if len(self) == 0:
            return np.zeros(self.frames.shape, dtype=self.frames.dtype)
        if self._reader is not None:
            out = np.empty(self.frames.shape, dtype=self.frames.dtype)
            for i in range(len(self)):
                out[i] = self._reader.read(i)
            return out
        try:
            return np.asarray(self.frames[:])
        except Exception as exc:
            raise StoreError(f"{self._store.path}: cannot read the {self.name} frames ({exc})") from None

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


def ensure_verified(files: StoreFiles, layout: Layout, source: str, *, force: bool = False) -> None:
    """Refuse (IntegrityError) a store that does not verify in full: every file against the
    manifest and every array decoded (`frames_check.full_report`, as `dvsprep verify`). Cheap when a verified-marker for
    this fingerprint and these exact files exists (`dvsprep.integrity.trust`); `force` ignores markers."""
    def verify() -> tuple[str, list[tuple[str, str, str]]]:
        report = full_report(files, layout, source)
        return report.headline(), [(p.kind, p.name, p.detail) for p in report.problems]

    trust.ensure_verified("frames", files.path, layout.fingerprint, files.stamps(), source, verify, force=force)


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

    Nothing is used before it is checked: the metadata against what dvsprep writes
    (`check_layout`), then the whole store as `dvsprep verify` does (every file's sha256, every
    array decoded) unless a verified-marker says this exact store was verified on this machine
    (`dvsprep.integrity.trust`; `verify=True` verifies regardless: every file hashed again, but
    the samples of content already decoded on this machine, which includes what this machine's
    writer encoded, are not decoded twice; `dvsprep verify --decode` decodes them). `expected_fingerprint` (the
    full sha256 or a prefix of at least 12 hex digits) must match the store's manifest hash.
    Raises MissingFileError when absent, StoreError (UntrustedStoreError, IntegrityError) when
    the store is incomplete, corrupt, or not one dvsprep would write.
    """
    from . import remote

    source = str(path)
    if remote.is_url(source):
        remote.check_url(source)
        local, pinned = remote.fetch_store(source, cache_dir=cache_dir, refresh=refresh)
        expected_fingerprint = expected_fingerprint or pinned
    else:
        local = Path(path)
    try:
        files = open_store_files(local)
        layout = check_layout(files)
    except StoreError as exc:
        msg = str(exc)
        if remote.is_url(source) and msg.startswith(str(local)):  # name the URL, not its copy in the cache
            raise type(exc)(source + msg[len(str(local)):]) from None
        raise
    if expected_fingerprint:
        check_fingerprint(layout.fingerprint, expected_fingerprint, source)
    ensure_verified(files, layout, source, force=verify)
    try:
        group = zarr_module().open_group(files.zarr_store(), mode="r", zarr_format=3)
    except Exception as exc:  # zarr raises assorted errors for broken metadata
        raise StoreError(f"{files.path}: cannot open as a zarr v3 group: {exc}") from exc
    return FrameStore(path=Path(files.path), attrs=layout.attrs, fingerprint=layout.fingerprint, _group=group,
                      _files=files, manifest=layout.manifest, array_meta=layout.metas, source=source)


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
