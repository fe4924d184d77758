"""Building a frame store from events.h5: `dvsprep frames`.

Samples are framed one shard at a time (the unit a worker writes, so no two processes touch the
same file) by `jobs` worker processes; each worker reads its samples' events from events.h5,
integrates them (`framing.integrate`) and writes the shard into the temporary store.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

from .atomic import remove_path, temp_sibling
from .constants import N_POLARITIES, SENSOR_SIZE, SPLITS
from .errors import MissingFileError, StoreError
from .events_store import EventsFile
from .frames_store import (
    DEFAULT_CODEC,
    check_output,
    create_frames_array,
    create_layout,
    finish_store,
    samples_per_shard,
    split_counts,
    store_attributes,
    write_metadata,
)
from .framing import check_params, integrate, narrowest_dtype

log = logging.getLogger(__name__)

EVENTS_NAME = "events.h5"

@dataclass
class BuildSummary:
    path: Path
    fingerprint: str
    T: int
    split_by: str
    dtype: np.dtype
    counts: dict[str, dict[str, Any]]
    max_count: int
    seconds: float

    def lines(self) -> list[str]:
        n = ", ".join(f"{s} {c['n_samples']}" for s, c in self.counts.items())
        return [
            f"wrote {self.path} ({n} samples, T={self.T}, split_by={self.split_by}, {self.dtype.name}, "
            f"max count {self.max_count}) in {self.seconds:.1f} s",
            f"fingerprint {self.fingerprint}",
        ]


class _Overflow(Exception):
    """A block's counts do not fit the store dtype chosen so far (internal)."""


_WORKER_FILES: dict[str, Any] = {}


def _events_split(events_path: str, split: str):
    ef = _WORKER_FILES.get(events_path)
    if ef is None:
        ef = _WORKER_FILES[events_path] = EventsFile(events_path)
    return ef.split(split)


