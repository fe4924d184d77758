"""`dvsprep verify`: prove a store (or the raw release) is intact and is the one it claims to be.

- Frame store (directory, .zip, or URL): every file's size and sha256 against manifest.json;
  corrupt, missing and extra files are listed with the split and samples they hold, the
  layout is checked against what dvsprep writes and every array is read back (the checks of
  `dvsprep.frames.check`, which the readers run too).
- events.h5: every dataset's sha256 (and dtype, shape) against the embedded manifest, the root
  attributes' digest, and the stored fingerprint against the manifest's hash.
- Raw release (folder or tar.gz, streamed without extracting): per-recording md5 against
  data_manifests/dvs128_gesture.json, missing and extra recordings, the other published files,
  the trial lists, and the archive's md5.

Each yields a `VerifyReport` (`dvsprep.integrity.report`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterable, Mapping

from .frames import MAX_MANIFEST_BYTES, StoreFiles, open_store_files, parse_manifest
from .errors import MissingFileError, StoreError
from .frames import check_layout, content_problems, decoded_before, note_decoding, read_meta_arrays, scan_files
from .frames import check_fingerprint
from .integrity import MANIFEST_NAME, md5_files, md5_stream
from .integrity import Problem, VerifyReport
from .integrity import trust
from .inputs import FRAME_STORE, RAW_RELEASE, InputKind, kind_of

log = logging.getLogger(__name__)

_BUF = 1 << 22


# ----------------------------------------------------------------------------- frame stores


def _range(a: int, b: int) -> str:
    return f"sample {a}" if b - a == 1 else f"samples {a}-{b - 1}"


def _holds(name: str, attrs: Mapping[str, Any] | None, metas: Mapping[str, Any] | None,
           ids: Mapping[str, list[tuple[str, int]]]) -> str:
    """What a store file holds: 'train samples 32-63 (user01_lab#0, ...)', or ''."""
    parts = name.split("/")
    if name == "zarr.json":
        return "the store's attributes (all samples)"
    if attrs is None or parts[0] not in attrs.get("splits", {}) or len(parts) < 3:
        return ""
    split, arr = parts[0], parts[1]
    n = int(attrs["splits"][split]["n_samples"])
    if parts[2] == "zarr.json":
        return f"the {arr} metadata of every {split} sample ({n})"
    if parts[2] != "c" or len(parts) < 4 or not parts[3].isdigit() or metas is None or arr not in metas.get(split, {}):
        return ""
    chunk = int(metas[split][arr]["chunk_grid"]["configuration"]["chunk_shape"][0])
    k = int(parts[3])
    a, b = k * chunk, min((k + 1) * chunk, n)
    if a >= b:
        return ""
    what = "frames of" if arr == "frames" else f"{arr} of"
    sample_ids = ids.get(split)
    named = ""
    if sample_ids:
        few = [f"{r}#{row}" for r, row in sample_ids[a:min(b, a + 4)]]
        named = f" ({', '.join(few)}{', ...' if b - a > 4 else ''})"
    return f"{what} {split} {_range(a, b)}{named}"


def _sample_ids(files: StoreFiles, layout: Any, problems: Iterable[Problem]) -> dict[str, list[tuple[str, int]]]:
    """(recording, row) per sample of each split whose metadata reads back intact."""
    bad = {p.name for p in problems}
    out: dict[str, list[tuple[str, int]]] = {}
    for split, metas in layout.metas.items():
        if any(name.startswith((f"{split}/recording/", f"{split}/row/")) for name in bad):
            continue
        try:
            meta = read_meta_arrays(files, split, metas, int(layout.attrs["splits"][split]["n_samples"]),
                                    fields=("recording", "row"))
        except (StoreError, OSError):
            continue
        out[split] = list(zip(meta["recording"], (int(r) for r in meta["row"])))
    return out


def _invalid(source: str, name: str, exc: BaseException, checked: int = 0) -> VerifyReport:
    detail = str(exc).split(": ", 1)[-1] if isinstance(exc, (StoreError, OSError)) else \
        f"cannot be checked ({type(exc).__name__}: {str(exc)[:200]})"
    return VerifyReport(path=source, kind="frames", checked=checked, problems=[Problem("invalid", name, detail)])


def verify_store(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 expected_fingerprint: str | None = None, jobs: int | None = None, *,
                 decode: bool = False) -> VerifyReport:
    """Verify a frame store (directory, .zip, or http(s) URL fetched into the cache).

    Never raises for what the store holds: every unreadable, undecodable or inconsistent file
    is a listed problem (MissingFileError only when nothing is there, and download errors for
    a URL). A store that verifies gets a verified-marker (`dvsprep.integrity.trust`), so readers open it
    without hashing it again. Files are hashed (and shards decoded) on `jobs` threads (default: CPUs).
    Samples are decoded unless this content was decoded on this machine before (`decode`: always)."""
    from .frames import remote

    source = str(path)
    if remote.is_url(source):
        remote.check_url(source)
        local, pinned = remote.fetch_store(source, cache_dir=cache_dir)
        expected_fingerprint = expected_fingerprint or pinned
    else:
        local = Path(path)
    try:
        files = open_store_files(local)
    except MissingFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - verify reports, it does not raise
        return _invalid(source, Path(local).name, exc)
    try:
        return _verify_opened(files, source, expected_fingerprint, jobs, decode)
    except Exception as exc:  # noqa: BLE001 - a check we did not foresee failing is still a report
        log.debug("verify %s", source, exc_info=True)
        return _invalid(source, "store", exc)


def _verify_opened(files: StoreFiles, source: str, expected_fingerprint: str | None,
                   jobs: int | None = None, decode: bool = False) -> VerifyReport:
    if files.span(MANIFEST_NAME) is None:
        return VerifyReport(path=source, kind="frames", checked=len(files.names()),
                            problems=[Problem("missing", MANIFEST_NAME, "no manifest: an incomplete store "
                                              "(interrupted write?) or not a dvsprep frame store")])
    stamps = files.stamps()
    started = trust.now_ns()
    try:
        manifest = parse_manifest(files.read(MANIFEST_NAME, MAX_MANIFEST_BYTES), source)
    except (StoreError, OSError) as exc:
        return _invalid(source, MANIFEST_NAME, exc, len(files.names()))
    layout = layout_error = None
    try:
        layout = check_layout(files)
    except (StoreError, OSError) as exc:
        layout_error = exc
    # every file hashed once, and every shard decoded from the same bytes (on `jobs` threads),
    # unless this content was decoded on this machine before
    frames = layout is not None and (decode or not decoded_before(layout))
    report, checked = scan_files(files, manifest, source, layout if frames else None, jobs)
    bad = {p.name for p in report.problems}
    if layout_error is not None and not any(n.endswith("zarr.json") for n in bad):  # else already reported
        report.problems.append(Problem("invalid", "layout", str(layout_error).split(": ", 1)[-1]))
    if layout is not None:
        for kind, name, detail in content_problems(files, layout, bad, checked, frames=frames):
            report.problems.append(Problem(kind, name, detail))
        ids = _sample_ids(files, layout, report.problems) if report.problems else {}
        for p in report.problems:
            p.holds = _holds(p.name, layout.attrs, layout.metas, ids)
    if expected_fingerprint:
        try:
            check_fingerprint(report.fingerprint, expected_fingerprint, source)
        except StoreError as exc:
            report.problems.append(Problem("mismatch", "fingerprint", str(exc).split(": ", 1)[-1]))
    if files.kind == "zip":
        report.notes.append(f"zip: {files.path.stat().st_size} bytes, {len(files.names())} members, uncompressed")
    if layout is not None:
        note_decoding(report, layout, frames)
    if report.ok and layout is not None:
        trust.record_verified("frames", files.path, layout.fingerprint, stamps, started)
    elif not report.ok:
        trust.forget("frames", files.path)
    return report


# ----------------------------------------------------------------------------- events.h5


def verify_events(path: str | os.PathLike, jobs: int | None = None) -> VerifyReport:
    """Recompute an events.h5 manifest and compare it dataset by dataset, and check every value
    the readers check (offsets, labels, names, events inside the sensor). Never raises for what
    the file holds (MissingFileError only when it is absent); a file that verifies gets a
    verified-marker (`dvsprep.integrity.trust`). Event datasets are hashed as stored
    (`dvsprep.events.stored`) on `jobs` threads (default: CPUs)."""
    from .errors import DvsprepError
    from .events import EventsFile

    path = Path(path)
    try:
        stamps = {"": trust.stamp_path(path)}
        started = trust.now_ns()
        ef = EventsFile(path, check="none")
    except MissingFileError:
        raise
    except (DvsprepError, OSError) as exc:
        return VerifyReport(path=str(path), kind="events", checked=0,
                            problems=[Problem("invalid", path.name, str(exc).split(": ", 1)[-1])])
    with ef:
        try:
            problems = ef.problems(jobs) if jobs is not None else ef.problems()
            n = len(ef.manifest["datasets"]) if not any(k == "missing" and name == "manifest"
                                                      for k, name, _ in problems) else 0
            fp = ef.fingerprint if n else ""
        except Exception as exc:  # noqa: BLE001 - a check we did not foresee failing is still a report
            log.debug("verify %s", path, exc_info=True)
            problems, n, fp = [("invalid", path.name, f"cannot be checked ({type(exc).__name__}: {exc})")], 0, ""
    report = VerifyReport(path=str(path), kind="events", checked=n, fingerprint=fp,
                          problems=[Problem(k, name, detail) for k, name, detail in problems])
    if report.ok:
        trust.record_verified("events", path, fp, stamps, started)
    else:
        trust.forget("events", path)
    return report


# ----------------------------------------------------------------------------- raw release


class _HashingReader:
    """A read-only file wrapper that md5s every byte read through it."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.md5 = hashlib.md5()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.md5.update(b)
        return b

    def drain(self) -> str:
        while self.read(_BUF):
            pass
        return self.md5.hexdigest()


