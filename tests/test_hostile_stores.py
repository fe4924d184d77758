"""Hostile and unlucky stores through the command line: every reader refuses with one line
naming the file (exit 1, no traceback), writes nothing, leaves the input as it was; `verify`
lists the problem instead of crashing. The frame-store cases run over every form a store
travels in (directory, zip, and both over http; see store_forms.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.atomic import output_lock
from dvsprep.cli import main
from dvsprep.errors import DvsprepError, IntegrityError, MissingFileError, StoreError, UntrustedStoreError
from dvsprep.frames.store import open_frame_store
from hostile_fixtures import (edit_json, flip, resign, resign_events, snapshot, tiny_events, tiny_store, vlen,
                              zstd)
from previous_output import lay_previous, tree
from store_forms import FORMS


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line(res, path) -> None:
    """exit 1, exactly one line on stderr, `error: <path>: ...`, no traceback, nothing on stdout."""
    assert res.exit_code == 1, (res.output, res.exception)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"error: {path}"), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    tiny_store(root / "s.zarr")
    tiny_events(root / "events.h5")
    return root


# ----------------------------------------------------------------------------- frame stores


def _million(s: Path) -> None:
    """Declares 1,000,000 samples per split in 20 KB (the chunks absent, the manifest re-made)."""
    n = 1_000_000
    edit_json(s, "zarr.json", lambda m: [m["attributes"]["splits"][k].update(n_samples=n) for k in ("train", "test")])
    for split in ("train", "test"):
        for arr in ("frames", "label", "recording", "row", "t_start", "t_end", "n_events"):
            edit_json(s, f"{split}/{arr}/zarr.json", lambda m: m.update(shape=[n, *m["shape"][1:]]))
    resign(s)


def _label_chunk(values) -> bytes:
    return zstd(np.asarray(values, np.uint8).tobytes())


def _link(s: Path) -> None:
    """A chunk replaced by a link to a file outside the store with the very same bytes."""
    chunk = s / "test/label/c/0"
    outside = s.parent / "outside"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(outside, chunk)


def _fifo(s: Path) -> None:
    (s / "test/label/c/0").unlink()
    os.mkfifo(s / "test/label/c/0")


@dataclass(frozen=True)
class Arrival:
    """The http form's download refuses the store itself (each file is checked as it arrives):
    `verify` too then says it in one line instead of listing it."""
    refusal: str
    error: type | None = None   # when the download's refusal is of another class than the readers'


@dataclass(frozen=True)
class Worded:
    """This form's reader words the same refusal its own way (a zip member, not a file)."""
    refusal: str
    listed: str


@dataclass(frozen=True)
class Cannot:
    """This form cannot hold the case (the combination is skipped, the reason in its test id)."""
    reason: str


ACCEPTED = "accepted"   # this form's reader never sees the tampering, and rightly so (see the case)


@dataclass(frozen=True)
class Case:
    tamper: Callable[[Path], object]
    error: type                 # the exact class every reader raises, in every form
    refusal: str                # in every reader's one line
    listed: str                 # in `verify`'s list
    forms: dict = field(default_factory=dict)   # form -> Arrival, Worded, Cannot or ACCEPTED


