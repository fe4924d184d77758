from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dvsprep.errors import LabelFormatError, MissingFileError, ReleaseError, UnsafeArchiveError
from dvsprep.raw.release import (
    LabelRows,
    cut_samples,
    list_recordings,
    load_published_manifest,
    open_release,
    parse_labels,
    parse_trials,
    safe_extract,
    sj_sample_names,
)

from aedat_fixtures import small_release, write_labels

REAL_LABELS = "/work/shared/reference/dvs128_gesture/user01_natural_labels.csv"


@pytest.mark.parametrize("crlf", [True, False])
def test_parse_labels_crlf_and_lf(tmp_path, crlf):
    f = tmp_path / "l.csv"
    write_labels(f, [(1, 10, 20), (8, 30, 40), (8, 40, 50), (11, 5, 5)], crlf=crlf)
    rows = parse_labels(f)
    assert rows.label.tolist() == [0, 7, 7, 10]
    assert rows.start.tolist() == [10, 30, 40, 5] and rows.end.tolist() == [20, 40, 50, 5]
    assert rows.label.dtype == np.uint8 and rows.start.dtype == np.int64


def test_parse_real_label_file():
    from pathlib import Path

    if not Path(REAL_LABELS).exists():
        pytest.skip("shared reference not present")
    rows = parse_labels(REAL_LABELS)
    assert len(rows) == 12
    assert rows.label.tolist().count(7) == 2  # class 8 twice, as documented
    assert 50_000_000 < rows.start[0] < 60_000_000


@pytest.mark.parametrize(
    "text,match",
    [
        ("class,startTime_usec,endTime_usec\r\n1,abc,20\r\n", r"line 2: non-numeric field 'abc'"),
        ("cls,start,end\n1,2,3\n", "header is"),
        ("class,startTime_usec,endTime_usec\n12,1,2\n", "class 12 outside 1..11"),
        ("class,startTime_usec,endTime_usec\n1,5,2\n", r"bad time window \[5, 2\)"),
        ("class,startTime_usec,endTime_usec\n1,5\n", "expected 3 fields"),
        ("", "empty label file"),
        ("class,startTime_usec,endTime_usec\n1,+100,200\n", r"line 2: non-numeric field '\+100'"),
        ("class,startTime_usec,endTime_usec\n1,1_000,2000\n", "line 2: non-numeric field '1_000'"),
        ("class,startTime_usec,endTime_usec\n1,\u0661\u0660,20\n", "line 2: non-numeric field '\u0661\u0660'"),
        ("class,startTime_usec,endTime_usec\n1,-5,20\n", "line 2: negative value '-5'"),
        ("class,startTime_usec,endTime_usec\n1,5,9223372036854775808\n",
         r"line 2: value 9223372036854775808\.\.\. is above the int64 range"),
        ("class,startTime_usec,endTime_usec\n1,5," + "9" * 5000 + "\n", r"line 2: value 9{24}\.\.\. is above the int64"),
    ],
)
def test_bad_label_files(tmp_path, text, match):
    f = tmp_path / "bad_labels.csv"
    f.write_text(text)
    with pytest.raises(LabelFormatError, match=match) as ei:
        parse_labels(f)
    assert "bad_labels.csv" in str(ei.value)


