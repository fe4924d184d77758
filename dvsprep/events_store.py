"""events.h5: per-sample events of both splits in one HDF5 file, with an embedded manifest.

Layout (groups `train`, `test`): t int64, x/y/p uint8 (events of all samples, in sample order),
offsets int64 [N+1], label uint8 [N], recording str [N], row int32 [N], t_start/t_end int64 [N].
Root attributes: format, tool_version, sensor_size, recordings (JSON), n_invalid_dropped,
manifest (JSON: sha256 of every dataset's bytes and of the other attributes), fingerprint.
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

from . import __version__
from .constants import (
    EVENTS_FORMAT,
    LABEL_DTYPE,
    OFFSET_DTYPE,
    P_DTYPE,
    ROW_DTYPE,
    SENSOR_SIZE,
    SPLITS,
    T_DTYPE,
    XY_DTYPE,
)
from .atomic import temp_sibling
from .errors import MissingFileError, StoreError, StoreExistsError
from .manifest import MANIFEST_FORMAT, canonical_json, fingerprint

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
    """Streams samples into a temporary events.h5 and renames it into place on `finish`.

    Hashes are updated as data is appended so the manifest costs no second read.
    """

    def __init__(self, path: str | os.PathLike, force: bool = True):
        self.path = Path(path)
        self.force = force
        self._published = False
        self.tmp = temp_sibling(self.path)  # .events.h5.tmp-<pid>-<hex>: removable once we are gone
        # No chunk cache: every write reaches the file at once, so a full disk raises OSError
        # (ENOSPC) from the write itself; with a cache, HDF5 fails later while freeing objects,
        # where Python can only print "Exception ignored" (and it crashed). Costs no speed here:
        # appends are whole recordings.
        try:
            self.f = h5py.File(self.tmp, "w", rdcc_nbytes=0)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
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
        for s in SPLITS:
            g = self.f.create_group(s)
            for name, dt in EVENT_FIELDS.items():
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(EVENT_CHUNK,),
                                 **EVENT_FILTERS[name])
                self._hash[f"{s}/{name}"] = hashlib.sha256()

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
        self._n_events[split] = a + n_new
        acc = self._samples[split]
        for k in SAMPLE_FIELDS:
            acc[k].append(np.asarray(meta[k]))
        acc["recording"].extend(meta["recording"])
        acc["n"].append(np.asarray(lengths, dtype=OFFSET_DTYPE))

    def finish(self, attrs: dict[str, Any]) -> str:
        """Write per-sample datasets, attributes and the manifest; rename into place.
        Returns the fingerprint."""
        self._drain_hashes()
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
                datasets[f"{s}/{name}"] = _ds_entry(dt, (self._n_events[s],), self._hash[f"{s}/{name}"].hexdigest())
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
        self._publish()
        return fp

    def _publish(self) -> None:
        """Rename the complete temporary onto `path`. Without `force`, an events.h5 that
        appeared meanwhile is never replaced (a hard link publishes only where nothing is)."""
        if self.force:
            os.replace(self.tmp, self.path)
            return
        try:
            os.link(self.tmp, self.path)
            self._published = True  # tmp is now the published file's second name: never truncate it
        except FileExistsError:
            raise StoreExistsError(f"{self.path}: already exists (written meanwhile by another process; "
                                   f"use --force to replace it)") from None
        except OSError:  # no hard links here: check, then rename
            if self.path.exists() or self.path.is_symlink():
                raise StoreExistsError(f"{self.path}: already exists (use --force to replace it)") from None
            os.replace(self.tmp, self.path)
            return
        self.tmp.unlink()

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
            if not self._published:
                try:
                    os.truncate(self.tmp, 0)
                except OSError:
                    pass
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
            self.tmp.unlink(missing_ok=True)


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


class EventsSplit:
    """One split of an open events.h5. Arrays of per-sample metadata are loaded eagerly
    (small); events are read on demand."""

    def __init__(self, group: h5py.Group):
        self.group = group
        self.offsets = group["offsets"][()]
        self.labels = group["label"][()].astype(np.int64)
        self.rows = group["row"][()]
        self.t_start = group["t_start"][()]
        self.t_end = group["t_end"][()]
        self.recordings = [r.decode() if isinstance(r, bytes) else str(r) for r in group["recording"][()]]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Events of sample i: t int64 [n], x/y/p uint8 [n]."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {k: self.group[k][a:b] for k in EVENT_FIELDS}

    def events(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Events of samples a..b-1 in one read, plus `offsets` [b-a+1] relative to them."""
        lo, hi = int(self.offsets[a]), int(self.offsets[b])
        out = {k: self.group[k][lo:hi] for k in EVENT_FIELDS}
        out["offsets"] = self.offsets[a : b + 1] - lo
        return out


class EventsFile:
    """Read access to events.h5: `with EventsFile(p) as ef: ef.split("train").sample(0)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"{self.path}: no such events file")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        try:
            fmt = self.f.attrs.get("format")
            if fmt != EVENTS_FORMAT:
                raise StoreError(f"{self.path}: not a dvsprep events file (format {fmt!r})")
            missing = [f"{s}/{k}" for s in SPLITS for k in (*EVENT_FIELDS, *SAMPLE_FIELDS, "offsets", "recording")
                       if f"{s}/{k}" not in self.f]
            if missing:
                raise StoreError(f"{self.path}: missing datasets {', '.join(missing)}")
        except Exception:
            self.f.close()
            raise
        self._splits: dict[str, EventsSplit] = {}

    def __enter__(self) -> "EventsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.f.close()

    @property
    def attrs(self) -> dict[str, Any]:
        out = _plain_attrs(self.f.attrs)
        for k in ("recordings",):
            if isinstance(out.get(k), str):
                out[k] = json.loads(out[k])
        return out

    @property
    def fingerprint(self) -> str:
        return str(self.f.attrs["fingerprint"])

    @property
    def manifest(self) -> dict:
        return json.loads(self.f.attrs["manifest"])

    def split(self, name: str) -> EventsSplit:
        if name not in SPLITS:
            raise StoreError(f"{self.path}: unknown split {name!r} (have {', '.join(SPLITS)})")
        try:
            if name not in self._splits:
                self._splits[name] = EventsSplit(self.f[name])
            return self._splits[name]
        except (OSError, KeyError) as exc:
            raise StoreError(f"{self.path}: cannot read split {name!r} ({exc})") from None

    def compute_manifest(self) -> dict:
        """Recompute the manifest from the stored bytes (what `verify` compares)."""
        datasets = {}
        for s in SPLITS:
            g = self.f[s]
            for k in g:
                ds = g[k]
                if k == "recording":
                    vals = [r.decode() if isinstance(r, bytes) else str(r) for r in ds[()]]
                    datasets[f"{s}/{k}"] = _ds_entry("str", (len(vals),), _str_digest(vals))
                    continue
                h = hashlib.sha256()
                step = EVENT_CHUNK * 16
                for a in range(0, ds.shape[0], step):
                    h.update(np.ascontiguousarray(ds[a : a + step]))
                datasets[f"{s}/{k}"] = _ds_entry(ds.dtype, ds.shape, h.hexdigest())
        return _events_manifest(datasets, self.f.attrs)