STORE_CASES = {
    "label chunk flipped near its end": Case(
        lambda s: flip(s / "train/label/c/0", -2), IntegrityError, "corrupt train/label/c/0",
        "corrupt  train/label/c/0",
        {"http": Arrival("train/label/c/0: arrived with 15 bytes and a sha256 that differs from the store's manifest"),
         "http-zip": Arrival("1 file(s) differ from the store's manifest: corrupt train/label/c/0")}),
    "nested manifest": Case(
        lambda s: (s / "manifest.json").write_text("[" * 100_000 + "]" * 100_000), StoreError,
        "manifest.json is not valid JSON", "invalid  manifest.json",
        {"http": Arrival("manifest.json is not valid JSON"), "http-zip": Arrival("manifest.json is not valid JSON")}),
    "manifest kind edited": Case(
        lambda s: edit_json(s, "manifest.json", lambda m: m.update(kind="events")), StoreError,
        "manifest is for a 'events' store", "invalid  layout"),
    "consolidated metadata": Case(
        lambda s: (edit_json(s, "zarr.json", lambda m: m.update(
            consolidated_metadata={"kind": "inline", "must_understand": False, "metadata": {}})), resign(s)),
        UntrustedStoreError, "not a plain zarr v3 group", "invalid  layout"),
    "a million absent samples": Case(_million, StoreError, "than its manifest lists files (31)", "invalid  layout"),
    "short label chunk": Case(
        lambda s: ((s / "train/label/c/0").write_bytes(_label_chunk([1, 2])), resign(s)), IntegrityError,
        "declares 2 decoded bytes", "train/label/c/0 declares 2 decoded bytes (6 expected)"),
    "label 200": Case(
        lambda s: ((s / "test/label/c/0").write_bytes(_label_chunk([200, 1, 2])), resign(s)), IntegrityError,
        "test/label holds 200", "test/label holds 200, outside 0..10"),
    "labels disagree with per-class counts": Case(
        lambda s: ((s / "test/label/c/0").write_bytes(_label_chunk([0, 0, 0])), resign(s)), IntegrityError,
        "samples per class in test", "count [0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0] samples per class in test"),
    "bad vlen chunk": Case(
        lambda s: ((s / "train/recording/c/0").write_bytes(zstd(b"\x06\x00\x00\x00\xff\xff\xff\x7f")), resign(s)),
        IntegrityError, "train/recording/c/0: string", "train/recording/c/0: string"),
    "non-UTF-8 names": Case(
        lambda s: ((s / "test/recording/c/0").write_bytes(zstd(vlen([b"user01_lab", b"\xff\xfeuser", b"user02_lab"]))),
                   resign(s)), IntegrityError, "not valid UTF-8", "not valid UTF-8"),
    "name with a path": Case(
        lambda s: ((s / "test/recording/c/0").write_bytes(zstd(vlen([b"user01_lab", b"../../evil", b"user02_lab"]))),
                   resign(s)), IntegrityError, "'../../evil', not a recording name", "not a recording name"),
    "codec level 10**30": Case(
        lambda s: (edit_json(s, "train/label/zarr.json", lambda m: m["codecs"][1].update(
            configuration={"level": 10**30, "checksum": False})), resign(s)),
        UntrustedStoreError, "zstd configuration", "invalid  layout"),
    "absent chunk": Case(lambda s: ((s / "test/row/c/0").unlink(), resign(s)), StoreError,
                         "manifest does not list test/row/c/0", "invalid  layout"),
    "garbage in a shard": Case(lambda s: (flip(s / "train/frames/c/0/0/0/0/0", 20), resign(s)), IntegrityError,
                               "invalid train/frames/c/0/0/0/0/0", "invalid  train/frames/c/0/0/0/0/0"),
    "manifest lists a file outside the store": Case(
        lambda s: edit_json(s, "manifest.json", lambda m: m["files"].update(
            {"../../outside.txt": {"sha256": "a" * 64, "size": 3}})), UntrustedStoreError,
        "file name '../../outside.txt' has an empty, '.' or '..' part; refusing it", "invalid  manifest.json",
        {"http": Arrival("file name '../../outside.txt' has an empty, '.' or '..' part; refusing it"),
         "http-zip": Arrival("file name '../../outside.txt' has an empty, '.' or '..' part; refusing it")}),
    "a file the manifest does not list": Case(
        lambda s: (s / "train/notes.txt").write_text("stray"), IntegrityError,
        "extra train/notes.txt (not in the manifest)", "extra    train/notes.txt: not in the manifest",
        {"http": ACCEPTED,   # only the manifest's files are fetched: the copy is the store, nothing stray
         "http-zip": Arrival("1 file(s) differ from the store's manifest: extra train/notes.txt")}),
    "no manifest (an interrupted copy)": Case(
        lambda s: (s / "manifest.json").unlink(), StoreError, "incomplete frame store (no manifest.json)",
        "missing  manifest.json: no manifest",
        {"http": Arrival("/manifest.json: HTTP 404 File not found", MissingFileError),
         "http-zip": Arrival("no manifest.json in the store", MissingFileError)}),
    "a link to a copy of a chunk": Case(
        _link, UntrustedStoreError, "test/label/c/0 is a link or special file; refusing it",
        "invalid  store: test/label/c/0 is a link or special file",
        {"zip": Worded("member 'test/label/c/0' is a symbolic link; refusing it",
                       "invalid  s.zarr.zip: member 'test/label/c/0' is a symbolic link"),
         "http": Cannot("a server sends what a link points to"),
         "http-zip": Arrival("member 'test/label/c/0' is a symbolic link; refusing it")}),
    "a FIFO for a chunk": Case(
        _fifo, UntrustedStoreError, "test/label/c/0 is a link or special file; refusing it",
        "invalid  store: test/label/c/0 is a link or special file",
        {"zip": Worded("member 'test/label/c/0' is not a regular file; refusing it",
                       "invalid  s.zarr.zip: member 'test/label/c/0' is not a regular file"),
         "http": Cannot("a server cannot send a FIFO (it would wait on it forever)"),
         "http-zip": Arrival("member 'test/label/c/0' is not a regular file; refusing it")}),
}


