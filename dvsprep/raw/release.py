"""The raw release: label csvs, trial lists, what a recording name may be, locating (and safely
extracting) DvsGesture/, the published manifest, and cutting a recording's events into samples."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

import numpy as np

from ..atomic import remove_path, scratch_dir
from ..constants import ARCHIVE_NAME, LABEL_DTYPE, N_CLASSES, RELEASE_DIR, TRIAL_LISTS
from ..errors import (
    DvsprepError,
    LabelFormatError,
    MissingFileError,
    ReleaseError,
    ResourceLimitError,
    UnsafeArchiveError,
    one_line,
)
from ..inputs import RAW_RELEASE, InputKind, kind_of, release_folder
from ..resources import check_free_space, disk_full

log = logging.getLogger(__name__)

LABEL_HEADER = ("class", "startTime_usec", "endTime_usec")
# data_manifests/ at the top of the repository, shipped in the wheel as dvsprep/data (a link to it)
MANIFEST_PATH = Path(__file__).resolve().parents[1] / "data" / "dvs128_gesture.json"

# Text files of the release are a few KB (a label csv ~300 bytes, a trial list ~2 KB).
MAX_TEXT_BYTES = 1 << 20
INT64_MAX = (1 << 63) - 1
_DIGITS = re.compile(r"[0-9]+")  # ASCII digits only: no sign, '_', spaces or other scripts' digits

# Bounds on what an archive may declare, checked on each member's header before its data is
# read. The real release is ~3 GB as tar.gz, ~5 GB extracted, 249 files; the one published
# recording size is 67,386,381 bytes (user01_natural.aedat). Synthetic and unknown releases get
# the same generous bounds.
MAX_RECORDING_BYTES = 512 << 20      # per .aedat member
MAX_OTHER_MEMBER_BYTES = 16 << 20    # per other file (csv, txt)
MAX_RELEASE_BYTES = 8 << 30          # all members together
MAX_MEMBERS = 10_000


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
    text = _read_text(path, "label file")
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
        cls, start, end = (_number(path, n, f) for f in fields)
        if not 1 <= cls <= N_CLASSES:
            raise LabelFormatError(f"{path}: line {n}: class {cls} outside 1..{N_CLASSES}")
        if start < 0 or end < start:
            raise LabelFormatError(f"{path}: line {n}: bad time window [{start}, {end})")
        rows.append((cls - 1, start, end))
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return LabelRows(arr[:, 0].astype(LABEL_DTYPE), arr[:, 1].copy(), arr[:, 2].copy())


def _read_text(path: Path, what: str) -> str:
    """A small UTF-8 text file of the release (BOM allowed); LabelFormatError when it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise LabelFormatError(f"{path}: is a directory, expected a {what}") from None
    if len(data) > MAX_TEXT_BYTES:
        raise LabelFormatError(f"{path}: over {MAX_TEXT_BYTES} bytes, not a {what} of the release")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _number(path: Path, n: int, field: str) -> int:
    """A label-csv field: plain ASCII decimal digits (no sign, '_' or other scripts' digits), within int64."""
    if not _DIGITS.fullmatch(field):
        shown = field if len(field) <= 32 else field[:32] + "..."
        what = "negative value" if _DIGITS.fullmatch(field.removeprefix("-")) else "non-numeric field"
        raise LabelFormatError(f"{path}: line {n}: {what} {shown!r} (expected digits 0-9 only)")
    # (int() of a very long digit string is slow, or refused by Python: compare lengths first,
    # of the significant digits: "007" is 7, and so is 7 after 5000 zeros)
    significant = field.lstrip("0") or "0"
    if len(significant) > 19 or int(significant) > INT64_MAX:
        raise LabelFormatError(f"{path}: line {n}: value {field[:24]}... is above the int64 range")
    return int(significant)



def parse_trials(path: str | os.PathLike) -> list[str]:
    """Recording file names of a trial list (whitespace and CR stripped, blank lines skipped)."""
    path = Path(path)
    text = _read_text(path, "trial list")
    names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for name in names:
        if ("/" in name or "\\" in name or not name.endswith(".aedat") or not name.isprintable()
                or name.startswith(".")):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise LabelFormatError(f"{path}: {shown!r} is not a recording file name")
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


_LAYOUT = f"a DvsGesture release holds files at the archive root or in {RELEASE_DIR}/ only"
_COPY_BUF = 1 << 20


def _member_parts(archive: Path, m: tarfile.TarInfo) -> tuple[str, ...] | None:
    """Check one member's header (before any of its data is read): where it goes in the
    extraction folder, or None for the top folders themselves."""
    name = m.name
    pure = PurePosixPath(name)
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in pure.parts or "\\" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside the extraction directory")
    if not (m.isfile() or m.isdir()):
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a link or special file; refusing it")
    try:  # tarfile's own "data" rules as a second line of defence
        tarfile.data_filter(m, "/dvsprep-extract")
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"{archive}: member {name!r}: {one_line(exc)}") from None
    parts = tuple(p for p in pure.parts if p != ".")
    if m.isdir():
        if parts in ((), (RELEASE_DIR,)):
            return None
        raise ReleaseError(f"{archive}: member {name!r} is not part of the release ({_LAYOUT})")
    if not (len(parts) == 1 or (len(parts) == 2 and parts[0] == RELEASE_DIR)):
        raise ReleaseError(f"{archive}: member {name!r} is not part of the release ({_LAYOUT})")
    if not parts[-1].isprintable():
        raise ReleaseError(f"{archive}: member {name!r} has a name no release file has")
    check_member_size(archive, m)
    return parts