def test_missing_label_file(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        parse_labels(tmp_path / "x_labels.csv")


def test_largest_int64_is_accepted(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("class,startTime_usec,endTime_usec\n1,5,9223372036854775807\n")
    assert parse_labels(f).end.tolist() == [2 ** 63 - 1]


def test_trial_list_not_utf8_or_too_big(tmp_path):
    f = tmp_path / "trials_to_train.txt"
    f.write_bytes(b"user01_lab.aedat\n\xff\xfe\n")
    with pytest.raises(LabelFormatError, match=r"trials_to_train.txt: not UTF-8 text \(invalid start byte at byte 17\)"):
        parse_trials(f)
    f.write_bytes(b"user01_lab.aedat\n" * 70_000)
    with pytest.raises(LabelFormatError, match="over 1048576 bytes"):
        parse_trials(f)


def test_parse_trials_strips_cr_and_blank_lines(tmp_path):
    f = tmp_path / "trials_to_train.txt"
    f.write_bytes(b"user01_lab.aedat\r\n\r\n  user02_led.aedat  \r\n\n")
    assert parse_trials(f) == ["user01_lab.aedat", "user02_led.aedat"]


def test_reference_split_lists():
    from pathlib import Path

    ref = Path("/work/shared/reference/dvs128_gesture")
    if not ref.exists():
        pytest.skip("shared reference not present")
    assert len(parse_trials(ref / "trials_to_train.txt")) == 98
    assert len(parse_trials(ref / "trials_to_test.txt")) == 24


def test_published_manifest_facts():
    m = load_published_manifest()
    assert len(m["recordings"]) == 122 and len(m["train"]) == 98 and len(m["test"]) == 24
    assert set(m["train"]) | set(m["test"]) == set(m["recordings"])
    assert m["expected"]["train_samples"] == 1176 and m["expected"]["test_samples"] == 288
    assert m["archive"]["md5"] == "8a5c71fb11e24e5ca5b11866ca6c00a1"
    assert all(u.startswith(("user24", "user25", "user26", "user27", "user28", "user29")) for u in m["test"])


def test_sj_sample_names_count_earlier_rows_of_same_label():
    assert sj_sample_names(np.array([0, 7, 7, 10, 7]), "user01_lab") == [
        "0/user01_lab_0.npz", "7/user01_lab_0.npz", "7/user01_lab_1.npz", "10/user01_lab_0.npz",
        "7/user01_lab_2.npz",
    ]


def _rows(*w):
    a = np.array(w, dtype=np.int64)
    return LabelRows(np.zeros(len(w), np.uint8), a[:, 0], a[:, 1])


def test_cut_samples_sorted_overlap_and_empty():
    t = np.array([0, 5, 10, 10, 15, 20, 25], np.int64)
    rows = _rows((5, 15), (10, 25), (12, 14), (30, 40), (0, 0))
    got = [t[s].tolist() for s in cut_samples(t, rows)]
    assert got == [[5, 10, 10], [10, 10, 15, 20], [], [], []]


def test_cut_samples_unsorted_uses_mask_in_file_order():
    t = np.array([10, 5, 12, 3, 11], np.int64)
    got = [t[s].tolist() for s in cut_samples(t, _rows((4, 12), (0, 100)))]
    assert got == [[10, 5, 11], [10, 5, 12, 3, 11]]


def test_list_recordings_and_missing_file(tmp_path):
    rel = small_release(tmp_path)
    recs = list_recordings(rel)
    assert [(r.split, r.stem) for r in recs] == [("train", "user01_lab"), ("train", "user02_led"),
                                                ("test", "user03_natural")]
    (rel / "user02_led.aedat").unlink()
    with pytest.raises(MissingFileError, match=r"trials_to_train.txt: names user02_led.aedat, which does not exist"):
        list_recordings(rel)


def test_open_release_forms(tmp_path):
    rel = small_release(tmp_path / "raw")
    with open_release(tmp_path / "raw") as r:
        assert r == rel
    with open_release(rel) as r:
        assert r == rel
    tgz = tmp_path / "DvsGesture.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(rel, arcname="DvsGesture")
    with open_release(tgz, scratch=tmp_path) as r:
        assert (r / "user01_lab.aedat").read_bytes() == (rel / "user01_lab.aedat").read_bytes()
        extracted = r
    assert not extracted.exists()  # temporary extraction removed
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReleaseError, match="not a DvsGesture release"):
        with open_release(tmp_path / "empty"):
            pass


def _tar_with(tmp_path, name, kind="file"):
    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
    return tgz


@pytest.mark.parametrize("name,kind,match", [
    ("../escape.txt", "file", "outside the extraction directory"),
    ("/abs/path.txt", "file", "outside the extraction directory"),
    ("DvsGesture/link", "symlink", "link or special file"),
])
def test_safe_extract_refuses(tmp_path, name, kind, match):
    tgz = _tar_with(tmp_path, name, kind)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(tgz, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("content,match", [
    (b"plain text, not an archive", "not a gzip-compressed tar archive$"),
    (b"BZh91AY&SY" + bytes(600), "not a gzip-compressed tar archive$"),
    (b"\x1f\x8b\x08\x00" + bytes(600), r"unreadable archive \([^\n]*\)$"),
])
def test_not_a_tar_gz_is_one_line(tmp_path, content, match):
    f = tmp_path / "DvsGesture.tar.gz"
    f.write_bytes(content)
    with pytest.raises(ReleaseError, match=match) as info:
        with open_release(f, scratch=tmp_path):
            pass
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{f}: ")
    assert list(tmp_path.iterdir()) == [f]  # the scratch folder is gone


def _tar_members(tmp_path, members):
    tgz = tmp_path / "a.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return tgz


def test_safe_extract_streams_the_release_layout(tmp_path):
    tgz = _tar_members(tmp_path, [("DvsGesture/trials_to_train.txt", b"a.aedat\n"), ("./README.txt", b"hi"),
                                  ("DvsGesture/a.aedat", b"x" * 3000)])
    dest = tmp_path / "dest"
    dest.mkdir()
    safe_extract(tgz, dest)
    assert (dest / "DvsGesture" / "a.aedat").read_bytes() == b"x" * 3000 and (dest / "README.txt").read_bytes() == b"hi"


@pytest.mark.parametrize("members,match", [
    ([("DvsGesture/a.aedat", b"1"), ("DvsGesture/a.aedat", b"2")], "member 'DvsGesture/a.aedat' appears twice"),
    ([("DvsGesture/x/a.aedat", b"1")], r"member 'DvsGesture/x/a.aedat' is not part of the release"),
    ([("elsewhere/user01_natural.aedat", b"1")], "not part of the release"),
    ([("DvsGesture/notes.txt", bytes(17 << 20))], "over the 16,777,216-byte bound for a release text file"),
])
def test_safe_extract_refuses_members(tmp_path, members, match):
    tgz = _tar_members(tmp_path, members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises((ReleaseError, OSError), match=match):
        safe_extract(tgz, dest)


def test_corrupt_archive(tmp_path):
    f = tmp_path / "DvsGesture.tar.gz"
    f.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ReleaseError, match="unreadable archive"):
        with open_release(f, scratch=tmp_path):
            pass


def test_the_published_manifest_lives_once_in_data_manifests():
    """data_manifests/ (the README's name for it) is the one copy; the package reaches it through
    the dvsprep/data link, which the wheel ships as a file."""
    import json
    import subprocess

    from dvsprep.raw import load_published_manifest

    root = Path(__file__).resolve().parents[1]
    assert (root / "dvsprep" / "data").is_symlink()
    assert (root / "dvsprep" / "data").resolve() == (root / "data_manifests").resolve()
    assert load_published_manifest() == json.loads((root / "data_manifests" / "dvs128_gesture.json").read_text())
    tracked = subprocess.run(["git", "ls-files", "*dvs128_gesture.json"], cwd=root, capture_output=True,
                             text=True).stdout.split()
    assert tracked in ([], ["data_manifests/dvs128_gesture.json"])   # [] outside a git checkout