def _store_params():
    for case, spec in STORE_CASES.items():
        for form in FORMS:
            how = spec.forms.get(form)
            if isinstance(how, Cannot):
                yield pytest.param(case, form, id=f"{case}-{form}-cannot: {how.reason}",
                                   marks=pytest.mark.skip(reason=f"{form} cannot hold this: {how.reason}"))
            else:
                yield pytest.param(case, form, id=f"{case}-{form}")


@pytest.mark.parametrize(("case", "form"), list(_store_params()))
def test_tampered_store_is_refused_in_every_form_and_listed_by_verify(base, store_forms, tmp_path, case, form):
    spec = STORE_CASES[case]
    how = spec.forms.get(form)
    refusal, listed = (how.refusal, how.listed) if isinstance(how, Worded) else \
        (how.refusal, None) if isinstance(how, Arrival) else (spec.refusal, spec.listed)
    store = store_forms.place(form)
    shutil.copytree(base / "s.zarr", store)
    spec.tamper(store)
    target = store_forms.target(form, store)
    source = store_forms.source(form, store)
    before = snapshot(source)

    res = _cli("verify", target)
    if how == ACCEPTED:
        assert res.exit_code == 0 and res.stdout.startswith(f"{target}: frame store intact: 31 files match"), res.output
        st = open_frame_store(target)
        assert st.split("train").load_all().shape == (6, 2, 2, 128, 128)
        assert not (st.path / "train/notes.txt").exists()     # the copy in the cache is the manifest's files
        assert snapshot(source) == before
        return
    if isinstance(how, Arrival):
        assert_one_line(res, target)
        assert refusal in res.stderr, res.stderr
    else:
        assert res.exit_code == 1 and res.stdout.startswith(f"{target}: frame store NOT intact"), res.output
        assert listed in res.stdout and res.stderr == "" and "Traceback" not in res.output, res.output
    out = tmp_path / "out"
    kept = lay_previous(out / "kept.png")         # a picture that --force would replace
    for args in (["info", target], ["show", target, "-o", out / "x.png"],
                 ["show", target, "--split", "train", "-o", out / "kept.png", "--force"]):
        res = _cli(*args)
        assert_one_line(res, target)
        assert refusal in res.stderr, res.stderr
    with pytest.raises(DvsprepError) as exc:
        open_frame_store(target).split("train")
    error = how.error if isinstance(how, Arrival) and how.error else spec.error
    assert type(exc.value) is error and str(exc.value).startswith(target) and refusal in str(exc.value)
    assert snapshot(source) == before
    assert tree(out) == kept
    if isinstance(how, Arrival):                 # refused on arrival: nothing kept in the cache
        assert store_forms.downloaded() == []


