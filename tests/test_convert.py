from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.raw.aedat import encode_packet, encode_polarity_records, header_bytes
from dvsprep.cli import main
from dvsprep.events.convert import convert_release
from dvsprep.events.store import EventsFile
from dvsprep.raw.release import sj_sample_names

from aedat_fixtures import small_release


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_convert_matches_spikingjelly_create_raw_from_extracted(tmp_path):
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    rel = small_release(tmp_path / "raw")
    r = _run("convert", tmp_path / "raw", "-o", tmp_path / "data", "-j", "2")
    assert r.exit_code == 0, r.output
    assert "recordings: 3; samples: train 8, test 2" in r.output
    sj_root = tmp_path / "sj"
    sj_root.mkdir()
    DVS128Gesture.create_raw_from_extracted(rel.parent, sj_root)
    with EventsFile(tmp_path / "data" / "events.h5") as ef:
        total = 0
        for split in ("train", "test"):
            sp = ef.split(split)
            sj_files = sorted(p.relative_to(sj_root / split).as_posix() for p in (sj_root / split).rglob("*.npz"))
            ours = []
            for rec in dict.fromkeys(sp.recordings):
                idx = [i for i, r in enumerate(sp.recordings) if r == rec]
                assert sp.rows[idx].tolist() == list(range(len(idx)))
                names = sj_sample_names(sp.labels[idx], rec)
                for i, name in zip(idx, names):
                    assert int(name.split("/")[0]) == sp.labels[i]
                    with np.load(sj_root / split / name) as z:
                        got = sp.sample(i)
                        for k in "txyp":
                            np.testing.assert_array_equal(got[k], z[k])
                    ours.append(name)
                    total += 1
            assert sorted(ours) == sj_files
        assert total == 10


def test_convert_store_contents_and_attrs(tmp_path):
    small_release(tmp_path / "raw")
    s = convert_release(tmp_path / "raw", tmp_path / "data", jobs=1)
    assert s.samples == {"train": 8, "test": 2} and s.recordings == 3 and s.invalid_dropped == 0
    assert s.per_class["train"] == [1, 1, 2, 0, 1, 0, 1, 0, 1, 0, 1]
    with EventsFile(s.path) as ef:
        a = ef.attrs
        assert a["format"] == "dvsprep-events/1" and a["sensor_size"] == [128, 128]
        assert set(a["recordings"]) == {"user01_lab", "user02_led", "user03_natural"}
        assert a["recordings"]["user01_lab"]["n_events"] == 5000
        assert ef.fingerprint == s.fingerprint and len(ef.fingerprint) == 64
        assert ef.compute_manifest() == ef.manifest
        tr = ef.split("train")
        assert tr.recordings == ["user01_lab"] * 4 + ["user02_led"] * 4
        assert tr.rows.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
        assert tr.labels.tolist() == [0, 2, 2, 10, 1, 4, 6, 8]
        assert tr.t_start[5] == 550_000 and tr.t_end[5] == 1_000_000
        # Overlapping windows of user02_led rows 0/1 share events; row 2 is an empty window.
        s0, s1 = tr.sample(4), tr.sample(5)
        shared = np.intersect1d(s0["t"], s1["t"])
        assert shared.size > 0 and shared.min() >= 550_000 and shared.max() < 600_000
        assert len(tr.sample(6)["t"]) == 0
        assert tr.offsets[-1] == tr.group["t"].shape[0]


def test_convert_from_tar_gz_and_deterministic_fingerprint(tmp_path):
    rel = small_release(tmp_path / "raw")
    tgz = tmp_path / "DvsGesture.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    a = convert_release(tgz, tmp_path / "a", jobs=1)
    b = convert_release(tmp_path / "raw", tmp_path / "b", jobs=2)
    assert a.fingerprint == b.fingerprint
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["events.h5"]


def test_refuses_overwrite_then_force(tmp_path):
    small_release(tmp_path / "raw")
    assert _run("convert", tmp_path / "raw", "-o", tmp_path / "d", "-j", "1").exit_code == 0
    r = _run("convert", tmp_path / "raw", "-o", tmp_path / "d")
    assert r.exit_code == 1 and "already exists (use --force" in r.output
    assert _run("convert", tmp_path / "raw", "-o", tmp_path / "d", "--force", "-j", "1").exit_code == 0