def check_member_size(archive: Path, m: tarfile.TarInfo, total: int = 0) -> int:
    """Bound what one member header declares (MAX_RECORDING_BYTES for .aedat, else
    MAX_OTHER_MEMBER_BYTES; no sparse files) and the running total (MAX_RELEASE_BYTES).
    Returns the new total. Call it before reading the member's data."""
    if m.issparse():
        raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a sparse file (the release has none); refusing it")
    recording = m.name.endswith(".aedat")
    bound = MAX_RECORDING_BYTES if recording else MAX_OTHER_MEMBER_BYTES
    if m.size > bound:
        raise ResourceLimitError(
            f"{archive}: member {m.name!r} declares {m.size:,} bytes, over the {bound:,}-byte bound for "
            f"{'a recording' if recording else 'a release text file'}; refusing the archive"
        )
    total += m.size
    if total > MAX_RELEASE_BYTES:
        raise ResourceLimitError(
            f"{archive}: members declare more than {MAX_RELEASE_BYTES:,} bytes in all, over the "
            f"bound for a DVS128 Gesture release (~5 GB extracted); refusing the archive")
    return total


def _archive_mode(archive: Path, f: BinaryIO) -> str:
    """tarfile's stream mode for a gzip-compressed or plain tar, from the first bytes."""
    head = f.read(512)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return "r|gz"
    if head[257:262] == b"ustar":
        return "r|"
    raise ReleaseError(f"{archive}: not a gzip-compressed tar archive")


def _extract_member(archive: Path, tf: tarfile.TarFile, m: tarfile.TarInfo, target: Path) -> None:
    src = tf.extractfile(m)
    target.parent.mkdir(exist_ok=True)
    try:
        out = open(target, "xb")
    except FileExistsError:
        raise ReleaseError(f"{archive}: member {m.name!r} appears twice") from None
    with out:
        left = m.size
        while left:
            chunk = src.read(min(left, _COPY_BUF))
            if not chunk:
                raise ReleaseError(f"{archive}: member {m.name!r} is truncated")
            out.write(chunk)
            left -= len(chunk)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tar(.gz) release into the folder `dest`, streaming, one member at a time.

    Each member's header is checked before its data is read: no absolute paths, '..', links,
    devices or sparse files; only files at the root or in DvsGesture/; sizes within
    MAX_RECORDING_BYTES per recording, MAX_OTHER_MEMBER_BYTES per other file, MAX_RELEASE_BYTES
    and MAX_MEMBERS in all; and free space for the member (plus resources.FREE_SPACE_RESERVE) on `dest`'s
    disk. A refused archive is refused at the first bad header (a 20 GB member declared in a
    2 MB archive costs nothing). What was extracted stays in `dest` for the caller to remove.
    """
    archive, dest = Path(archive), Path(dest)
    try:
        f = open(archive, "rb")
    except FileNotFoundError:
        raise MissingFileError(f"{archive}: no such file") from None
    with f:
        mode = _archive_mode(archive, f)
        check_free_space(archive, dest.parent, os.fstat(f.fileno()).st_size)  # never smaller extracted
        total = count = 0
        try:
            with tarfile.open(fileobj=f, mode=mode) as tf:
                for m in tf:
                    count += 1
                    if count > MAX_MEMBERS:
                        raise ResourceLimitError(f"{archive}: more than {MAX_MEMBERS:,} members; "
                                                 f"not a DVS128 Gesture release")
                    parts = _member_parts(archive, m)
                    if parts is None:
                        continue
                    total = check_member_size(archive, m, total)
                    check_free_space(archive, dest.parent, m.size)
                    _extract_member(archive, tf, m, dest.joinpath(*parts))
        except DvsprepError:
            raise
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise ReleaseError(f"{archive}: unreadable archive ({one_line(exc)})") from None
        except OSError as exc:
            if disk_full(exc):
                raise ResourceLimitError(f"{archive}: no space left on device to extract it in {dest.parent}") from None
            raise ReleaseError(f"{archive}: cannot extract ({exc.strerror or one_line(exc)})") from None


find_release_dir = release_folder  # the one rule for "RAW/DvsGesture or RAW itself" (dvsprep.inputs)


@contextlib.contextmanager
def open_release(raw: str | os.PathLike, scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield the DvsGesture directory for RAW: a folder holding DvsGesture/ (or DvsGesture.tar.gz),
    that folder itself, or a .tar.gz/.tgz/.tar (extracted by `safe_extract` into a PID-named
    scratch folder under `scratch`, default the system temp folder, removed afterwards whatever
    happens). Anything else is one ReleaseError (MissingFileError when absent)."""
    kind = kind_of(raw, RAW_RELEASE, error=ReleaseError)
    raw = Path(raw)
    if kind is InputKind.RAW_TAR:
        tmp = None
        try:
            tmp = scratch_dir(Path(scratch) if scratch is not None else Path(tempfile.gettempdir()), "extract")
            safe_extract(raw, tmp)
            found = find_release_dir(tmp)
            if found is None:
                raise ReleaseError(f"{raw}: archive holds no {RELEASE_DIR}/{TRIAL_LISTS['train']}")
            yield found
        finally:
            if tmp is not None:
                remove_path(tmp)
        return
    found = find_release_dir(raw)
    if found is not None:
        yield found
        return
    with open_release(raw / ARCHIVE_NAME, scratch) as rel:  # the only other RAW_DIR: it holds the archive
        yield rel


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
