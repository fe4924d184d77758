"""The raw release: label csvs, trial lists, locating (and safely extracting) DvsGesture/,
the published manifest, and cutting a recording's events into samples."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .constants import LABEL_DTYPE, N_CLASSES
from .errors import LabelFormatError, MissingFileError, ReleaseError, UnsafeArchiveError

LABEL_HEADER = ("class", "startTime_usec", "endTime_usec")
RELEASE_DIR = "DvsGesture"
ARCHIVE_NAME = "DvsGesture.tar.gz"
TRIAL_LISTS = {"train": "trials_to_train.txt", "test": "trials_to_test.txt"}
MANIFEST_PATH = Path(__file__).resolve().parent / "data" / "dvs128_gesture.json"


@dataclass(frozen=True)
class LabelRows:
    """Rows of one label csv: label uint8 [R] (0..10), start/end int64 [R] µs."""

    label: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class Recording:
    stem: str
    split: str
    aedat: Path
    labels: Path


def parse_labels(path: str | os.PathLike) -> LabelRows:
    """Parse `<recording>_labels.csv` (CRLF or LF). Class 1..11 becomes label 0..10."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise MissingFileError(f"{path}: label file does not exist") from None
    except UnicodeDecodeError as exc:
        raise LabelFormatError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(n, ln) for n, ln in lines if ln]
    if not lines:
        raise LabelFormatError(f"{path}: empty label file")
    header = tuple(f.strip() for f in lines[0][1].split(","))
    if header != LABEL_HEADER:
        raise LabelFormatError(
            f"{path}: line {lines[0][0]}: header is {lines[0][1]!r}, expected {','.join(LABEL_HEADER)!r}"
        )
    rows = []
    for n, ln in lines[1:]:
        fields = [f.strip() for f in ln.split(",")]
        if len(fields) != 3:
            raise LabelFormatError(f"{path}: line {n}: expected 3 fields, found {len(fields)}")
        try:
            cls, start, end = (int(f) for f in fields)
        except ValueError:
            bad = next(f for f in fields if not f.lstrip("-").isdigit())
            raise LabelFormatError(f"{path}: line {n}: non-numeric field {bad!r}") from None
        if not 1 <= cls <= N_CLASSES:
            raise LabelFormatError(f"{path}: line {n}: class {cls} outside 1..{N_CLASSES}")
        if start < 0 or end < start:
            raise LabelFormatError(f"{path}: line {n}: bad time window [{start}, {end})")
        rows.append((cls - 1, start, end))
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return LabelRows(arr[:, 0].astype(LABEL_DTYPE), arr[:, 1].copy(), arr[:, 2].copy())


def parse_trials(path: str | os.PathLike) -> list[str]:
    """Recording file names of a trial list (whitespace and CR stripped, blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFileError(f"{path}: trial list does not exist") from None
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for name in names:
        if "/" in name or "\\" in name or not name.endswith(".aedat"):
            raise LabelFormatError(f"{path}: {name!r} is not a recording file name")
    if len(set(names)) != len(names):
        raise LabelFormatError(f"{path}: lists a recording twice")
    return names


def sj_sample_names(labels: np.ndarray, stem: str) -> list[str]:
    """SpikingJelly's relative file name per row: `<label>/<stem>_<k>.npz`, where k counts
    earlier rows of the same label in that recording."""
    seen = [0] * N_CLASSES
    names = []
    for lab in np.asarray(labels).tolist():
        names.append(f"{lab}/{stem}_{seen[lab]}.npz")
        seen[lab] += 1
    return names


def list_recordings(release: str | os.PathLike) -> list[Recording]:
    """Recordings of both splits, sorted by (split: train first, stem), with existence checked."""
    release = Path(release)
    recs = []
    seen: dict[str, str] = {}
    for split, fname in TRIAL_LISTS.items():
        for name in sorted(parse_trials(release / fname)):
            stem = name[: -len(".aedat")]
            if stem in seen:
                raise ReleaseError(f"{release / fname}: {name} is also in the {seen[stem]} list")
            seen[stem] = split
            aedat = release / name
            if not aedat.is_file():
                raise MissingFileError(f"{release / fname}: names {name}, which does not exist in {release}")
            labels = release / f"{stem}_labels.csv"
            if not labels.is_file():
                raise MissingFileError(f"{labels}: label file for {name} does not exist")
            recs.append(Recording(stem, split, aedat, labels))
    return recs


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    parts = Path(m.name).parts
    if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {m.name!r} would be written outside the extraction directory")
    if not (m.isfile() or m.isdir()):
        raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a link or special file; refusing it")


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tar(.gz) into `dest`, refusing absolute paths, '..', links and devices."""
    archive = Path(archive)
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            for m in members:
                _check_member(archive, m)
            for m in members:
                # filter="data" repeats our checks inside tarfile as a second line of defence.
                tf.extract(m, dest, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError) and not archive.exists():
            raise MissingFileError(f"{archive}: no such file") from None
        raise ReleaseError(f"{archive}: unreadable archive ({exc})") from None


@contextlib.contextmanager
def open_release(raw: str | os.PathLike, scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield the DvsGesture directory for RAW: a folder holding DvsGesture/, that folder itself,
    or DvsGesture.tar.gz (extracted into a temporary folder under `scratch`, removed afterwards)."""
    raw = Path(raw)
    if raw.is_file():
        if not raw.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise ReleaseError(f"{raw}: not a release folder or a .tar.gz archive")
        tmp = Path(tempfile.mkdtemp(prefix=".dvsprep-extract-", dir=scratch))
        try:
            safe_extract(raw, tmp)
            found = [p for p in (tmp / RELEASE_DIR, tmp) if (p / TRIAL_LISTS["train"]).is_file()]
            if not found:
                raise ReleaseError(f"{raw}: archive holds no {RELEASE_DIR}/{TRIAL_LISTS['train']}")
            yield found[0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    if not raw.exists():
        raise MissingFileError(f"{raw}: no such file or directory")
    for cand in (raw / RELEASE_DIR, raw):
        if (cand / TRIAL_LISTS["train"]).is_file():
            yield cand
            return
    if (raw / ARCHIVE_NAME).is_file():
        with open_release(raw / ARCHIVE_NAME, scratch) as rel:
            yield rel
        return
    raise ReleaseError(f"{raw}: no {TRIAL_LISTS['train']} here or in {RELEASE_DIR}/ (not a DvsGesture release)")


def load_published_manifest() -> dict:
    """The facts of the real IBM release (data_manifests/dvs128_gesture.json)."""
    return json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))


def cut_samples(t: np.ndarray, rows: LabelRows) -> list[np.ndarray | slice]:
    """Per row, the events with start <= t < end in file order: a slice when t is sorted
    (the usual case), else an index array from a mask. Overlapping rows share events."""
    if t.shape[0] == 0 or bool(np.all(t[1:] >= t[:-1])):
        a = np.searchsorted(t, rows.start, side="left")
        b = np.searchsorted(t, rows.end, side="left")
        return [slice(int(i), int(max(i, j))) for i, j in zip(a, b)]
    return [np.flatnonzero((t >= s) & (t < e)) for s, e in zip(rows.start.tolist(), rows.end.tolist())]
