"""`dvsprep convert`: raw release -> DATA_ROOT/events.h5, recording by recording, in parallel."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..raw import decode_buffer, map_file
from ..atomic import check_output, publishing, remove_path, same_or_inside, scratch_dir
from ..constants import EVENTS_NAME, N_CLASSES, SPLITS, T_DTYPE, XY_DTYPE
from ..errors import InputOutputClashError, ReleaseError
from .store import EventsWriter, vouch_events
from ..raw import (
    Recording,
    cut_samples,
    find_release_dir,
    list_recordings,
    load_published_manifest,
    open_release,
    parse_labels,
)
from ..inputs import RAW_RELEASE, kind_of
from ..workers import interrupt_once, process_pool, stop_pool, worker_deaths

log = logging.getLogger(__name__)


@dataclass
class ConvertSummary:
    path: Path
    recordings: int = 0
    samples: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    per_class: dict[str, list[int]] = field(default_factory=lambda: {s: [0] * N_CLASSES for s in SPLITS})
    events: int = 0
    events_in_samples: int = 0
    invalid_dropped: int = 0
    md5_mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fingerprint: str = ""

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.path}",
            f"recordings: {self.recordings}; samples: train {self.samples['train']}, test {self.samples['test']}",
        ]
        for s in SPLITS:
            out.append(f"  {s} per class: " + " ".join(str(c) for c in self.per_class[s]))
        out.append(
            f"events: {self.events:,} decoded, {self.events_in_samples:,} in samples; "
            f"invalid events dropped: {self.invalid_dropped:,}"
        )
        if self.md5_mismatches:
            out.append(f"md5 differs from the published release for {len(self.md5_mismatches)} recording(s)")
        out.append(f"fingerprint: {self.fingerprint}")
        out.append(f"seconds: {self.seconds:.2f}")
        return out


def process_recording(rec: Recording, spill_dir: str | None = None) -> dict[str, Any]:
    """Decode one recording and cut it into samples (one row of its label csv each).

    With `spill_dir` (worker processes), the samples' events are written to one raw file there
    (t, then x, y, p) instead of being returned: the parent maps it, which costs one copy
    where pickling through the pool's pipe costs several.
    """
    rows = parse_labels(rec.labels)
    buf = map_file(rec.aedat)  # one mapping serves decoding and the md5
    # The md5 (~700 MB/s, as long as the decoding itself) runs on a thread beside the decoding:
    # hashlib releases the GIL while it hashes, numpy while it decodes a block.
    with ThreadPoolExecutor(1, thread_name_prefix="md5") as hasher:
        md5 = hasher.submit(_md5, buf)
        try:
            ev = decode_buffer(buf, rec.aedat)
        finally:
            md5_hex = md5.result()
    parts = cut_samples(ev.t, rows)
    lengths = np.array(
        [(p.stop - p.start) if isinstance(p, slice) else p.shape[0] for p in parts], dtype=np.int64
    )
    res = {
        "stem": rec.stem,
        "split": rec.split,
        "md5": md5_hex,
        "n_events": len(ev),
        "n_invalid": ev.n_invalid,
        "lengths": lengths,
        "label": rows.label,
        "t_start": rows.start,
        "t_end": rows.end,
    }
    if spill_dir is None:
        res["events"] = {k: np.concatenate([getattr(ev, k)[p] for p in parts]) if parts
                         else getattr(ev, k)[:0] for k in "txyp"}
        return res
    spill = os.path.join(spill_dir, f"{rec.stem}.events")
    with open(spill, "wb") as f:
        for k in "txyp":
            arr = getattr(ev, k)
            for p in parts:
                f.write(memoryview(np.ascontiguousarray(arr[p])))
    res["spill"] = spill
    return res


_MD5_SLICE = 16 << 20


def _md5(buf: np.ndarray) -> str:
    """md5 of a recording's bytes, in slices (hashlib releases the GIL for each)."""
    h = hashlib.md5()
    for a in range(0, buf.nbytes, _MD5_SLICE):
        h.update(buf[a:a + _MD5_SLICE])
    return h.hexdigest()


def _load_spill(res: dict[str, Any]) -> dict[str, np.ndarray]:
    """Map a worker's spill file as event arrays; the file is unlinked at once (the mapping
    keeps the data until the arrays are dropped)."""
    n = int(res["lengths"].sum())
    path = res.pop("spill")
    try:
        if n == 0:
            return {"t": np.zeros(0, T_DTYPE), **{k: np.zeros(0, XY_DTYPE) for k in "xyp"}}
        mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    finally:
        os.unlink(path)
    t_bytes = n * T_DTYPE.itemsize
    return {
        "t": mm[:t_bytes].view(T_DTYPE),
        "x": mm[t_bytes : t_bytes + n],
        "y": mm[t_bytes + n : t_bytes + 2 * n],
        "p": mm[t_bytes + 2 * n : t_bytes + 3 * n],
    }