def test_md5_mismatch_with_published_release_warns_or_fails_strict(tmp_path, caplog):
    rel = small_release(tmp_path / "raw")
    for f in rel.glob("user01_lab*"):
        f.rename(f.with_name(f.name.replace("user01_lab", "user01_natural")))
    txt = rel / "trials_to_train.txt"
    txt.write_text(txt.read_text().replace("user01_lab", "user01_natural"))
    s = convert_release(tmp_path / "raw", tmp_path / "d", jobs=1)
    from dvsprep.raw.release import load_published_manifest

    real = load_published_manifest()["recordings"]
    assert "user01_natural.aedat" in s.md5_mismatches
    assert s.md5_mismatches == [n for n in ("user01_natural.aedat", "user02_led.aedat", "user03_natural.aedat")
                                if n in real]
    assert "differ from the published" in caplog.text
    r = _run("convert", tmp_path / "raw", "-o", tmp_path / "e", "--strict")
    assert r.exit_code == 1 and "user01_natural.aedat: md5" in r.output
    assert not (tmp_path / "e" / "events.h5").exists()


def _break(rel: Path, what: str) -> None:
    f = rel / "user01_lab.aedat"
    if what == "version":
        f.write_bytes(f.read_bytes().replace(b"#!AER-DAT3.1", b"#!AER-DAT2.0", 1))
    elif what == "no_end_header":
        f.write_bytes(b"#!AER-DAT3.1\r\n#Format: RAW\r\n")
    elif what == "truncated":
        f.write_bytes(f.read_bytes()[:-3])
    elif what == "event_size_12":
        f.write_bytes(header_bytes() + encode_packet(1, bytes(24), event_size=12, capacity=2, number=2))
    elif what == "x_200":
        rec = encode_polarity_records(np.array([1]), np.array([200]), np.array([1]), np.array([1]))
        f.write_bytes(header_bytes() + encode_packet(1, rec, event_size=8, capacity=1, number=1))
    elif what == "missing_csv":
        (rel / "user01_lab_labels.csv").unlink()
    elif what == "csv_non_numeric":
        (rel / "user01_lab_labels.csv").write_text("class,startTime_usec,endTime_usec\n1,12x,40\n")
    elif what == "trial_missing_file":
        (rel / "trials_to_test.txt").write_text("user03_natural.aedat\nuser09_led.aedat\n")


@pytest.mark.parametrize("what,match", [
    ("version", "user01_lab.aedat: unsupported AEDAT version 2.0"),
    ("no_end_header", "user01_lab.aedat: header has no '#!END-HEADER'"),
    ("truncated", r"user01_lab.aedat: byte \d+: truncated packet"),
    ("event_size_12", "user01_lab.aedat: byte 61: polarity packet has eventSize 12"),
    ("x_200", "user01_lab.aedat: byte 89: event at x=200"),
    ("missing_csv", "user01_lab_labels.csv: label file for user01_lab.aedat does not exist"),
    ("csv_non_numeric", "user01_lab_labels.csv: line 2: non-numeric field '12x'"),
    ("trial_missing_file", "trials_to_test.txt: names user09_led.aedat, which does not exist"),
])
def test_bad_inputs_one_line_exit_1_nothing_written(tmp_path, what, match):
    rel = small_release(tmp_path / "raw")
    _break(rel, what)
    out = tmp_path / "out"
    r = _run("convert", tmp_path / "raw", "-o", out, "-j", "2")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not out.exists()  # the -o folder this run created is removed too


def test_tar_member_escaping(tmp_path):
    tgz = tmp_path / "DvsGesture.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("DvsGesture/../../evil.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    out = tmp_path / "out"
    r = _run("convert", tgz, "-o", out)
    assert r.exit_code == 1
    assert "DvsGesture.tar.gz: member 'DvsGesture/../../evil.txt' would be written outside" in r.output
    assert not out.exists() and not (tmp_path.parent / "evil.txt").exists()  # no empty -o left


def test_missing_raw(tmp_path):
    r = _run("convert", tmp_path / "nope", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "nope: no such file or directory" in r.output


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_recordings_md5_is_that_of_its_file(tmp_path, monkeypatch, jobs):
    """The md5 runs on a thread beside the decoding, in slices (small here: many slices)."""
    monkeypatch.setattr("dvsprep.events.convert._MD5_SLICE", 4096)
    rel = small_release(tmp_path / "raw")
    convert_release(tmp_path / "raw", tmp_path / "d", jobs=jobs)
    with h5py.File(tmp_path / "d" / "events.h5", "r") as f:
        recordings = json.loads(f.attrs["recordings"])
    assert {stem: r["md5"] for stem, r in recordings.items()} == {
        p.stem: hashlib.md5(p.read_bytes()).hexdigest() for p in rel.glob("*.aedat")}