def _release_files_from_tar(archive: Path) -> tuple[dict[str, str], dict[str, bytes], str]:
    """Stream a tar(.gz): ({file name: md5}, {trial list name: bytes}, archive md5). Only files at
    the archive root or in DvsGesture/ are release files."""
    from .raw import RELEASE_DIR, SYNTH_RECORD, TRIAL_LISTS, check_member_size

    md5s: dict[str, str] = {}
    lists: dict[str, bytes] = {}
    total = 0
    with open(archive, "rb") as f:
        hr = _HashingReader(f)
        try:
            with tarfile.open(fileobj=hr, mode="r|*") as tf:
                for m in tf:
                    total = check_member_size(archive, m, total)  # before reading (or skipping) its data
                    parts = PurePosixPath(m.name).parts
                    if not m.isfile() or not (len(parts) == 1 or (len(parts) == 2 and parts[0] == RELEASE_DIR)):
                        continue
                    fobj = tf.extractfile(m)
                    if parts[-1] in (*TRIAL_LISTS.values(), SYNTH_RECORD):
                        data = fobj.read(1 << 20)
                        lists[parts[-1]] = data
                        md5s[parts[-1]] = hashlib.md5(data).hexdigest()
                    else:
                        md5s[parts[-1]] = md5_stream(fobj)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise StoreError(f"{archive}: unreadable archive ({exc})") from None
        return md5s, lists, hr.drain()


