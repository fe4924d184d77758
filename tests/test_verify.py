"""dvsprep verify: frame stores (directory and zip, local and over http), events.h5 and the raw release."""
from __future__ import annotations

import hashlib
import shutil
import tarfile

import h5py
import pytest
import zarr
from click.testing import CliRunner
from zarr.storage import LocalStore

from aedat_fixtures import small_release
from dvsprep import raw as raw_wing
from dvsprep.raw import release
from dvsprep.cli import main
from dvsprep.frames.files import ZipFiles, open_store_files
from dvsprep.events.convert import convert_release
from dvsprep.frames.pack import pack_store
from dvsprep.errors import DvsprepError, IntegrityError, ResourceLimitError, StoreError, UntrustedStoreError
from dvsprep.frames.store import open_frame_store
from dvsprep.verify import check_fingerprint, verify_path, verify_store
from store_fixtures import make_multishard_store
from store_forms import FORMS

SHARD1 = "train/frames/c/1/0/0/0/0"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _flip(path, at=100):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "frames_T64_number.zarr"
    fp, _ = make_multishard_store(path)
    return path, fp


def test_intact_store_verifies_as_directory_and_zip(store, tmp_path):
    path, fp = store
    r = _run("verify", path)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == f"{path}: frame store intact: 33 files match, fingerprint {fp}"
    pack_store(path, tmp_path / "s.zip")
    r = _run("verify", tmp_path / "s.zip", "--fingerprint", fp[:16])
    assert r.exit_code == 0 and f"intact: 33 files match, fingerprint {fp}" in r.output
    r = _run("verify", tmp_path / "s.zip", "--fingerprint", "0" * 16)
    assert r.exit_code == 1 and "mismatch fingerprint" in r.output


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store no test changes: tests copy it (`store_forms.place`) and change the copy."""
    path = tmp_path_factory.mktemp("pristine") / "frames_T64_number.zarr"
    make_multishard_store(path)
    return path


@pytest.mark.parametrize("form", FORMS)
def test_each_problem_is_named_with_the_samples_it_holds(pristine, store_forms, form):
    path = store_forms.place(form)
    shutil.copytree(pristine, path)
    _flip(path / SHARD1)                                         # one byte in one chunk
    (path / "test/frames/c/0/0/0/0/0").unlink()                  # a deleted chunk
    (path / "train/notes.txt").write_text("stray")               # a stray file
    g = zarr.open_group(LocalStore(path), mode="r+", zarr_format=3)
    g["train/label"][3] = 9                                      # an edited label
    target = store_forms.target(form, path)
    r = _run("verify", target)
    assert r.exit_code == 1
    if form == "http":       # the download stops at the first file that differs (in name order)
        assert r.output == f"error: {target}/test/frames/c/0/0/0/0/0: HTTP 404 File not found\n"
        return
    if form == "http-zip":   # the zip arrives whole; every member is checked before it is kept
        assert r.output == (f"error: {target}: 4 file(s) differ from the store's manifest: missing test/frames/c/0/0/0/"
                            f"0/0; corrupt {SHARD1}; corrupt train/label/c/0; extra train/notes.txt\n")
        return
    lines = r.output.splitlines()
    assert lines[0] == f"{target}: frame store NOT intact: 2 corrupt, 1 missing, 1 extra (of 33 files)"
    assert (f"  corrupt  {SHARD1}: sha256 differs from the manifest; holds frames of train samples 8-15 "
            f"(user03_lab#0, user03_lab#1, user03_lab#2, user03_lab#3, ...)") in lines
    assert any(ln.startswith("  corrupt  train/label/c/0: ") and ln.endswith("holds label of train samples 0-19 "
               "(user01_lab#0, user01_lab#1, user01_lab#2, user01_lab#3, ...)") for ln in lines), lines
    assert ("  missing  test/frames/c/0/0/0/0/0: listed in the manifest, not in the store; holds frames of "
            "test samples 0-4 (user01_lab#0, user01_lab#1, user01_lab#2, user01_lab#3, ...)") in lines
    assert "  extra    train/notes.txt: not in the manifest" in lines
    rep = verify_store(target)
    assert not rep.ok and {(p.kind, p.name) for p in rep.problems} == {
        ("corrupt", SHARD1), ("corrupt", "train/label/c/0"), ("missing", "test/frames/c/0/0/0/0/0"),
        ("extra", "train/notes.txt")}


def test_problems_inside_a_zip_and_a_truncated_zip(store, tmp_path):
    path, _ = store
    z = tmp_path / "s.zip"
    pack_store(path, z)
    data = z.read_bytes()
    zcopy = tmp_path / "c.zip"
    zcopy.write_bytes(data)
    span = ZipFiles(zcopy).span(SHARD1)
    _flip(zcopy, span.offset + 50)
    r = _run("verify", zcopy)
    assert r.exit_code == 1 and f"  corrupt  {SHARD1}: sha256 differs from the manifest; holds frames of train " \
        "samples 8-15" in r.output
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) - 40])
    r = _run("verify", cut)
    assert r.exit_code == 1
    assert "invalid  cut.zip: not a complete zip file (truncated or not a zip" in r.output


def test_incomplete_store_and_bad_inputs(store, tmp_path):
    path, _ = store
    (path / "manifest.json").unlink()
    r = _run("verify", path)
    assert r.exit_code == 1 and "missing  manifest.json: no manifest" in r.output
    r = _run("verify", tmp_path / "absent")
    assert r.exit_code == 1 and r.output == f"error: {tmp_path / 'absent'}: no such file or directory\n"
    (tmp_path / "junk.bin").write_bytes(b"not anything")
    r = _run("verify", tmp_path / "junk.bin")
    assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1


def test_events_file(tmp_path):
    rel = small_release(tmp_path / "raw")
    convert_release(rel, tmp_path / "data", jobs=1)
    events = tmp_path / "data" / "events.h5"
    r = _run("verify", events)
    assert r.exit_code == 0 and "events file intact: 20 datasets match, fingerprint " in r.output
    with h5py.File(events, "r+") as f:
        lab = f["train/label"][()]
        lab[0] = (lab[0] + 1) % 11
        f["train/label"][...] = lab
        f["test/t"][0] += 1
    r = _run("verify", events)
    assert r.exit_code == 1
    assert "  corrupt  test/t: sha256 differ from the manifest" in r.output
    assert "  corrupt  train/label: sha256 differ from the manifest" in r.output
    assert "NOT intact: 2 corrupt (of 20 datasets)" in r.output


def _md5(p):
    return hashlib.md5(p.read_bytes()).hexdigest()


def test_raw_release_against_the_published_manifest(tmp_path, monkeypatch):
    rel = small_release(tmp_path / "raw")
    shutil.copy(rel / "user01_lab.aedat", rel / "user99_lab.aedat")
    shutil.copy(rel / "user01_lab_labels.csv", rel / "user99_lab_labels.csv")
    # Synthetic data matches none of the published recordings: a compact summary.
    r = _run("verify", tmp_path / "raw")
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0] == f"{tmp_path / 'raw'}: raw release NOT intact: 122 missing, 1 extra, 5 mismatch (of 10 files)"
    assert "  missing  user01_fluorescent.aedat: published recording not in the release" in lines
    assert "  ... and 114 more missing (-v lists all)" in lines
    assert "  extra    user99_lab.aedat: not a published recording" in lines
    assert "  mismatch user02_led.aedat: md5 " + _md5(rel / "user02_led.aedat") + \
        ", published 696db3d8da3defbff96d2cb3d5da78a8" in lines
    assert "  recordings: 0 match, 3 differ from the published md5, 119 missing, 1 extra" in lines
    assert len(lines) < 25
    assert len(_run("verify", "-v", tmp_path / "raw").output.splitlines()) > 122 + 5
    (rel / "user99_lab.aedat").unlink()
    (rel / "user99_lab_labels.csv").unlink()
    # Against a manifest of these very files: intact as a folder and as a tar.gz.
    archive = tmp_path / "DvsGesture.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    pub = {"recordings": {p.name: _md5(p) for p in rel.glob("*.aedat")},
           "other_files": {}, "archive": {"md5": _md5(archive), "name": archive.name},
           "train": ["user01_lab.aedat", "user02_led.aedat"], "test": ["user03_natural.aedat"]}
    for where in (raw_wing, release):  # verify reads it through the wing's face, dvsprep.raw
        monkeypatch.setattr(where, "load_published_manifest", lambda: pub)
    r = _run("verify", rel)
    assert r.exit_code == 0 and r.output.startswith(f"{rel}: raw release intact: 8 files match"), r.output
    r = _run("verify", archive)
    assert r.exit_code == 0 and "archive md5 " + _md5(archive) + " matches" in r.output
    # A changed recording, a missing one and a changed archive.
    _flip(rel / "user02_led.aedat", 500)
    (rel / "user03_natural.aedat").unlink()
    rep = verify_path(rel)
    assert {(p.kind, p.name) for p in rep.problems} == {("mismatch", "user02_led.aedat"),
                                                        ("missing", "user03_natural.aedat")}
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    rep = verify_path(archive)
    assert ("mismatch", "DvsGesture.tar.gz (archive)") in {(p.kind, p.name) for p in rep.problems}
    shutil.rmtree(rel)
    assert _run("verify", tmp_path / "raw").exit_code == 1


def test_library_checks_for_the_trainer(store):
    path, fp = store
    st = open_frame_store(path, verify=True, expected_fingerprint=fp)
    assert check_fingerprint(st) == fp == check_fingerprint(st, fp[:12])
    with pytest.raises(IntegrityError, match="differs from the expected"):
        check_fingerprint(st, "f" * 64)
    with pytest.raises(StoreError, match="not 12 to 64 hex digits"):
        check_fingerprint(st, "abc")
    _flip(path / SHARD1)
    # every open checks: a changed file misses the verified-marker and is hashed again
    for force in (False, True):
        with pytest.raises(IntegrityError, match=f"frame store NOT intact: 1 corrupt \\(of 33 files\\): corrupt {SHARD1}"):
            open_frame_store(path, verify=force)
    assert not verify_store(path).ok


def test_verify_writes_the_marker_readers_use(store, tmp_path, monkeypatch):
    import os

    from dvsprep.frames import store as frames_store
    from dvsprep.integrity import trust

    path, fp = store
    monkeypatch.setattr(trust, "RACY_NS", 0)
    assert verify_store(path).ok
    assert trust.is_verified("frames", path, fp, open_store_files(path).stamps())
    monkeypatch.setattr(frames_store, "full_report", lambda *a: pytest.fail("hashed again despite the marker"))
    assert open_frame_store(path).fingerprint == fp
    # events.h5: verify writes the marker, EventsFile then only stats the file
    from dvsprep.events.store import EventsFile

    rel = small_release(tmp_path / "raw")
    convert_release(rel, tmp_path / "data", jobs=1)
    ev = tmp_path / "data" / "events.h5"
    assert verify_path(ev).ok
    monkeypatch.setattr(EventsFile, "problems", lambda self: pytest.fail("hashed again despite the marker"))
    EventsFile(ev).close()
    with h5py.File(ev, "r+") as f:       # any change: verified again (and refused here)
        f["test/t"][0] += 1
    with pytest.raises(pytest.fail.Exception):
        EventsFile(ev)
    assert os.listdir(trust.marker_dir())


VERIFY_MANGLES = {
    # mangle: (what verify lists for a local store, what the download of the http, http-zip forms
    # raises: none of these is re-signed, so the download itself refuses them)
    "manifest not json": ("invalid  manifest.json: manifest.json is not valid JSON", StoreError, StoreError),
    "zarr.json nested": ("corrupt  zarr.json: 300001 bytes, manifest says", ResourceLimitError, IntegrityError),
    "zarr.json a directory": ("missing  train/label/zarr.json: listed in the manifest, not in the store",
                              IntegrityError, IntegrityError),
    "label chunk empty": ("corrupt  train/label/c/0: 0 bytes, manifest says", IntegrityError, IntegrityError),
    "manifest lists itself": ("invalid  manifest.json: manifest.json lists itself", UntrustedStoreError,
                              UntrustedStoreError),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mangle", list(VERIFY_MANGLES))
def test_verify_never_raises(pristine, store_forms, mangle, form):
    """A local store gets a report listing the problem; a URL's download refuses in one line."""
    listed, *downloads = VERIFY_MANGLES[mangle]
    path = store_forms.place(form)
    shutil.copytree(pristine, path)
    if mangle == "manifest not json":
        (path / "manifest.json").write_bytes(b"\xff\xfe{")
    elif mangle == "zarr.json nested":
        (path / "zarr.json").write_text("{\"a\":" * 50_000 + "1" + "}" * 50_000)
    elif mangle == "zarr.json a directory":
        (path / "train/label/zarr.json").unlink()
        (path / "train/label/zarr.json").mkdir()
    elif mangle == "label chunk empty":
        (path / "train/label/c/0").write_bytes(b"")
    else:
        import json

        m = json.loads((path / "manifest.json").read_text())
        m["files"]["manifest.json"] = {"sha256": "0" * 64, "size": 1}
        (path / "manifest.json").write_text(json.dumps(m))
    target = store_forms.target(form, path)
    r = _run("verify", target)
    if form.startswith("http"):
        with pytest.raises(DvsprepError) as exc:
            verify_store(target)
        assert type(exc.value) is downloads[form == "http-zip"] and str(exc.value).startswith(target)
        assert r.exit_code == 1 and r.output == f"error: {exc.value}\n"
        assert store_forms.downloaded() == []
        return
    rep = verify_store(target)
    assert not rep.ok and rep.problems and all(isinstance(ln, str) for ln in rep.lines())
    assert r.exit_code == 1 and r.output.startswith(f"{target}: frame store NOT intact") and listed in r.output
    assert "Traceback" not in r.output