def _results(recs: list[Recording], jobs: int, scratch: Path) -> Iterator[dict[str, Any]]:
    """Results in `recs` order, with at most `jobs` + 1 recordings decoded ahead (bounded memory)."""
    if jobs <= 1 or len(recs) <= 1:
        for r in recs:
            yield process_recording(r)
        return
    spill_dir = pool = None
    try:  # everything made inside the try, so that a signal at any point leaves nothing behind
        spill_dir = scratch_dir(scratch, "convert")
        # Workers ignore SIGINT: on Ctrl-C the parent alone stops (workers finish the recording
        # they hold, nothing else starts), removes the spill folder and click prints "Aborted!".
        pool = process_pool(min(jobs, len(recs)))
        pending: deque = deque()
        todo = iter(recs)
        with worker_deaths(scratch / EVENTS_NAME):
            for r in itertools.islice(todo, jobs + 1):
                pending.append(pool.submit(process_recording, r, str(spill_dir)))
            while pending:
                res = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(process_recording, nxt, str(spill_dir)))
                res["events"] = _load_spill(res)
                yield res
    except BaseException:   # an error, Ctrl-C, SIGTERM, or the consumer closing us early
        stop_pool(pool, kill=True)
        pool = None
        raise
    finally:
        stop_pool(pool)
        if spill_dir is not None:
            remove_path(spill_dir)


def convert_release(
    raw: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    jobs: int | None = None,
    strict: bool = False,
    force: bool = False,
    progress: bool = False,
) -> ConvertSummary:
    """Convert a raw release (folder or DvsGesture.tar.gz) into `out_dir/events.h5`.

    The output is locked while written (a second convert into the same DATA_ROOT refuses), an
    existing events.h5 is replaced only with `force` (checked again when the new file is
    published), and on any failure nothing is left: no temporary, no half file, and no
    `out_dir` this call created. A full disk is one ResourceLimitError naming the output.
    """
    t0 = time.perf_counter()
    kind_of(raw, RAW_RELEASE, error=ReleaseError)  # a release or one line, before any output is touched
    raw, out_dir = Path(raw), Path(out_dir)
    out = out_dir / EVENTS_NAME
    release_dir = find_release_dir(raw) if raw.is_dir() else None
    if release_dir is not None and same_or_inside(out_dir, release_dir):
        # DATA_ROOT also holds convert's scratch folders: none of it may lie in the release
        raise InputOutputClashError(f"{out_dir}: is inside the release {release_dir}, the input it would "
                                    f"read; write DATA_ROOT elsewhere")
    inputs = [release_dir or raw]
    check_output(out, "events.h5", force=force, inputs=inputs, parent=False)
    created = _missing_parents(out_dir)
    try:
        # one Ctrl-C stops the conversion; more presses cannot interrupt its clean-up
        publication = publishing(out, "events.h5", force=force, inputs=inputs, parent=False)
        with interrupt_once(), publication as tmp:
            summary = _convert_locked(raw, out_dir, out, tmp, jobs or os.cpu_count() or 1, strict, progress)
            vouch_events(publication, summary.fingerprint)   # the next reader here does not hash it again
    except BaseException:
        for d in created:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    if summary.md5_mismatches:
        log.warning(
            "%d of %d recordings differ from the published DVS128 Gesture md5s (synthetic or modified data?)",
            len(summary.md5_mismatches), summary.recordings,
        )
    summary.seconds = time.perf_counter() - t0
    return summary


def _missing_parents(path: Path) -> list[Path]:
    """`path` and those of its ancestors that do not exist yet, deepest first."""
    out = []
    p = path.absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _convert_locked(raw: Path, out_dir: Path, out: Path, tmp: Path, jobs: int, strict: bool,
                    progress: bool) -> ConvertSummary:
    """The conversion proper, with the output lock held: events.h5 is written into `tmp`, the
    protocol's temporary (published as `out` once this returns)."""
    published = load_published_manifest()
    summary = ConvertSummary(path=out)
    with open_release(raw, scratch=out_dir) as release:
        recs = list_recordings(release)
        if not recs:
            raise ReleaseError(f"{release}: the trial lists name no recordings")
        writer = bar = None
        try:
            writer = EventsWriter(tmp, publish=False)
            bar = _progress(len(recs), progress)
            recordings_attr: dict[str, dict] = {}
            # closing(): on any exception the pool stops and the spill folder goes now, not
            # whenever the suspended generator happens to be collected (maybe never, if killed).
            with contextlib.closing(_results(recs, jobs, out_dir)) as results:
                for res in results:
                    _add_recording(res, writer, summary, recordings_attr, published, release, strict)
                    if bar is not None:
                        bar.update(1)
            summary.fingerprint = writer.finish(
                {
                    "recordings": recordings_attr,
                    "n_invalid_dropped": summary.invalid_dropped,
                }
            )
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
    return summary


def _add_recording(res: dict[str, Any], writer: EventsWriter, summary: ConvertSummary,
                   recordings_attr: dict[str, dict], published: dict, release: Path, strict: bool) -> None:
    """Append one decoded recording's samples to the writer and count them."""
    stem, split = res["stem"], res["split"]
    name = f"{stem}.aedat"
    expected = published["recordings"].get(name)
    if expected is not None and expected != res["md5"]:
        summary.md5_mismatches.append(name)
        if strict:
            raise ReleaseError(f"{release / name}: md5 {res['md5']} differs from the published {expected}")
    n = len(res["lengths"])
    writer.append(
        split,
        res["events"],
        res["lengths"],
        {"label": res["label"], "row": np.arange(n), "t_start": res["t_start"], "t_end": res["t_end"],
         "recording": [stem] * n},
    )
    recordings_attr[stem] = {"split": split, "md5": res["md5"], "n_events": res["n_events"],
                             "n_invalid": res["n_invalid"], "n_samples": n}
    summary.recordings += 1
    summary.samples[split] += n
    for lab in res["label"].tolist():
        summary.per_class[split][lab] += 1
    summary.events += res["n_events"]
    summary.events_in_samples += int(res["lengths"].sum())
    summary.invalid_dropped += res["n_invalid"]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="convert")