def _release_files_from_dir(folder: Path, jobs: int) -> tuple[dict[str, str], dict[str, bytes]]:
    from .raw import SYNTH_RECORD, TRIAL_LISTS

    md5s = md5_files(folder, jobs)
    lists = {}
    for name in md5s:
        if name in (*TRIAL_LISTS.values(), SYNTH_RECORD):
            with open(folder / name, "rb") as f:
                lists[name] = f.read(1 << 20)
    return md5s, lists


def verify_release(raw: str | os.PathLike, jobs: int | None = None) -> VerifyReport:
    """Check a raw release (folder holding DvsGesture/, that folder, or a tar(.gz)) against the
    published manifest."""
    from .raw import ARCHIVE_NAME, SYNTH_RECORD, TRIAL_LISTS, find_release_dir, load_published_manifest

    kind = kind_of(raw, RAW_RELEASE)
    raw = Path(raw)
    published = load_published_manifest()
    archive_md5 = None
    if kind is InputKind.RAW_TAR:
        md5s, lists, archive_md5 = _release_files_from_tar(raw)
    else:
        folder = find_release_dir(raw)
        if folder is None:  # the only other RAW_DIR: a folder holding the archive
            return verify_release(raw / ARCHIVE_NAME, jobs)
        md5s, lists = _release_files_from_dir(folder, jobs or os.cpu_count() or 1)
    if SYNTH_RECORD in lists:
        return _verify_synthetic(raw, md5s, lists[SYNTH_RECORD])
    expected: dict[str, str] = published["recordings"]
    found = {n: h for n, h in md5s.items() if n.endswith(".aedat")}
    report = VerifyReport(path=str(raw), kind="raw", checked=len(found))
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            report.problems.append(Problem("missing", name, "published recording not in the release"))
        elif name not in expected:
            report.problems.append(Problem("extra", name, "not a published recording"))
        elif found[name] != expected[name]:
            report.problems.append(Problem("mismatch", name, f"md5 {found[name]}, published {expected[name]}"))
        if name in found and f"{name[:-len('.aedat')]}_labels.csv" not in md5s:
            report.problems.append(Problem("missing", f"{name[:-len('.aedat')]}_labels.csv",
                                           f"label file of {name}"))
    kinds = [p.kind for p in report.problems if p.name.endswith(".aedat")]
    report.notes.append(f"recordings: {sum(n in expected and found[n] == expected[n] for n in found)} match, "
                        f"{kinds.count('mismatch')} differ from the published md5, {kinds.count('missing')} "
                        f"missing, {kinds.count('extra')} extra")
    for name, md5 in published.get("other_files", {}).items():
        if name not in md5s:
            report.problems.append(Problem("missing", name, "published file not in the release"))
        elif md5s[name] != md5:
            report.problems.append(Problem("mismatch", name, f"md5 {md5s[name]}, published {md5}"))
    for split, fname in TRIAL_LISTS.items():
        if fname not in lists:
            report.problems.append(Problem("missing", fname, "trial list"))
            continue
        names = {ln.strip() for ln in lists[fname].decode("utf-8", "replace").splitlines() if ln.strip()}
        want = set(published.get(split, []))
        if want and names != want:
            report.problems.append(Problem("mismatch", fname, f"{len(names - want)} name(s) not in the published "
                                           f"{split} list, {len(want - names)} published name(s) absent"))
    if archive_md5 is not None:
        pub = published.get("archive", {}).get("md5")
        if archive_md5 != pub:
            report.problems.append(Problem("mismatch", f"{raw.name} (archive)", f"md5 {archive_md5}, published {pub}"))
        else:
            report.notes.append(f"archive md5 {archive_md5} matches the published {published['archive']['name']}")
    report.checked = len(md5s) + (archive_md5 is not None)
    return report


