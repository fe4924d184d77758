"""events.h5: per-sample events of both splits in one HDF5 file, with an embedded manifest.

Layout (groups `train`, `test`): t int64, x/y/p uint8 (events of all samples, in sample order),
offsets int64 [N+1], label uint8 [N], recording str [N], row int32 [N], t_start/t_end int64 [N].
Root attributes: format, tool_version, sensor_size, recordings (JSON), n_invalid_dropped,
manifest (JSON: sha256 of every dataset's values and of the other attributes, and for t/x/y/p
also their stored digest, `dvsprep.events.stored`), fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..integrity import trust
from ..constants import (
    EVENTS_FORMAT,
    LABEL_DTYPE,
    OFFSET_DTYPE,
    P_DTYPE,
    ROW_DTYPE,
    SENSOR_SIZE,
    SPLITS,
    T_DTYPE,
    XY_DTYPE,
    recording_name_ok,
)
from ..atomic import Publication
from ..errors import DvsprepError, MissingFileError, ResourceLimitError, StoreError
from ..inputs import InputKind, kind_of
from ..integrity import MANIFEST_FORMAT, canonical_json, fingerprint
from . import stored as stored_digest

EVENT_FIELDS = {"t": T_DTYPE, "x": XY_DTYPE, "y": XY_DTYPE, "p": P_DTYPE}
SAMPLE_FIELDS = {
    "label": LABEL_DTYPE,
    "row": ROW_DTYPE,
    "t_start": T_DTYPE,
    "t_end": T_DTYPE,
}
STR_DTYPE = h5py.string_dtype("utf-8")
EVENT_CHUNK = 1 << 16
# Filters built into libhdf5 (any h5py reads them), chosen by measurement (README, "events.h5
# filters"): scale-offset packs t to the bits each chunk needs and p to one bit, and reads 1.5x
# faster than lzf+shuffle; x and y hold 7 bits of entropy in 8, so compressing them gains ~5%
# and costs 10x in read speed.
EVENT_FILTERS: dict[str, dict[str, Any]] = {
    "t": {"scaleoffset": 0},
    "x": {},
    "y": {},
    "p": {"scaleoffset": 0},
}
FILTERS: dict[str, Any] = {"compression": "lzf", "shuffle": True}  # small per-sample datasets
_MANIFEST_ATTRS = ("manifest", "fingerprint")


def _str_digest(values: list[str]) -> str:
    return hashlib.sha256(canonical_json(list(values))).hexdigest()


class EventsWriter:
    """Streams samples into a temporary events.h5 and publishes it on `finish`.

    Hashes are updated as data is appended so the manifest costs no second read. `path` is
    published through the output protocol (`dvsprep.atomic.Publication`: locked, replaced only
    with `force`, the temporary removed on `abort`); with ``publish=False`` the file is written at
    `path` as given, which is then someone's temporary (`convert` writes into the one of its
    `publishing`, which it holds for the whole conversion).
    """

    def __init__(self, path: str | os.PathLike, force: bool = True, *, publish: bool = True):
        self.path = Path(path)
        self._publication = Publication(self.path, "events.h5", force=force) if publish else None
        self._closed = False
        self._fd = -1
        # .events.h5.tmp-<pid>-<hex>: removable once we are gone
        self.tmp = self._publication.begin() if self._publication is not None else self.path
        # No chunk cache: every write reaches the file at once, so a full disk raises OSError
        # (ENOSPC) from the write itself; with a cache, HDF5 fails later while freeing objects,
        # where Python can only print "Exception ignored" (and it crashed). Costs no speed here:
        # appends are whole recordings.
        try:
            self.f = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            if self._publication is not None:
                self._publication.abort()
            raise
        self._hash: dict[str, Any] = {}
        # hashlib releases the GIL on large buffers: hashing in one background thread (in
        # append order) overlaps with the HDF5 writes, which hold it.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events-sha256")
        self._hash_jobs: list[Future] = []
        self._n_events = {s: 0 for s in SPLITS}
        self._samples: dict[str, dict[str, list]] = {
            s: {k: [] for k in (*SAMPLE_FIELDS, "recording", "n")} for s in SPLITS
        }
        # The stored digests (`dvsprep.events.stored`) are fed, on the same thread, with every
        # chunk once it is final: chunks below the last partial one are never written again.
        self._stored: dict[str, stored_digest.StoredDigest] = {}
        for s in SPLITS:
            g = self.f.create_group(s)
            for name, dt in EVENT_FIELDS.items():
                ds = g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(EVENT_CHUNK,),
                                      **EVENT_FILTERS[name])
                self._hash[f"{s}/{name}"] = hashlib.sha256()
                self._stored[f"{s}/{name}"] = stored_digest.StoredDigest(ds)
        self._fd = os.open(self.tmp, os.O_RDONLY)

    def append(self, split: str, events: dict[str, np.ndarray], lengths: np.ndarray, meta: dict[str, Any]) -> None:
        """Append consecutive samples of `split`: events t/x/y/p [sum(lengths)], per-sample meta
        label/row/t_start/t_end [S] and recording (list of S str)."""
        g = self.f[split]
        n_new = int(np.sum(lengths))
        a = self._n_events[split]
        # The previous append's hashes finish while this one writes: at most two appends of
        # events are alive at once.
        for job in self._hash_jobs:
            job.result()
        self._hash_jobs.clear()
        for name, dt in EVENT_FIELDS.items():
            arr = np.ascontiguousarray(events[name], dtype=dt)
            if arr.shape[0] != n_new:
                raise ValueError(f"{name} has {arr.shape[0]} events, lengths sum to {n_new}")
            ds = g[name]
            ds.resize((a + n_new,))
            ds[a:] = arr
            self._hash_jobs.append(self._hasher.submit(self._hash[f"{split}/{name}"].update, arr))
            self._hash_jobs.append(self._hasher.submit(self._feed_stored, split, name, (a + n_new) // EVENT_CHUNK))
        self._n_events[split] = a + n_new
        acc = self._samples[split]
        for k in SAMPLE_FIELDS:
            acc[k].append(np.asarray(meta[k]))
        acc["recording"].extend(meta["recording"])
        acc["n"].append(np.asarray(lengths, dtype=OFFSET_DTYPE))

    def _feed_stored(self, split: str, name: str, upto: int) -> None:
        """Hash the chunks of split/name below chunk `upto` not hashed yet (in the hasher thread),
        read from the file: with no chunk cache (rdcc_nbytes=0) a chunk is there once written."""
        digest, ds = self._stored[f"{split}/{name}"], self.f[split][name]
        chunks = [stored_digest.chunk_info(ds, i) for i in range(digest.n_chunks, upto)]
        if chunks:
            digest.add(self._fd, chunks)

    def finish(self, attrs: dict[str, Any]) -> str:
        """Write per-sample datasets, attributes and the manifest; rename into place.
        Returns the fingerprint."""
        self.f.flush()
        for s in SPLITS:
            for name in EVENT_FIELDS:
                n_chunks = -(-self._n_events[s] // EVENT_CHUNK)
                self._hash_jobs.append(self._hasher.submit(self._feed_stored, s, name, n_chunks))
        self._drain_hashes()
        os.close(self._fd)
        self._fd = -1
        datasets: dict[str, dict] = {}
        for s in SPLITS:
            g = self.f[s]
            acc = self._samples[s]
            lengths = np.concatenate(acc["n"]) if acc["n"] else np.zeros(0, OFFSET_DTYPE)
            offsets = np.zeros(lengths.shape[0] + 1, dtype=OFFSET_DTYPE)
            np.cumsum(lengths, out=offsets[1:])
            cols = {"offsets": offsets}
            for k, dt in SAMPLE_FIELDS.items():
                cols[k] = (np.concatenate(acc[k]) if acc[k] else np.zeros(0)).astype(dt)
            for k, arr in cols.items():
                g.create_dataset(k, data=arr, **FILTERS if arr.size else {})
                datasets[f"{s}/{k}"] = _ds_entry(arr.dtype, arr.shape, hashlib.sha256(arr).hexdigest())
            recs = list(acc["recording"])
            g.create_dataset("recording", data=np.array(recs, dtype=object), dtype=STR_DTYPE)
            datasets[f"{s}/recording"] = _ds_entry("str", (len(recs),), _str_digest(recs))
            for name, dt in EVENT_FIELDS.items():
                datasets[f"{s}/{name}"] = {**_ds_entry(dt, (self._n_events[s],), self._hash[f"{s}/{name}"].hexdigest()),
                                           "stored": self._stored[f"{s}/{name}"].hexdigest()}
        full_attrs = {
            "format": EVENTS_FORMAT,
            "tool_version": __version__,
            "sensor_size": list(SENSOR_SIZE),
            **attrs,
        }
        for k, v in full_attrs.items():
            # Dicts travel as JSON text; lists as native HDF5 arrays.
            self.f.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
        manifest = _events_manifest(datasets, self.f.attrs)
        fp = fingerprint(manifest)
        self.f.attrs["manifest"] = canonical_json(manifest).decode("ascii")
        self.f.attrs["fingerprint"] = fp
        self.f.close()
        self._closed = True
        if self._publication is not None:
            vouch_events(self._publication, fp)
            self._publication.commit()
        return fp

    def _drain_hashes(self) -> None:
        for job in self._hash_jobs:
            job.result()
        self._hash_jobs.clear()
        self._hasher.shutdown(wait=True)

    def abort(self) -> None:
        """Drop the temporary, quietly, whatever state the file is in (a full disk included).

        The file is emptied first, so that closing it (HDF5 flushes what it holds) has room
        to write and raises nothing; then it is closed and unlinked."""
        try:
            self._hasher.shutdown(wait=True, cancel_futures=True)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if not self._closed:  # once closed, `tmp` may already be the published file's name
                try:
                    os.truncate(self.tmp, 0)
                except OSError:
                    pass
                try:
                    self.f.close()
                except Exception:  # noqa: BLE001 - the file is being thrown away
                    pass
                self.tmp.unlink(missing_ok=True)
            if self._publication is not None:
                self._publication.abort()


def vouch_events(publication: Publication, fingerprint: str) -> None:
    """The writer of the events.h5 that `publication` publishes vouches for it (its manifest was
    hashed from the arrays as they were written): the verified-marker is recorded once it is in
    place, so the next open on this machine does not hash it again (`trust.record_written`)."""
    final = publication.final
    trust.vouch(publication, "events", fingerprint, lambda: {"": trust.stamp_path(final)})


def _ds_entry(dtype: Any, shape: tuple, digest: str) -> dict:
    return {"dtype": str(np.dtype(dtype).str) if dtype != "str" else "str", "shape": list(shape), "sha256": digest}


def _events_manifest(datasets: dict[str, dict], attrs: h5py.AttributeManager) -> dict:
    """The manifest: per-dataset entries plus the sha256 of the other root attributes."""
    return {
        "format": MANIFEST_FORMAT,
        "kind": "events",
        "datasets": datasets,
        "attrs": hashlib.sha256(canonical_json(_plain_attrs(attrs))).hexdigest(),
    }


def _plain_attrs(attrs: h5py.AttributeManager) -> dict:
    out = {}
    for k in sorted(attrs):
        if k in _MANIFEST_ATTRS:
            continue
        v = attrs[k]
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


# Bounds on what an events.h5 may declare, checked before anything is read or allocated.
MAX_SAMPLES = 1_000_000
MAX_EVENTS = 1 << 40
MAX_ATTR_BYTES = 64 << 20
_ALL_FIELDS = (*EVENT_FIELDS, *SAMPLE_FIELDS, "offsets", "recording")


def _read(ds: h5py.Dataset, where: str, sl: Any = ()) -> Any:
    """ds[sl], with any HDF5 / filter failure as a StoreError naming the dataset. A range of a
    one-dimensional dataset is read with `stored.read_values` (scale-offset chunks decoded by
    numpy, several times faster than HDF5's filter)."""
    try:
        if isinstance(sl, slice) and sl.step is None and ds.ndim == 1:
            lo, hi, _ = sl.indices(ds.shape[0])
            return stored_digest.read_values(ds, lo, max(lo, hi))
        return ds[sl]
    except Exception as exc:  # h5py raises OSError, ValueError, RuntimeError... on corrupt chunks
        raise StoreError(f"{where}: cannot read {ds.name.lstrip('/')} ({str(exc).splitlines()[0][:160]})") from None


def _allocated(ds: h5py.Dataset) -> bool:
    """Whether every chunk (or the contiguous block) a dataset declares is stored: a dataset
    whose data is mostly implicit fill value would make a tiny file declare terabytes."""
    if ds.size == 0:
        return True
    if ds.chunks is not None:
        expected = 1
        for n, c in zip(ds.shape, ds.chunks):
            expected *= -(-n // c)
        return ds.id.get_num_chunks() == expected
    if h5py.check_string_dtype(ds.dtype) is not None:
        return ds.id.get_storage_size() > 0
    return ds.id.get_storage_size() >= ds.size * ds.dtype.itemsize


def check_structure(f: h5py.File, where: str) -> None:
    """Datasets, dtypes and shapes of an open events.h5 as `EventsWriter` writes them, and
    every declared size backed by stored data, before any of it is read. StoreError."""
    fmt = f.attrs.get("format")
    if fmt != EVENTS_FORMAT:
        raise StoreError(f"{where}: not a dvsprep events file (format {str(fmt)[:40]!r})")
    missing = [f"{s}/{k}" for s in SPLITS for k in _ALL_FIELDS if f"{s}/{k}" not in f]
    if missing:
        raise StoreError(f"{where}: missing datasets {', '.join(missing)}")
    for s in SPLITS:
        g = f[s]
        extra = sorted(set(g) - set(_ALL_FIELDS))
        if extra or not isinstance(g, h5py.Group):
            raise StoreError(f"{where}: {s} holds datasets dvsprep never writes ({', '.join(extra)[:80]})")
        sets = {k: g[k] for k in _ALL_FIELDS}
        for k, ds in sets.items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                raise StoreError(f"{where}: {s}/{k} is not a one-dimensional dataset")
            want = {**EVENT_FIELDS, **SAMPLE_FIELDS, "offsets": OFFSET_DTYPE}.get(k)
            if k == "recording":
                if h5py.check_string_dtype(ds.dtype) is None:
                    raise StoreError(f"{where}: {s}/recording holds {ds.dtype}, not strings")
            elif ds.dtype != want:
                raise StoreError(f"{where}: {s}/{k} holds {ds.dtype}, expected {want}")
        n_ev = sets["t"].shape[0]
        n = sets["label"].shape[0]
        if any(sets[k].shape[0] != n_ev for k in EVENT_FIELDS):
            raise StoreError(f"{where}: {s} event datasets t, x, y, p differ in length")
        if any(sets[k].shape[0] != n for k in (*SAMPLE_FIELDS, "recording")):
            raise StoreError(f"{where}: {s} per-sample datasets differ in length")
        if sets["offsets"].shape[0] != n + 1:
            raise StoreError(f"{where}: {s}/offsets has {sets['offsets'].shape[0]} entries for {n} samples")
        if n > MAX_SAMPLES or n_ev > MAX_EVENTS:
            raise ResourceLimitError(f"{where}: {s} declares {n} samples and {n_ev} events "
                                     f"(at most {MAX_SAMPLES} and {MAX_EVENTS} allowed)")
        for k, ds in sets.items():
            if not _allocated(ds):
                raise StoreError(f"{where}: {s}/{k} declares {ds.shape[0]} entries that are not stored")


_LIMITS = {"x": SENSOR_SIZE[1] - 1, "y": SENSOR_SIZE[0] - 1, "p": 1}


def compute_manifest(f: h5py.File, where: str, problems: list[tuple[str, str, str]] | None = None,
                     want: dict | None = None, jobs: int | None = None) -> dict:
    """Recompute the manifest from the stored bytes (what `verify` compares). Events whose
    x or y lie outside the sensor, or p outside 0..1, are added to `problems` on the way.

    `want`: the datasets of the embedded manifest. An event dataset whose stored digest
    (`dvsprep.events.stored`) matches its entry there is not decoded: its ``sha256`` is the
    entry's, its values checked from the stored bytes; the stored digests are hashed on `jobs`
    threads (default: CPUs). Without `want`, every dataset is decoded and hashed and every stored
    digest computed (the manifest a writer would write)."""
    datasets: dict[str, dict] = {}
    stored: dict[str, tuple[h5py.Dataset, list, Any]] = {}
    for s in SPLITS:
        g = f[s]
        for k in g:
            ds = g[k]
            name = f"{s}/{k}"
            if k == "recording":
                vals = [r.decode("utf-8", "surrogateescape") if isinstance(r, bytes) else str(r)
                        for r in _read(ds, where)]
                datasets[name] = _ds_entry("str", (len(vals),), _str_digest(vals))
                continue
            entry = (want or {}).get(name)
            if k in EVENT_FIELDS and (want is None or (isinstance(entry, dict) and "stored" in entry)):
                plan = _stored_plan(ds, k)
                if plan is not None:
                    stored[name] = plan
                    continue
            datasets[name] = _decoded_entry(ds, name, where, problems)
    if stored:
        datasets.update(_stored_entries(f, stored, where, problems, want, jobs))
    return _events_manifest(datasets, f.attrs)


def _decoded_entry(ds: h5py.Dataset, name: str, where: str, problems: list | None) -> dict:
    """The manifest entry of a dataset from its decoded values (and its value check)."""
    limit = _LIMITS.get(name.split("/")[-1])
    h = hashlib.sha256()
    step = EVENT_CHUNK * 16
    top = 0
    for a in range(0, ds.shape[0], step):
        piece = np.ascontiguousarray(_read(ds, where, slice(a, a + step)))
        h.update(piece)
        if limit is not None and piece.size:
            top = max(top, int(piece.max()))
    if limit is not None and top > limit and problems is not None:
        problems.append(("invalid", name, f"holds {top}, outside 0..{limit}"))
    return _ds_entry(ds.dtype, ds.shape, h.hexdigest())


def _stored_plan(ds: h5py.Dataset, field: str) -> tuple[h5py.Dataset, list, Any] | None:
    """(dataset, chunk table, value check) of an event dataset stored as `EventsWriter` stores it."""
    table = stored_digest.chunk_table(ds)
    check = stored_digest.value_check(ds, _LIMITS.get(field)) if table is not None else None
    return None if check is None else (ds, table, check)


def _stored_entries(f: h5py.File, plans: dict[str, tuple[h5py.Dataset, list, Any]], where: str,
                    problems: list | None, want: dict | None, jobs: int | None) -> dict[str, dict]:
    """Entries of event datasets from their stored bytes, hashed on threads (pread and sha256
    release the GIL), largest first; see `compute_manifest`."""
    if f.mode == "r+":
        f.flush()
    digests = {name: stored_digest.StoredDigest(ds) for name, (ds, _, _) in plans.items()}
    order = sorted(plans, key=lambda n: -sum(c[2] for c in plans[n][1]))
    fd = os.open(f.filename, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max(1, min(jobs or os.cpu_count() or 1, len(order)))) as pool:
            jobs_ = {n: pool.submit(digests[n].add, fd, plans[n][1], plans[n][2]) for n in order}
            for name in order:
                try:
                    jobs_[name].result()
                except OSError as exc:
                    raise StoreError(f"{where}: cannot read {name} ({exc})") from None
    finally:
        os.close(fd)
    out = {}
    for name in sorted(plans):
        ds, _, check = plans[name]
        digest = digests[name].hexdigest()
        entry = (want or {}).get(name)
        if want is not None and isinstance(entry, dict) and entry.get("stored") == digest:
            _check_values(ds, name, check, where, problems)
            out[name] = {**_ds_entry(ds.dtype, ds.shape, entry.get("sha256")), "stored": digest}
        else:  # not the bytes the manifest names (or no manifest to compare): decode it all
            out[name] = {**_decoded_entry(ds, name, where, problems), "stored": digest}
    return out


def _check_values(ds: h5py.Dataset, name: str, check: Any, where: str, problems: list | None) -> None:
    """Chunks the stored bytes did not settle are decoded (and so proven decodable) and checked."""
    top = check.top
    for i in check.fallback:
        piece = _read(ds, where, slice(i * check.chunk, (i + 1) * check.chunk))
        if check.limit is not None and piece.size:
            top = max(top, int(piece.max()))
    if check.limit is not None and top > check.limit and problems is not None:
        problems.append(("invalid", name, f"holds {top}, outside 0..{check.limit}"))


class EventsSplit:
    """One split of an open events.h5. Arrays of per-sample metadata are loaded eagerly
    (small, bounded by `check_structure`) and checked (`check_content`); events are read on demand."""

    def __init__(self, group: h5py.Group, where: str = ""):
        self.group = group
        self.where = where or str(group.file.filename)
        self.offsets = _read(group["offsets"], self.where)
        self.labels = _read(group["label"], self.where).astype(np.int64)
        self.rows = _read(group["row"], self.where)
        self.t_start = _read(group["t_start"], self.where)
        self.t_end = _read(group["t_end"], self.where)
        recs = []
        for r in _read(group["recording"], self.where):
            try:
                recs.append(r.decode("utf-8") if isinstance(r, bytes) else str(r))
            except UnicodeDecodeError:
                raise StoreError(f"{self.where}: {group.name.lstrip('/')}/recording: a name is not valid UTF-8") from None
        self.recordings = recs
        self.check_content()

    def check_content(self) -> None:
        """Offsets start at 0, never decrease and end at the event count; labels 0..10; rows
        >= 0; t_start <= t_end; recording names that are file stems."""
        split = self.group.name.lstrip("/")
        off, n_ev = self.offsets, int(self.group["t"].shape[0])
        if int(off[0]) != 0 or int(off[-1]) != n_ev or (off.size > 1 and bool(np.any(np.diff(off) < 0))):
            raise StoreError(f"{self.where}: {split}/offsets do not run from 0 to {n_ev} without decreasing")
        if len(self) and (int(self.labels.max()) > 10 or int(self.labels.min()) < 0):
            raise StoreError(f"{self.where}: {split}/label holds {int(self.labels.max())}, outside 0..10")
        if len(self) and int(self.rows.min()) < 0:
            raise StoreError(f"{self.where}: {split}/row holds a negative row")
        bad = np.flatnonzero(self.t_start > self.t_end)
        if bad.size:
            raise StoreError(f"{self.where}: {split} sample {int(bad[0])} ends (t_end) before it starts (t_start)")
        for i, name in enumerate(self.recordings):
            if not recording_name_ok(name):
                raise StoreError(f"{self.where}: {split}/recording {i} is {name[:40]!r}, not a recording name")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Events of sample i: t int64 [n], x/y/p uint8 [n]."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {k: _read(self.group[k], self.where, slice(a, b)) for k in EVENT_FIELDS}

    def values(self, field: str, lo: int, hi: int) -> np.ndarray:
        """Events lo..hi-1 (of the whole split) of one field: t int64, x/y/p uint8 [hi - lo]."""
        return _read(self.group[field], self.where, slice(lo, hi))

    def events(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Events of samples a..b-1 in one read, plus `offsets` [b-a+1] relative to them."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        out = {k: _read(self.group[k], self.where, slice(lo, hi)) for k in EVENT_FIELDS}
        out["offsets"] = self.offsets[a : b + 1] - lo
        return out


class EventsFile:
    """Read access to events.h5: `with EventsFile(p) as ef: ef.split("train").sample(0)`.

    check: "auto" (default) refuses a file that does not verify against its embedded manifest,
    cheaply when a verified-marker says this exact file was verified on this machine
    (`dvsprep.integrity.trust`); "full" verifies regardless of markers; "none" checks the structure only
    (for `verify` itself, and worker processes of a parent that checked the file)."""

    def __init__(self, path: str | os.PathLike, *, check: str = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"{self.path}: no such events file")
        try:
            self.f = h5py.File(self.path, "r")
        except Exception as exc:  # OSError mostly; h5py raises others on mangled superblocks
            raise StoreError(f"{self.path}: not a readable HDF5 file ({str(exc).splitlines()[0][:160]})") from None
        self._splits: dict[str, EventsSplit] = {}
        try:
            check_structure(self.f, str(self.path))
            if check != "none":
                self._ensure_verified(force=check == "full")
        except DvsprepError:
            self.f.close()
            raise
        except Exception as exc:  # a mangled file can make h5py raise anything: still one line
            self.f.close()
            raise StoreError(f"{self.path}: unreadable events file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None

    def __enter__(self) -> "EventsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    def _ensure_verified(self, force: bool) -> None:
        trust.ensure_verified("events", self.path, self.fingerprint, {"": trust.stamp_path(self.path)},
                              str(self.path), lambda: ("events file NOT intact", self.problems()), force=force)

    @property
    def attrs(self) -> dict[str, Any]:
        try:
            out = _plain_attrs(self.f.attrs)
            for k in ("recordings",):
                if isinstance(out.get(k), str):
                    if len(out[k]) > MAX_ATTR_BYTES:
                        raise ValueError("too large")
                    out[k] = json.loads(out[k])
                    if not isinstance(out[k], dict):
                        raise ValueError("not an object")
        except (ValueError, TypeError, RecursionError, OSError) as exc:
            raise StoreError(f"{self.path}: unreadable root attributes ({str(exc)[:120]})") from None
        return out

    @property
    def fingerprint(self) -> str:
        fp = self.f.attrs.get("fingerprint")
        fp = fp.decode("ascii", "replace") if isinstance(fp, bytes) else fp
        if not isinstance(fp, str) or len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
            raise StoreError(f"{self.path}: no valid fingerprint (incomplete file?)")
        return fp

    @property
    def manifest(self) -> dict:
        raw = self.f.attrs.get("manifest")
        try:
            if not isinstance(raw, (str, bytes)) or len(raw) > MAX_ATTR_BYTES:
                raise ValueError("absent or too large")
            manifest = json.loads(raw)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("datasets"), dict):
                raise ValueError("not a manifest")
        except (ValueError, RecursionError) as exc:
            raise StoreError(f"{self.path}: no valid embedded manifest ({str(exc)[:80]})") from None
        return manifest

    def split(self, name: str) -> EventsSplit:
        if name not in SPLITS:
            raise StoreError(f"{self.path}: unknown split {name!r} (have {', '.join(SPLITS)})")
        if name not in self._splits:
            try:
                self._splits[name] = EventsSplit(self.f[name], str(self.path))
            except (OSError, KeyError) as exc:
                raise StoreError(f"{self.path}: cannot read split {name!r} ({exc})") from None
        return self._splits[name]

    def compute_manifest(self, problems: list[tuple[str, str, str]] | None = None, want: dict | None = None,
                         jobs: int | None = None) -> dict:
        """Recompute the manifest from the stored bytes (what `verify` compares); see
        `compute_manifest`."""
        return compute_manifest(self.f, str(self.path), problems, want, jobs)

    def problems(self, jobs: int | None = None) -> list[tuple[str, str, str]]:
        """(kind, name, detail) for everything that keeps this file from being used: datasets
        whose bytes differ from the embedded manifest, attributes, fingerprint, values the
        readers refuse. Never raises for what the file holds. `jobs`: threads hashing
        (default: CPUs)."""
        out: list[tuple[str, str, str]] = []
        where = str(self.path)
        try:
            stored = self.manifest
            stored_fp = self.fingerprint
        except StoreError as exc:
            return [("missing", "manifest", str(exc).split(": ", 1)[-1])]
        try:
            computed = self.compute_manifest(out, want=stored["datasets"], jobs=jobs)
        except Exception as exc:  # noqa: BLE001 - unreadable bytes are a listed problem
            return out + [("corrupt", "datasets", _strip(str(exc), where))]
        want, got = stored["datasets"], computed["datasets"]
        for name in sorted(set(want) | set(got)):
            if name not in got:
                out.append(("missing", name, "in the manifest, not in the file"))
            elif name not in want:
                out.append(("extra", name, "not in the manifest"))
            elif _unstored(want[name]) != _unstored(got[name]):
                diff = [k for k in ("dtype", "shape", "sha256")
                        if not isinstance(want[name], dict) or want[name].get(k) != got[name].get(k)]
                out.append(("corrupt", name, f"{' and '.join(diff)} differ from the manifest"))
        if stored.get("attrs") != computed["attrs"]:
            out.append(("corrupt", "root attributes", "differ from the manifest"))
        try:
            self.attrs
        except StoreError as exc:
            out.append(("invalid", "root attributes", _strip(str(exc), where)))
        try:
            if fingerprint(stored) != stored_fp:
                out.append(("corrupt", "fingerprint", "the stored fingerprint is not the manifest's hash"))
        except (TypeError, ValueError) as exc:
            out.append(("corrupt", "manifest", f"not canonical JSON ({exc})"))
        for s in SPLITS:
            try:
                self._splits.pop(s, None)
                self.split(s)
            except StoreError as exc:
                out.append(("invalid", s, _strip(str(exc), where)))
        return out


def open_events(path: str | os.PathLike, *, verify: bool = False) -> EventsFile:
    """Open an events.h5 for reading, checked first (the public face of `EventsFile`).

    Refused in one line when it is not an events.h5 file (MissingFileError when absent) or does
    not verify against its embedded manifest: cheaply when a verified-marker says this exact
    file was verified on this machine, in full with `verify=True`. Use it as a context manager:
    ``with open_events(p) as ev: ev.split("train").sample(0)``; ``ev.fingerprint`` is its id."""
    kind_of(path, {InputKind.EVENTS}, noun="events file")
    return EventsFile(path, check="full" if verify else "auto")


def _unstored(entry: Any) -> Any:
    """A manifest entry less its stored digest: a dataset whose values hash right is intact
    however its chunks are stored (rewritten by h5repack, say)."""
    return {k: v for k, v in entry.items() if k != "stored"} if isinstance(entry, dict) else entry


def _strip(msg: str, where: str) -> str:
    return msg[len(where) + 2:] if msg.startswith(f"{where}: ") else msg