def test_every_form_of_an_intact_store_opens_alike(base, store_forms, tmp_path):
    """The control for the cases above: untampered, every form opens with the same fingerprint
    and samples, and the zip form is byte for byte what `dvsprep pack` writes."""
    from dvsprep.frames.pack import pack_store

    fps, frames = set(), []
    for form in FORMS:
        store = store_forms.place(form)
        shutil.copytree(base / "s.zarr", store)
        target = store_forms.target(form, store)
        res = _cli("verify", target)
        assert res.exit_code == 0 and res.stdout.startswith(f"{target}: frame store intact: 31 files match"), res.output
        st = open_frame_store(target)
        fps.add(st.fingerprint)
        frames.append(st.split("train").load_all())
        if form == "zip":
            pack_store(store, tmp_path / "packed.zip")
            assert (tmp_path / "packed.zip").read_bytes() == Path(target).read_bytes()
    assert len(fps) == 1 and all(np.array_equal(f, frames[0]) for f in frames)
    assert len(store_forms.downloaded()) == 2


@pytest.mark.parametrize("form", ["zip", "http-zip"])
def test_zip_with_a_bad_member_is_listed_and_refused(base, store_forms, tmp_path, form):
    from dvsprep.frames.files import ZipFiles

    store = store_forms.place(form)
    shutil.copytree(base / "s.zarr", store)
    target = store_forms.target(form, store)
    z = store_forms.source(form, store)
    span = ZipFiles(z).span("train/label/c/0")
    flip(z, span.offset + span.size - 2)         # zipfile's CRC check would raise BadZipFile here
    before = snapshot(z)
    res = _cli("verify", target)
    if form == "zip":
        assert res.exit_code == 1 and "corrupt  train/label/c/0: sha256 differs" in res.stdout, res.output
    else:                                        # checked whole on arrival, kept only when it matches
        assert_one_line(res, target)
        assert res.stderr == f"error: {target}: 1 file(s) differ from the store's manifest: corrupt train/label/c/0\n"
    out = tmp_path / "out"
    kept = lay_previous(out / "kept.png")         # a picture that --force would replace
    for args in (["info", target], ["show", target, "-o", out / "x.png"],
                 ["show", target, "-o", out / "kept.png", "--force"]):
        assert_one_line(_cli(*args), target)
    assert snapshot(z) == before and tree(out) == kept and store_forms.downloaded() == []


def test_marker_makes_reopening_cheap_and_any_change_misses_it(base, tmp_path, monkeypatch):
    import os

    from dvsprep.frames import store as frames_store
    from dvsprep.integrity import trust

    store = tmp_path / "s.zarr"
    shutil.copytree(base / "s.zarr", store)
    calls = []
    real = frames_store.full_report
    monkeypatch.setattr(frames_store, "full_report", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(trust, "RACY_NS", 0)     # the copy was just made: do not wait for the clock
    open_frame_store(store)
    open_frame_store(store)
    assert len(calls) == 1                       # the second open only looked at the file stamps
    open_frame_store(store, verify=True)
    assert len(calls) == 2                       # verify=True hashes regardless
    # an edit that keeps size and mtime still changes ctime: verified again, and refused
    label = store / "test/label/c/0"
    st = label.stat()
    # wait for the file system's clock to pass the label's ctime, so the edit changes it (an
    # event: a probe file's ctime moves on; no fixed sleep)
    probe = tmp_path / "probe"
    probe.touch()
    while probe.stat().st_ctime_ns <= st.st_ctime_ns:
        probe.touch()
    flip(label, -2)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreError, match="corrupt test/label/c/0"):
        open_frame_store(store)
    assert len(calls) == 3
    flip(label, -2)
    open_frame_store(store)
    open_frame_store(store)
    assert len(calls) == 4


def test_racy_files_get_no_marker(base, tmp_path):
    from dvsprep.integrity import trust
    from dvsprep.frames.files import open_store_files

    store = tmp_path / "s.zarr"
    shutil.copytree(base / "s.zarr", store)   # files changed just now: no marker is trusted to them
    fp = open_frame_store(store).fingerprint
    assert not trust.is_verified("frames", store, fp, open_store_files(store).stamps())