def _verify_synthetic(raw: Path, md5s: dict[str, str], record_bytes: bytes) -> VerifyReport:
    """A release written by `dvsprep synth`: every file against the md5s its SYNTH_RECORD lists
    (the published md5s are of the IBM recordings, which it does not hold)."""
    from .raw import SYNTH_FORMAT, SYNTH_RECORD

    report = VerifyReport(path=str(raw), kind="raw", checked=len(md5s))
    try:
        record = json.loads(record_bytes)
        listed, seed = record["md5"], record["seed"]
        if record.get("format") != SYNTH_FORMAT or not isinstance(listed, dict) or not isinstance(seed, int):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        report.problems.append(Problem("invalid", SYNTH_RECORD, f"not a record of dvsprep synth ({SYNTH_FORMAT})"))
        return report
    report.title = f"synthetic release (dvsprep synth, seed {seed})"
    for name in sorted(set(listed) | set(md5s) - {SYNTH_RECORD}):
        if name not in md5s:
            report.problems.append(Problem("missing", name, f"written by dvsprep synth, listed in {SYNTH_RECORD}"))
        elif name not in listed:
            report.problems.append(Problem("extra", name, f"not written by dvsprep synth (not in {SYNTH_RECORD})"))
        elif md5s[name] != listed[name]:
            report.problems.append(Problem("mismatch", name, f"md5 {md5s[name]}, {SYNTH_RECORD} says {listed[name]}"))
    report.checked = len(md5s) - 1
    report.notes.append(f"not the published DVS128 Gesture release: every file checked against {SYNTH_RECORD}, "
                        f"which dvsprep synth wrote with it")
    return report


# ----------------------------------------------------------------------------- dispatch


def verify_path(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                expected_fingerprint: str | None = None, jobs: int | None = None, *,
                decode: bool = False) -> VerifyReport:
    """Verify whatever PATH is: frame store (dir, .zip, URL), events.h5, or raw release.
    `decode`: decode every frame-store sample even when its content was decoded here before."""
    kind = kind_of(path, FRAME_STORE | RAW_RELEASE | {InputKind.EVENTS})
    if kind is InputKind.URL:
        return verify_store(path, cache_dir=cache_dir, expected_fingerprint=expected_fingerprint, jobs=jobs,
                            decode=decode)
    p = Path(path)
    if kind in FRAME_STORE:
        return verify_store(p, expected_fingerprint=expected_fingerprint, jobs=jobs, decode=decode)
    if kind in RAW_RELEASE:
        return verify_release(p, jobs)
    report = verify_events(p, jobs)
    if expected_fingerprint and not report.fingerprint.startswith(expected_fingerprint.lower()):
        report.problems.append(Problem("mismatch", "fingerprint", f"{report.fingerprint[:16]}... differs "
                                       f"from the expected {expected_fingerprint[:16]}..."))
    return report
