"""Building a frame store from events.h5: `dvsprep frames`.

Samples are framed a quarter shard at a time by `jobs` worker processes: each worker reads its
samples' events from events.h5, counts them (`integrate.count_frames`) and encodes them as the
store's inner chunks; this process writes each shard file once all its samples are back (so no
two processes touch a file, and a few shards still keep every worker busy). With a codec that
`store.chunk_codec` does not describe, each worker writes whole shards through zarr.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from . import schema
from ..atomic import check_output, publishing
from ..constants import N_POLARITIES, SENSOR_SIZE, SPLITS
from ..errors import MissingFileError, StoreError
from ..events import EventsFile
from .store import (
    DEFAULT_CODEC,
    create_frames_array,
    create_frames_layout,
    create_meta_arrays,
    finish_store,
    samples_per_shard,
    chunk_codec,
    chunk_encoder,
    stored_chunk_codec,
    split_counts,
    store_attributes,
    vouch_store,
    write_metadata,
    write_frames_shard,
    writing_every_chunk,
    zarr_module,
)
from .integrate import check_params, count_frames, narrowest_dtype
from ..resources import check_memory
from ..integrity import stamp_path
from ..workers import interrupt_once, process_pool, stop_pool, worker_deaths

if TYPE_CHECKING:
    import zarr

log = logging.getLogger(__name__)


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


def _check_unchanged(events_path: str, stamp: tuple | None) -> None:
    """events.h5 is still the very file the parent verified (same size, times and inode)."""
    if stamp is None:
        return
    try:
        now = stamp_path(events_path)
    except OSError:
        now = None
    if now != tuple(stamp):
        raise StoreError(f"{events_path}: changed while the frame store was being written")


def _events_split(events_path: str, split: str, stamp: tuple | None = None):
    """The split of events.h5 a worker reads. The parent verified the file: the worker only
    makes sure it is still that very file (`_check_unchanged`; again after each read)."""
    ef = _WORKER_FILES.get(events_path)
    if ef is None:
        _check_unchanged(events_path, stamp)
        ef = _WORKER_FILES[events_path] = EventsFile(events_path, check="none" if stamp is not None else "auto")
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


def _close_worker_files() -> None:
    while _WORKER_FILES:
        _WORKER_FILES.popitem()[1].close()


def frame_block(
    events_path: str, store_path: str, split: str, a: int, b: int, T: int, split_by: str, dtype: str,
    stamp: tuple | None = None, codec: dict[str, Any] | None = None,
) -> tuple[int, int, int, list[bytes] | None]:
    """Integrate samples a..b-1 of `split`; write them to `store_path`'s frames array (a whole
    shard), or with `codec` (`store.chunk_codec`) return them encoded as the array's inner
    chunks (any run of samples: the parent assembles the shard, `write_frames_shard`).

    Returns (a, b, max count, encoded samples or None). Raises _Overflow (writing nothing) when
    the counts do not fit `dtype`. Runs in worker processes: everything is passed by path.
    """
    H, W = SENSOR_SIZE
    sp = _events_split(events_path, split, stamp)
    # split_by "number" never looks at timestamps: skip reading t (8 of the 11 bytes per event).
    fields = ("x", "y", "p") if split_by == "number" else ("t", "x", "y", "p")
    try:
        lo_ev, hi_ev = int(sp.offsets[a]), int(sp.offsets[b])
        ev = {k: sp.values(k, lo_ev, hi_ev) for k in fields}
    except StoreError:   # already one line naming the file and the dataset
        _check_unchanged(events_path, stamp)
        raise
    except (OSError, KeyError, ValueError) as exc:
        _check_unchanged(events_path, stamp)   # bytes changed under the read: say so, not "cannot read"
        raise StoreError(f"{events_path}: cannot read {split} samples {a}..{b - 1} ({exc})") from None
    # The file stays open for the whole build (one open per worker): a stat after every read
    # is what shows that these events are the verified file's, not bytes written since then
    # (the open handle would read them) and not those of an older file replaced by now.
    _check_unchanged(events_path, stamp)
    ev.setdefault("t", None)
    off = sp.offsets[a : b + 1] - lo_ev
    if np.any(np.diff(off) < 0) or any(ev[k].shape[0] != off[-1] for k in fields):
        raise StoreError(f"{events_path}: {split}/offsets inconsistent with the events of samples {a}..{b - 1}")
    if off[-1] and (int(ev["x"].max()) >= W or int(ev["y"].max()) >= H):
        raise StoreError(f"{events_path}: {split} samples {a}..{b - 1} have x or y outside the {H}x{W} sensor")
    want = np.dtype(dtype)
    limit = int(np.iinfo(want).max)
    # Counted straight into the store's dtype (count_frames writes every frame), with no int64
    # or uint16 copy of the block; the first count over the dtype stops the block (_Overflow).
    block = np.empty((b - a, T, N_POLARITIES, H, W), dtype=want)
    top = 0
    for k in range(b - a):
        lo, hi = int(off[k]), int(off[k + 1])
        t = None if ev["t"] is None else ev["t"][lo:hi]
        m = count_frames(t, ev["x"][lo:hi], ev["y"][lo:hi], ev["p"][lo:hi], T, split_by, block[k])
        try:
            narrowest_dtype(m)  # raises when even uint16 cannot hold it
        except StoreError as exc:
            raise StoreError(f"{events_path}: {split} sample {a + k}: {exc}") from None
        top = max(top, m)
        if m > limit:
            raise _Overflow(top)
    if codec is not None:
        encode = chunk_encoder(codec)
        return a, b, top, [encode(sample) for sample in block]
    zarr = zarr_module()
    group = zarr.open_group(zarr.storage.LocalStore(store_path), mode="r+", zarr_format=3)
    with writing_every_chunk():
        group[split]["frames"][a:b] = block
    return a, b, top, None


class _Shards:
    """Encoded samples returned by the workers, written as a shard file once the shard is whole."""

    def __init__(self, root: Path, sizes: Mapping[str, int], shards: Mapping[str, int]):
        self.root, self.sizes, self.shards = root, sizes, shards   # shards: samples per shard
        self.parts: dict[tuple[str, int], dict[int, tuple[int, list[bytes]]]] = {}

    def add(self, split: str, a: int, b: int, chunks: list[bytes]) -> tuple[int, int] | None:
        """Keep samples a..b-1; returns the shard's sample range once it is written."""
        shard = self.shards[split]
        first = a - a % shard
        parts = self.parts.setdefault((split, first), {})
        parts[a] = (b, chunks)
        end = min(first + shard, self.sizes[split])
        if sum(len(c) for _, c in parts.values()) < end - first:
            return None
        ordered = [c for _, (_, chunks) in sorted(parts.items()) for c in chunks]
        write_frames_shard(self.root / split / "frames", shard, first // shard, ordered)
        del self.parts[(split, first)]
        return first, end

    def drop(self) -> list[tuple[str, int, int]]:
        """Forget the shards not yet whole (the store's dtype changed); returns their pieces."""
        out = [(split, a, b) for (split, _), parts in self.parts.items() for a, (b, _) in parts.items()]
        self.parts.clear()
        return out


def _promote(root: Path, splits: Sequence[str], written: Mapping[str, list[tuple[int, int]]],
             T: int, codec: Mapping[str, Any], shard: int) -> None:
    """Rewrite the uint8 frames arrays under `root` as uint16 (values unchanged)."""
    zarr = zarr_module()
    group = zarr.open_group(zarr.storage.LocalStore(root), mode="r+", zarr_format=3)
    for split in splits:
        g = group[split]
        old = g["frames"]
        with writing_every_chunk():  # zarr takes the setting when the array object is made
            new = create_frames_array(g, n=old.shape[0], T=T, dtype=np.dtype("u2"), codec=codec,
                                      shard_samples=shard, name="frames_u16")
            for a, b in written.get(split, []):
                new[a:b] = np.asarray(old[a:b]).astype(np.uint16)
        shutil.rmtree(root / split / "frames")
        os.replace(root / split / "frames_u16", root / split / "frames")


def task_bytes(T: int, shard: int) -> int:
    """Peak memory of one framing task: the block of uint16 frames, plus the int64 counts and
    their sum index of one sample (`framing.integrate`)."""
    frame = N_POLARITIES * SENSOR_SIZE[0] * SENSOR_SIZE[1]
    return shard * T * frame * 2 + 2 * T * frame * 8


def _check_resources(final: Path, T: int, shard: int, jobs: int) -> None:
    if T > schema.MAX_T:
        raise StoreError(f"{final}: -T {T} is more frames per sample than a frame store may hold "
                         f"({schema.MAX_T}; readers refuse larger stores)")
    check_memory(final, f"framing at -T {T} with -j {jobs}", jobs * task_bytes(T, shard),
                 "use fewer jobs or a smaller -T")


def _no_events(events_path: Path) -> MissingFileError:
    return MissingFileError(f"{events_path}: no such events file (run `dvsprep convert` first)")


def _read_events_meta(events_path: Path) -> tuple[str, tuple, dict[str, dict[str, Any]]]:
    """(fingerprint, file stamp, per-split metadata) of a verified events.h5 (EventsFile checks
    it against its own manifest, cheaply when a verified-marker exists)."""
    # Stamped before the verification: a change while it runs, or just after, differs from it.
    try:
        stamp = stamp_path(events_path)
    except FileNotFoundError:
        raise _no_events(events_path) from None
    with EventsFile(events_path) as ef:
        meta = {}
        for s in SPLITS:
            sp = ef.split(s)
            meta[s] = {
                "label": sp.labels, "recording": sp.recordings, "row": sp.rows,
                "t_start": sp.t_start, "t_end": sp.t_end, "n_events": np.diff(sp.offsets),
            }
        return ef.fingerprint, stamp, meta


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
    """events.h5 -> frame store. Streams a quarter shard of samples per task over `jobs` worker
    processes (1: in this process); peak memory is about jobs x one shard's events and frames.

    events.h5 is verified first (against its embedded manifest, and everything the frame-store
    readers would refuse: labels, names, offsets); T is bounded by what readers accept and the
    work by the memory available. The output is locked while written (a second writer refuses),
    built in a PID-named temporary that is removed on any error, Ctrl-C included.

    The store starts as uint8; if any sample's counts exceed 255 the frames written so far are
    rewritten as uint16 and the rest is written as uint16 (no count is ever clipped).
    """
    t_begin = time.perf_counter()
    T, split_by = check_params(T, split_by)
    events_path = Path(events_path)
    if not events_path.is_file():
        raise _no_events(events_path)
    out_path = Path(out_path)
    check_output(out_path, "frame store", force=force, inputs=[events_path], kind="dir")
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    shard = samples_per_shard(T, np.uint8)
    _check_resources(out_path, T, shard, jobs)
    # one Ctrl-C stops the build; more presses cannot interrupt its clean-up
    publication = publishing(out_path, "frame store", force=force, inputs=[events_path], kind="dir")
    with interrupt_once(), publication as tmp:
        events_fp, stamp, meta = _read_events_meta(events_path)
        summary = _build(events_path, tmp, out_path, events_fp, stamp, meta, T=T, split_by=split_by, jobs=jobs,
                         codec=dict(codec or DEFAULT_CODEC), progress=progress, t_begin=t_begin)
        vouch_store(publication, summary.fingerprint, encoded=True)   # the next reader here does not hash it again
    log.info("frames: %s written, fingerprint %s", out_path, summary.fingerprint)
    return summary


def _frame_blocks(runner: Any, events_path: Path, tmp: Path, tasks: list[tuple[str, int, int]], *, jobs: int,
                  T: int, split_by: str, stamp: tuple, codec: dict[str, Any], shard: int,
                  shards: _Shards | None, bar: Any, meanwhile: Callable[[], None] | None) -> tuple[np.dtype, int]:
    """Frame every (split, first, end) block into the store at `tmp`, at most 2 x jobs in flight:
    whole shards that the workers write, or (with `shards`) smaller pieces that they encode and
    this process writes as shards. Blocks start as uint8; the first count over 255 promotes the
    store to uint16 once every in-flight block has finished, and the overflowed blocks (and the
    pieces of shards not yet written) run again. `meanwhile` runs once, after the first blocks
    are handed out. Returns (dtype, max count)."""
    dtype = np.dtype("u1")
    written: dict[str, list[tuple[int, int]]] = {s: [] for s in SPLITS}
    top = 0
    pending = list(reversed(tasks))
    args = (str(events_path), str(tmp))
    running: dict[Any, tuple[str, int, int]] = {}
    promote_wanted = False
    if not pending and meanwhile is not None:
        meanwhile()
    while pending or running:
        while pending and not promote_wanted and len(running) < 2 * jobs:
            s, a, b = pending.pop()
            enc = chunk_codec(codec, dtype) if shards is not None else None
            fut = runner.submit(frame_block, *args, s, a, b, T, split_by, dtype.str, stamp, enc)
            running[fut] = (s, a, b)
        if meanwhile is not None:
            meanwhile()   # in this process, while the workers frame
            meanwhile = None
        done, _ = wait(running, return_when=FIRST_COMPLETED)
        for fut in done:
            s, a, b = running.pop(fut)
            try:
                _, _, m, chunks = fut.result()
            except _Overflow:
                promote_wanted = True
                pending.append((s, a, b))
                continue
            top = max(top, m)
            span = (a, b) if shards is None else shards.add(s, a, b, chunks)
            if span is not None:
                written[s].append(span)
                if bar is not None:
                    bar.update(span[1] - span[0])
        if promote_wanted and not running:
            # Every in-flight block has finished (as uint8 or overflowed): rewrite and go on.
            _promote(tmp, SPLITS, written, T, codec, shard)
            if shards is not None:
                _check_chunk_codec(tmp, chunk_codec(codec, np.dtype("u2")))
                pending.extend(reversed(shards.drop()))
            dtype = np.dtype("u2")
            promote_wanted = False
    return dtype, top


def _check_chunk_codec(tmp: Path, config: dict[str, Any]) -> None:
    """The frames arrays zarr made store their samples with `config`, the codec the workers
    encode with (`store.chunk_codec` predicted it before the arrays existed)."""
    for split in SPLITS:
        stored = stored_chunk_codec(json.loads((tmp / split / "frames" / "zarr.json").read_bytes()))
        if stored != config:
            raise StoreError(f"{tmp}: {split}/frames stores its samples with {stored}, not the {config} "
                             f"they were encoded with")


def _blocks(sizes: Mapping[str, int], shards: Mapping[str, int], parts: int) -> list[tuple[str, int, int]]:
    """(split, first, end) of each shard of each split (`shards`: samples per shard) cut in
    `parts` pieces, none across a shard boundary."""
    out = []
    for s, n in sizes.items():
        step = max(1, -(-shards[s] // parts))
        out += [(s, a, min(a + step, first + shards[s], n))
                for first in range(0, n, shards[s]) for a in range(first, min(first + shards[s], n), step)]
    return out


class _Layout:
    """The store's groups and arrays under `tmp`, made by this process while the workers frame:
    `frames()` the groups and frames arrays (made on first call), `metadata()` the per-sample
    metadata arrays, filled, and each split's counts."""

    def __init__(self, tmp: Path, *, T: int, sizes: Mapping[str, int], codec: dict[str, Any], shard: int,
                 encode: dict[str, Any] | None, meta: dict[str, dict[str, Any]]):
        self.tmp, self.T, self.sizes, self.codec, self.shard, self.encode = tmp, T, sizes, codec, shard, encode
        self.meta = meta
        self.group: zarr.Group | None = None
        self.counts: dict[str, dict[str, Any]] = {}

    def frames(self) -> zarr.Group:
        if self.group is None:
            # made as uint8: a promotion rewrites the frames arrays later
            self.group = create_frames_layout(self.tmp, T=self.T, sizes=self.sizes, dtype=np.dtype("u1"),
                                              codec=self.codec, shard_samples=self.shard)
            if self.encode is not None:
                _check_chunk_codec(self.tmp, self.encode)
        return self.group

    def metadata(self) -> None:
        group = self.frames()
        create_meta_arrays(group, self.sizes)
        for s in SPLITS:
            write_metadata(group, s, self.meta[s])
            self.counts[s] = split_counts(self.meta[s]["label"])


def _finish(tmp: Path, attributes: dict[str, Any]) -> str:
    """The root attributes written once every block is (after any promotion), then the manifest;
    returns the fingerprint."""
    zarr = zarr_module()   # imported by the layout, while the workers framed
    group = zarr.open_group(zarr.storage.LocalStore(tmp), mode="r+", zarr_format=3)
    group.update_attributes(attributes)
    return finish_store(tmp)


def _build(events_path: Path, tmp: Path, final: Path, events_fp: str, stamp: tuple,
           meta: dict[str, dict[str, Any]], *, T: int, split_by: str, jobs: int, codec: dict[str, Any],
           progress: bool, t_begin: float) -> BuildSummary:
    """Write the store into `tmp` (the protocol's temporary; it publishes it as `final`)."""
    shard = samples_per_shard(T, np.uint8)
    dtype = np.dtype("u1")
    sizes = {s: len(meta[s]["label"]) for s in SPLITS}
    per_shard = {s: max(1, min(shard, n)) for s, n in sizes.items()}   # as create_frames_array
    # Quarter shards, encoded by the workers and written here as shards: a few shards then
    # still keep every worker busy to the end.
    pieces = _blocks(sizes, per_shard, 4)
    bar = None
    pool = None
    try:
        if jobs > 1 and len(pieces) > 1:
            # Made before this process touches zarr: zarr runs an event-loop thread that a forked
            # child must not inherit, and process_pool forks every worker at once. Workers
            # ignore SIGINT (dvsprep.workers).
            pool = process_pool(min(jobs, len(pieces)))
        # Workers that encode never touch the store: they start before its layout exists.
        encode = chunk_codec(codec, dtype)
        shards = _Shards(tmp, sizes, per_shard) if encode is not None else None
        tasks = pieces if encode is not None else _blocks(sizes, per_shard, 1)
        layout = _Layout(tmp, T=T, sizes=sizes, codec=codec, shard=shard, encode=encode, meta=meta)
        if encode is None:
            layout.frames()   # the workers write through zarr
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(b - a for _, a, b in tasks), unit="sample", desc="frames")
        runner = pool if pool is not None else _InlineExecutor()
        with worker_deaths(final):
            dtype, top = _frame_blocks(runner, events_path, tmp, tasks, jobs=jobs, T=T, split_by=split_by,
                                       stamp=stamp, codec=codec, shard=shard, shards=shards, bar=bar,
                                       meanwhile=layout.metadata)
        # Every block checked the file after its read; this covers a build with no block at all.
        _check_unchanged(str(events_path), stamp)
        # Every block is written: the workers may exit while the manifest is hashed.
        stop_pool(pool, wait=False)
        fp = _finish(tmp, store_attributes(T=T, split_by=split_by, dtype=dtype, counts=layout.counts,
                                           events_fingerprint=events_fp, codec=codec, shard_samples=shard))
    except BaseException:
        stop_pool(pool, kill=True)   # before the protocol removes the temporary its workers write into
        pool = None
        raise
    finally:
        stop_pool(pool)
        if bar is not None:
            bar.close()
        _close_worker_files()
    return BuildSummary(path=final, fingerprint=fp, T=T, split_by=split_by, dtype=dtype, counts=layout.counts,
                        max_count=top, seconds=time.perf_counter() - t_begin)