# ----------------------------------------------------------------------------- events.h5


def _label_200(p: Path, resigned: bool) -> None:
    with h5py.File(p, "r+") as f:
        f["train/label"][1] = 200
    if resigned:
        resign_events(p)


def _huge_offsets(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        del f["train/offsets"]
        f.create_dataset("train/offsets", shape=(2**38 + 1,), dtype="<i8", chunks=(1 << 16,))
    resign_events_safely(p)


def _huge_everything(p: Path) -> None:
    n = 2**38
    with h5py.File(p, "r+") as f:
        for k, dt in (("offsets", "<i8"), ("label", "u1"), ("row", "<i4"), ("t_start", "<i8"), ("t_end", "<i8")):
            del f[f"train/{k}"]
            f.create_dataset(f"train/{k}", shape=(n + (k == "offsets"),), dtype=dt, chunks=(1 << 16,))
        del f["train/recording"]
        f.create_dataset("train/recording", shape=(n,), dtype=h5py.string_dtype(), chunks=(1 << 16,))


def resign_events_safely(p: Path) -> None:
    """Re-sign without reading the huge dataset (its manifest entry is written by hand)."""
    from dvsprep.integrity.manifest import canonical_json, fingerprint

    with h5py.File(p, "r+") as f:
        m = json.loads(f.attrs["manifest"])
        m["datasets"]["train/offsets"]["shape"] = [2**38 + 1]
        f.attrs["manifest"] = canonical_json(m).decode("ascii")
        f.attrs["fingerprint"] = fingerprint(m)


def _set(path: str, values, resigned: bool = True):
    def tamper(p: Path) -> None:
        with h5py.File(p, "r+") as f:
            f[path][...] = values
        if resigned:
            resign_events(p)
    return tamper


def _set_attr(p: Path, name: str, value) -> None:
    with h5py.File(p, "r+") as f:
        f.attrs[name] = value


def _unstored_rows(p: Path) -> None:
    """Right shape, but only fill value behind it (the bytes are not in the file)."""
    with h5py.File(p, "r+") as f:
        del f["train/row"]
        f.create_dataset("train/row", shape=(5,), dtype="<i4", chunks=(2,))
    resign_events(p)


def _extra_dataset(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        f.create_dataset("train/huge", shape=(2**40,), dtype="<i8", chunks=(1 << 16,))


def _garbage_recordings(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        f.attrs["recordings"] = "{not json"
    resign_events(p)


EVENTS_CASES = {
    "label 200": (lambda p: _label_200(p, False), "corrupt train/label"),
    "label 200 re-signed": (lambda p: _label_200(p, True), "train/label holds 200"),
    "2**38 offsets": (_huge_offsets, "train/offsets has 274877906945 entries for 5 samples"),
    "2**38 samples": (_huge_everything, "declares 274877906944 samples"),
    "offsets decreasing": (lambda p: _set("train/offsets", [0, 50, 20, 400, 500, 0])(p), "train/offsets do not run"),
    "garbage recordings attribute": (_garbage_recordings, "unreadable root attributes"),
    "per-sample data never stored": (_unstored_rows, "train/row declares 5 entries that are not stored"),
    "an extra 2**40-entry dataset": (lambda p: _extra_dataset(p), "train holds datasets dvsprep never writes (huge)"),
    "nested manifest": (lambda p: _set_attr(p, "manifest", "[" * 50_000 + "]" * 50_000), "no valid embedded manifest"),
}


@pytest.mark.parametrize("case", list(EVENTS_CASES), ids=list(EVENTS_CASES))
def test_tampered_events_are_refused_by_every_reader(base, tmp_path, case):
    tamper, refusal = EVENTS_CASES[case]
    ev = tmp_path / "events.h5"
    shutil.copy(base / "events.h5", ev)
    if case == "offsets decreasing":
        with h5py.File(ev, "r") as f:
            n_ev = f["train/t"].shape[0]
        _set("train/offsets", [0, 50, 20, 400, 500, n_ev])(ev)
    else:
        tamper(ev)
    before = snapshot(ev)
    res = _cli("verify", ev)
    assert res.exit_code == 1 and "events file NOT intact" in res.stdout and "Traceback" not in res.output, res.output
    out = tmp_path / "x.png"
    for args in (["frames", "-T", "4", "-d", tmp_path, "-j", "1"], ["info", ev], ["show", ev, "-o", out]):
        res = _cli(*args)
        assert_one_line(res, ev)
        assert refusal in res.stderr, res.stderr
    assert snapshot(ev) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]


@pytest.mark.parametrize("T", [5000, 100_000])
def test_frames_refuses_T_beyond_what_readers_accept(base, tmp_path, T):
    shutil.copy(base / "events.h5", tmp_path / "events.h5")
    res = _cli("frames", "-T", T, "-d", tmp_path, "-j", "1")
    out = tmp_path / f"frames_T{T}_number.zarr"
    assert_one_line(res, out)
    assert "more frames per sample than a frame store may hold (4096" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]


def test_frames_refuses_while_another_writes_the_same_store(base, tmp_path):
    shutil.copy(base / "events.h5", tmp_path / "events.h5")
    out = tmp_path / "frames_T4_number.zarr"
    with output_lock(out, "frame store"):
        res = _cli("frames", "-T", "4", "-d", tmp_path, "-j", "1")
        assert_one_line(res, out)
        assert "is being written by another process" in res.stderr
    assert not out.exists()
    assert _cli("frames", "-T", "4", "-d", tmp_path, "-j", "1").exit_code == 0
    # a store there already, and --force: the refusal leaves it byte for byte
    before = tree(tmp_path)
    with output_lock(out, "frame store"):
        res = _cli("frames", "-T", "4", "-d", tmp_path, "-j", "1", "--force")
        assert_one_line(res, out)
        assert "is being written by another process" in res.stderr
    assert tree(tmp_path) == before


def test_frames_out_of_space_is_one_line_and_leaves_no_temp(base, tmp_path, monkeypatch):
    import errno

    from dvsprep.frames import build as frames_build

    shutil.copy(base / "events.h5", tmp_path / "events.h5")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(frames_build, "write_metadata", full)
    out = tmp_path / "frames_T4_number.zarr"
    res = _cli("frames", "-T", "4", "-d", tmp_path, "-j", "1")
    assert_one_line(res, out)
    assert res.stderr == f"error: {out}: No space left on device\n"   # the one wording (README)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]


def test_stale_temps_of_dead_processes_are_removed_by_the_next_frames(base, tmp_path):
    shutil.copy(base / "events.h5", tmp_path / "events.h5")
    stale = tmp_path / ".frames_T4_number.zarr.tmp-999999999-0123abcd"
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    assert _cli("frames", "-T", "4", "-d", tmp_path, "-j", "1").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5", "frames_T4_number.zarr"]


# ----------------------------------------------------------------------------- show, info, preload


def test_show_and_info_odd_arguments(base, tmp_path):
    store = tmp_path / "日本.zarr"
    shutil.copytree(base / "s.zarr", store)
    for out in (tmp_path / "ü€.gif", tmp_path / "日本.png"):
        res = _cli("show", store, "-o", out)
        assert res.exit_code == 0 and out.is_file(), res.output
    for fps in ("nan", "inf", "0", "-1"):
        res = _cli("show", store, "--fps", fps, "-o", tmp_path / "a.gif")
        assert res.exit_code in (1, 2) and res.stderr.count("\n") <= 3 and "Traceback" not in res.output
        assert "fps" in res.stderr and not (tmp_path / "a.gif").exists()
    res = _cli("info", "http://[::1/x.zip")
    assert_one_line(res, "http://[::1/x.zip")
    assert "not a valid URL" in res.stderr


def test_explicit_preload_that_does_not_fit_is_one_line():
    import torch

    from dvsg_train.data import resolve_preload
    from dvsg_train.errors import ConfigError

    with pytest.raises(ConfigError, match=r"s.zarr: --preload cpu \(the frames\) needs about 244.1 GiB of memory, "
                                          r"but only"):
        resolve_preload("cpu", 2 * 1_000_000 * 2 * 2 * 128 * 128 * 2, torch.device("cpu"), what="s.zarr")
    assert resolve_preload("auto", 1 << 60, torch.device("cpu")) is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dvsg_train.cli import train_main
    from train_fixtures import make_learnable_store

    root = tmp_path_factory.mktemp("eval")
    make_learnable_store(root / "frames_T4_number.zarr", T=4, n_train=12, n_test=11)
    res = CliRunner().invoke(train_main, ["--data", str(root), "--out-dir", str(root / "runs"), "-q", "-T", "4",
                                          "-b", "6", "--epochs", "1", "--channels", "4", "--device", "cpu", "-j", "0"])
    assert res.exit_code == 0, res.output
    return root, next((root / "runs").rglob("checkpoint_max.pt"))


def test_eval_refuses_a_store_whose_labels_were_changed(trained, tmp_path):
    import zarr
    from zarr.storage import LocalStore

    from dvsg_train.cli import eval_main

    root, ckpt = trained
    store = tmp_path / "frames_T4_number.zarr"
    shutil.copytree(root / "frames_T4_number.zarr", store)
    # --force: every eval of this run's checkpoint writes confusion_test.png beside it
    assert CliRunner().invoke(eval_main, ["--checkpoint", ckpt, "--data", store, "--device", "cpu",
                                          "--force"]).exit_code == 0
    zarr.open_group(LocalStore(store), mode="r+", zarr_format=3)["test/label"][:] = 0   # manifest untouched
    before = snapshot(store)
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--force"])
    assert_one_line(res, store)
    assert "NOT intact" in res.stderr and "test/label/c/0" in res.stderr
    assert snapshot(store) == before


def test_frames_counts_beyond_uint16_name_the_events_file(tmp_path):
    from dvsprep.events.store import EventsWriter

    n = 70_000                                    # one pixel of one frame counts them all
    w = EventsWriter(tmp_path / "events.h5")
    for split in ("train", "test"):
        w.append(split, {"t": np.arange(n, dtype=np.int64), "x": np.full(n, 3, np.uint8), "y": np.full(n, 4, np.uint8),
                         "p": np.ones(n, np.uint8)}, np.array([n]),
                 {"label": [1], "row": [0], "t_start": [0], "t_end": [n], "recording": ["user01_lab"]})
    w.finish({"recordings": {}, "n_invalid_dropped": 0})
    res = _cli("frames", "-T", "1", "-d", tmp_path, "-j", "1")
    assert_one_line(res, tmp_path / "events.h5")
    assert re.search(r"events.h5: (train|test) sample 0: a frame pixel counts 70000 events, more than uint16 holds$",
                     res.stderr.strip()), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]


def test_eval_explicit_preload_beyond_free_memory_is_one_line(trained, monkeypatch):
    from dvsg_train import data as D
    from dvsg_train.cli import eval_main

    root, ckpt = trained
    store = root / "frames_T4_number.zarr"
    monkeypatch.setattr(D, "_available_bytes", lambda where: 1 << 20)   # 1 MiB free
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--preload", "cpu", "--force"])   # --force: the PNG beside ckpt
    assert_one_line(res, store)
    assert res.stderr == (f"error: {store}: --preload cpu (the frames) needs about 1.4 MiB of memory, but only "
                          f"1.0 MiB is free (use --preload auto or none)\n")
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--preload", "auto", "--force"])
    assert res.exit_code == 1 and "evaluating batches of 6 at T=4" in res.stderr   # auto streams, batches don't fit
    monkeypatch.setattr(D, "_available_bytes", lambda where: 28 << 20)  # batches of 6 need 27.0 MiB
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), "--device", "cpu",
                                         "--preload", "auto", "--force"])
    assert res.exit_code == 0, res.output