class _InlineExecutor:
    """`-j 1`: runs each task at submit time, so one scheduling loop serves both cases."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


def _ready(_: int) -> int:
    """No-op task: makes the pool start its workers now."""
    return os.getpid()


def _close_worker_files() -> None:
    while _WORKER_FILES:
        _WORKER_FILES.popitem()[1].close()


def frame_block(
    events_path: str, store_path: str, split: str, a: int, b: int, T: int, split_by: str, dtype: str
) -> tuple[int, int, int]:
    """Integrate samples a..b-1 of `split` and write them to `store_path`'s frames array.

    Returns (a, b, max count). Raises _Overflow (writing nothing) when the counts do not fit
    `dtype`. Runs in worker processes: everything is passed by path.
    """
    H, W = SENSOR_SIZE
    sp = _events_split(events_path, split)
    # split_by "number" never looks at timestamps: skip reading t (8 of the 11 bytes per event).
    fields = ("x", "y", "p") if split_by == "number" else ("t", "x", "y", "p")
    try:
        lo_ev, hi_ev = int(sp.offsets[a]), int(sp.offsets[b])
        ev = {k: sp.group[k][lo_ev:hi_ev] for k in fields}
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"{events_path}: cannot read {split} samples {a}..{b - 1} ({exc})") from None
    ev.setdefault("t", None)
    off = sp.offsets[a : b + 1] - lo_ev
    if np.any(np.diff(off) < 0) or any(ev[k].shape[0] != off[-1] for k in fields):
        raise StoreError(f"{events_path}: {split}/offsets inconsistent with the events of samples {a}..{b - 1}")
    if off[-1] and (int(ev["x"].max()) >= W or int(ev["y"].max()) >= H):
        raise StoreError(f"{events_path}: {split} samples {a}..{b - 1} have x or y outside the {H}x{W} sensor")
    want = np.dtype(dtype)
    block = np.zeros((b - a, T, N_POLARITIES, H, W), dtype=np.uint16)
    top = 0
    for k in range(b - a):
        lo, hi = int(off[k]), int(off[k + 1])
        t = None if ev["t"] is None else ev["t"][lo:hi]
        counts = integrate(t, ev["x"][lo:hi], ev["y"][lo:hi], ev["p"][lo:hi], T, split_by)
        m = int(counts.max())
        narrowest_dtype(m)  # raises when even uint16 cannot hold it
        top = max(top, m)
        block[k] = counts
    if top > np.iinfo(want).max:
        raise _Overflow(top)
    group = zarr.open_group(LocalStore(store_path), mode="r+", zarr_format=3)
    group[split]["frames"][a:b] = block.astype(want, copy=False)
    return a, b, top


def _promote(root: Path, splits: Sequence[str], written: Mapping[str, list[tuple[int, int]]],
             T: int, codec: Mapping[str, Any], shard: int) -> None:
    """Rewrite the uint8 frames arrays under `root` as uint16 (values unchanged)."""
    group = zarr.open_group(LocalStore(root), mode="r+", zarr_format=3)
    for split in splits:
        g = group[split]
        old = g["frames"]
        new = create_frames_array(g, n=old.shape[0], T=T, dtype=np.dtype("u2"), codec=codec,
                                  shard_samples=shard, name="frames_u16")
        for a, b in written.get(split, []):
            new[a:b] = np.asarray(old[a:b]).astype(np.uint16)
        shutil.rmtree(root / split / "frames")
        os.replace(root / split / "frames_u16", root / split / "frames")


def build_frame_store(
    events_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    T: int,
    split_by: str = "number",
    jobs: int | None = None,
    force: bool = False,
    codec: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> BuildSummary:
    """events.h5 -> frame store. Streams one shard of samples per task over `jobs` worker
    processes (1: in this process); peak memory is about jobs x one shard's events and frames.

    The store starts as uint8; if any sample's counts exceed 255 the frames written so far are
    rewritten as uint16 and the rest is written as uint16 (no count is ever clipped).
    """
    t_begin = time.perf_counter()
    T, split_by = check_params(T, split_by)
    events_path = Path(events_path)
    if not events_path.is_file():
        raise MissingFileError(f"{events_path}: no such events file (run `dvsprep convert` first)")
    final = check_output(out_path, force)
    codec = dict(codec or DEFAULT_CODEC)
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    with EventsFile(events_path) as ef:
        events_fp = ef.fingerprint
        meta = {}
        for s in SPLITS:
            sp = ef.split(s)
            meta[s] = {
                "label": sp.labels, "recording": sp.recordings, "row": sp.rows,
                "t_start": sp.t_start, "t_end": sp.t_end, "n_events": np.diff(sp.offsets),
            }
            if sp.offsets.shape != (len(sp) + 1,):
                raise StoreError(f"{events_path}: {s}/offsets has {sp.offsets.shape[0]} entries for {len(sp)} samples")
    shard = samples_per_shard(T, np.uint8)
    dtype = np.dtype("u1")
    tasks = [(s, a, min(a + shard, len(meta[s]["label"])))
             for s in SPLITS for a in range(0, len(meta[s]["label"]), shard)]
    tmp = temp_sibling(final)
    bar = None
    pool = None
    try:
        if jobs > 1 and len(tasks) > 1:
            # Start the workers before this process touches zarr: zarr runs an event-loop thread
            # that a forked child must not inherit. Fork is used where it is safe (Linux) since
            # workers then start in milliseconds instead of re-importing numpy/zarr/h5py.
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx)
            list(pool.map(_ready, range(min(jobs, len(tasks)))))
        create_layout(tmp, T=T, sizes={s: len(meta[s]["label"]) for s in SPLITS}, dtype=dtype,
                      codec=codec, shard_samples=shard)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(b - a for _, a, b in tasks), unit="sample", desc="frames")
        written: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
        top = 0
        pending = list(reversed(tasks))
        args = (str(events_path), str(tmp))
        runner = pool if pool is not None else _InlineExecutor()
        running: dict[Any, tuple[str, int, int]] = {}
        promote_wanted = False
        while pending or running:
            while pending and not promote_wanted and len(running) < 2 * jobs:
                s, a, b = pending.pop()
                running[runner.submit(frame_block, *args, s, a, b, T, split_by, dtype.str)] = (s, a, b)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                s, a, b = running.pop(fut)
                try:
                    _, _, m = fut.result()
                except _Overflow:
                    promote_wanted = True
                    pending.append((s, a, b))
                    continue
                written[s].append((a, b))
                top = max(top, m)
                if bar is not None:
                    bar.update(b - a)
            if promote_wanted and not running:
                # Every in-flight block has finished (as uint8 or overflowed): rewrite and go on.
                _promote(tmp, SPLITS, written, T, codec, shard)
                dtype = np.dtype("u2")
                promote_wanted = False
        group = zarr.open_group(LocalStore(tmp), mode="r+", zarr_format=3)
        counts = {}
        for s in SPLITS:
            write_metadata(group, s, meta[s])
            counts[s] = split_counts(meta[s]["label"])
        group.attrs.update(store_attributes(T=T, split_by=split_by, dtype=dtype, counts=counts,
                                            events_fingerprint=events_fp, codec=codec, shard_samples=shard))
        fp = finish_store(tmp, final, force)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        remove_path(tmp)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
        _close_worker_files()
    log.info("frames: %s written, fingerprint %s", final, fp)
    return BuildSummary(path=final, fingerprint=fp, T=T, split_by=split_by, dtype=dtype, counts=counts,
                        max_count=top, seconds=time.perf_counter() - t_begin)
