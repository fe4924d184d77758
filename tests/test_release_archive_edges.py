"""The raw release's archive, trial lists and recording list at their edges (dvsprep.raw.release
safe_extract, check_member_size, parse_trials, list_recordings): every bound at itself and one
past it, and every refusal's whole one-line message (the CLI prints it as is).

Already pinned elsewhere, so not repeated: '..', an absolute name and a symlink refused, a
release-layout tar.gz extracted, a 17 MB text member and a member outside DvsGesture/ refused
(test_release.py); a 20 GB declared member and a sparse member built by GNU tar refused through
the CLI (test_hostile_inputs.py).
"""
from __future__ import annotations

import errno
import gzip
import io
import tarfile
from pathlib import Path

import pytest

import dvsprep.raw.release as release_mod
import dvsprep.resources as resources_mod
from dvsprep.errors import (
    LabelFormatError,
    MissingFileError,
    ReleaseError,
    ResourceLimitError,
    UnsafeArchiveError,
)
from dvsprep.raw.release import (
    MAX_OTHER_MEMBER_BYTES,
    MAX_RECORDING_BYTES,
    MAX_RELEASE_BYTES,
    MAX_TEXT_BYTES,
    Recording,
    check_member_size,
    list_recordings,
    parse_labels,
    parse_trials,
    safe_extract,
)

from aedat_fixtures import small_release

LAYOUT = "a DvsGesture release holds files at the archive root or in DvsGesture/ only"
ARCHIVE = Path("/data/DvsGesture.tar.gz")   # only named in check_member_size's messages


# ----------------------------------------------------------------------------- trial lists


def _counting(got: list[int]) -> type[io.FileIO]:
    """A raw file that appends the length of each read to `got` (how much of a file was read)."""

    class Counting(io.FileIO):
        def read(self, *a):
            data = super().read(*a)
            got.append(len(data))
            return data

    return Counting


def _trials(tmp_path: Path, data: bytes) -> Path:
    f = tmp_path / "trials_to_train.txt"
    f.write_bytes(data)
    return f


@pytest.mark.parametrize("name", [
    "sub/user01_lab.aedat",            # a folder, either separator
    "sub\\user01_lab.aedat",
    ".user01_lab.aedat",               # hidden, or the extension alone
    ".aedat",
    "user01_lab.aedat.txt",            # another extension
    "user01\tlab.aedat",               # not printable
])
def test_trial_names_that_name_no_recording_file(tmp_path, name):
    f = _trials(tmp_path, f"user02_led.aedat\n{name}\n".encode())
    with pytest.raises(LabelFormatError) as ei:
        parse_trials(f)
    assert str(ei.value) == f"{f}: {name!r} is not a recording file name"


def test_a_long_bad_trial_name_is_shown_up_to_64_characters(tmp_path):
    at = "." + "a" * 56 + "b.aedat"                      # 64 characters: shown whole
    past = "." + "a" * 57 + "b.aedat"                    # 65: the first 64 and "..."
    assert (len(at), len(past)) == (64, 65)
    for name, shown in [(at, at), (past, "." + "a" * 57 + "b.aeda...")]:
        f = _trials(tmp_path, f"{name}\n".encode())
        with pytest.raises(LabelFormatError) as ei:
            parse_trials(f)
        assert str(ei.value) == f"{f}: {shown!r} is not a recording file name"


def test_a_recording_listed_twice(tmp_path):
    f = _trials(tmp_path, b"user01_lab.aedat\nuser02_led.aedat\n user01_lab.aedat\r\n")
    with pytest.raises(LabelFormatError) as ei:
        parse_trials(f)
    assert str(ei.value) == f"{f}: lists a recording twice"


def test_text_files_that_are_missing_or_folders_say_what_they_should_be(tmp_path):
    trials, labels = tmp_path / "trials_to_test.txt", tmp_path / "user01_lab_labels.csv"
    with pytest.raises(MissingFileError) as ei:
        parse_trials(trials)
    assert str(ei.value) == f"{trials}: trial list does not exist"
    with pytest.raises(MissingFileError) as ei:
        parse_labels(labels)
    assert str(ei.value) == f"{labels}: label file does not exist"
    trials.mkdir()
    labels.mkdir()
    with pytest.raises(LabelFormatError) as ei:
        parse_trials(trials)
    assert str(ei.value) == f"{trials}: is a directory, expected a trial list"
    with pytest.raises(LabelFormatError) as ei:
        parse_labels(labels)
    assert str(ei.value) == f"{labels}: is a directory, expected a label file"


def test_text_size_bound_at_itself_and_one_past(tmp_path):
    # blank lines pad the file to the byte: they are skipped
    f = _trials(tmp_path, b"user01_lab.aedat\n" + b"\n" * (MAX_TEXT_BYTES - 17))
    assert f.stat().st_size == MAX_TEXT_BYTES and parse_trials(f) == ["user01_lab.aedat"]
    f = _trials(tmp_path, b"user01_lab.aedat\n" + b"\n" * (MAX_TEXT_BYTES - 16))
    with pytest.raises(LabelFormatError) as ei:
        parse_trials(f)
    assert str(ei.value) == f"{f}: over 1048576 bytes, not a trial list of the release"


def test_a_big_text_file_is_read_one_byte_past_the_bound_only(tmp_path, monkeypatch):
    """A 3 MiB 'trial list' (it could be 3 GB): refused after MAX_TEXT_BYTES + 1 bytes."""
    f = _trials(tmp_path, b"\n" * (3 << 20))
    got: list[int] = []
    Counting = _counting(got)

    monkeypatch.setattr(release_mod, "open", lambda p, mode: Counting(p, mode.replace("b", "")), raising=False)
    with pytest.raises(LabelFormatError, match="over 1048576 bytes"):
        parse_trials(f)
    assert sum(got) == MAX_TEXT_BYTES + 1


# ----------------------------------------------------------------------------- list_recordings


def test_recordings_name_their_files(tmp_path):
    rel = small_release(tmp_path)
    assert list_recordings(rel) == [
        Recording("user01_lab", "train", rel / "user01_lab.aedat", rel / "user01_lab_labels.csv"),
        Recording("user02_led", "train", rel / "user02_led.aedat", rel / "user02_led_labels.csv"),
        Recording("user03_natural", "test", rel / "user03_natural.aedat", rel / "user03_natural_labels.csv"),
    ]


def test_a_recording_in_both_lists(tmp_path):
    rel = small_release(tmp_path)
    (rel / "trials_to_test.txt").write_text("user03_natural.aedat\nuser02_led.aedat\n")
    with pytest.raises(ReleaseError) as ei:
        list_recordings(rel)
    assert str(ei.value) == f"{rel / 'trials_to_test.txt'}: user02_led.aedat is also in the train list"


def test_a_recording_without_its_label_file(tmp_path):
    rel = small_release(tmp_path)
    (rel / "user03_natural_labels.csv").unlink()
    with pytest.raises(MissingFileError) as ei:
        list_recordings(rel)
    assert str(ei.value) == f"{rel / 'user03_natural_labels.csv'}: label file for user03_natural.aedat does not exist"


# ----------------------------------------------------------------------------- check_member_size


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _over(name: str, size: int, bound: int, what: str) -> str:
    return (f"{ARCHIVE}: member {name!r} declares {size:,} bytes, over the {bound:,}-byte bound for {what}; "
            f"refusing the archive")


@pytest.mark.parametrize("name, bound, what", [
    ("DvsGesture/user01_lab.aedat", MAX_RECORDING_BYTES, "a recording"),
    ("DvsGesture/user01_lab_labels.csv", MAX_OTHER_MEMBER_BYTES, "a release text file"),
    ("user01_lab.AEDAT", MAX_OTHER_MEMBER_BYTES, "a release text file"),   # the release's names are lower case
])
def test_member_bound_at_itself_and_one_past(name, bound, what):
    assert (MAX_RECORDING_BYTES, MAX_OTHER_MEMBER_BYTES) == (536_870_912, 16_777_216)
    assert check_member_size(ARCHIVE, _info(name, bound)) == bound        # the total starts at 0
    with pytest.raises(ResourceLimitError) as ei:
        check_member_size(ARCHIVE, _info(name, bound + 1))
    assert str(ei.value) == _over(name, bound + 1, bound, what)


def test_running_total_at_its_bound_and_one_past():
    assert check_member_size(ARCHIVE, _info("a.aedat", 3), 5) == 8
    assert check_member_size(ARCHIVE, _info("a.aedat", 0), 5) == 5
    assert check_member_size(ARCHIVE, _info("a.aedat", 3), MAX_RELEASE_BYTES - 3) == MAX_RELEASE_BYTES
    with pytest.raises(ResourceLimitError) as ei:
        check_member_size(ARCHIVE, _info("a.aedat", 3), MAX_RELEASE_BYTES - 2)
    assert str(ei.value) == (f"{ARCHIVE}: members declare more than 8,589,934,592 bytes in all, over the bound "
                             f"for a DVS128 Gesture release (~5 GB extracted); refusing the archive")


def test_a_sparse_member_is_refused_whatever_its_size():
    info = _info("DvsGesture/user01_lab.aedat", 10)
    info.sparse = [(0, 10)]
    with pytest.raises(UnsafeArchiveError) as ei:
        check_member_size(ARCHIVE, info)
    assert str(ei.value) == (f"{ARCHIVE}: member 'DvsGesture/user01_lab.aedat' is a sparse file "
                             f"(the release has none); refusing it")


# ----------------------------------------------------------------------------- safe_extract

_FILES = [("DvsGesture/trials_to_train.txt", b"a.aedat\n"), ("DvsGesture/a.aedat", b"xyz")]


def _tar(path: Path, members: list[tuple[str, bytes | None]], mode: str = "w:gz",
         fmt: int = tarfile.DEFAULT_FORMAT) -> Path:
    """members: (name, data), data None for a folder."""
    with tarfile.open(path, mode, format=fmt) as tf:
        for name, data in members:
            info = _info(name, 0 if data is None else len(data))
            if data is None:
                info.type = tarfile.DIRTYPE
            tf.addfile(info, None if data is None else io.BytesIO(data))
    return path


def _refused(tgz: Path, tmp_path: Path, error: type[Exception]) -> str:
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    with pytest.raises(error) as ei:
        safe_extract(tgz, dest)
    return str(ei.value)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_a_plain_tar_is_extracted_too(tmp_path, fmt):
    tar = _tar(tmp_path / "DvsGesture.tar", [("DvsGesture", None), *_FILES], mode="w", fmt=fmt)
    dest = tmp_path / "dest"
    dest.mkdir()
    safe_extract(tar, dest)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
        "DvsGesture", "DvsGesture/a.aedat", "DvsGesture/trials_to_train.txt"]
    assert (dest / "DvsGesture" / "a.aedat").read_bytes() == b"xyz"


def test_the_format_is_told_from_the_first_block_alone(tmp_path):
    tar = _tar(tmp_path / "DvsGesture.tar", [("DvsGesture/a.aedat", bytes(2 << 20))], mode="w")
    got: list[int] = []
    Counting = _counting(got)

    with Counting(tar) as f:
        assert release_mod._archive_mode(tar, f) == "r|" and f.tell() == 0
    assert got == [512]   # one tar block, never the whole archive


def test_a_missing_archive(tmp_path):
    assert _refused(tmp_path / "DvsGesture.tar.gz", tmp_path, MissingFileError) == (
        f"{tmp_path / 'DvsGesture.tar.gz'}: no such file")


def test_a_corrupt_gzip_stream_is_one_exact_line(tmp_path):
    f = tmp_path / "DvsGesture.tar.gz"
    f.write_bytes(b"\x1f\x8b\x08\x00" + bytes(600))
    assert _refused(f, tmp_path, ReleaseError) == f"{f}: unreadable archive (invalid compressed data)"


@pytest.mark.parametrize("name, data, error, message", [
    ("../escape.txt", b"abc", UnsafeArchiveError, "would be written outside the extraction directory"),
    ("DvsGesture\\user01_lab.aedat", b"abc", UnsafeArchiveError, "would be written outside the extraction directory"),
    ("user01\\..\\..\\x.aedat", b"abc", UnsafeArchiveError, "would be written outside the extraction directory"),
    ("DvsGesture/user01\x1blab.aedat", b"abc", ReleaseError, "has a name no release file has"),
    ("DvsGesture/extra", None, ReleaseError, f"is not part of the release ({LAYOUT})"),
    ("DvsGesture/x/a.aedat", b"abc", ReleaseError, f"is not part of the release ({LAYOUT})"),
])
def test_refused_members_are_one_exact_line(tmp_path, name, data, error, message):
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [("DvsGesture", None), (name, data)])
    assert _refused(tgz, tmp_path, error) == f"{tgz}: member {name!r} {message}"
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_member_over_its_bound_is_refused_at_its_header(tmp_path):
    """The header declares one byte past MAX_RECORDING_BYTES; none of its data is there."""
    tgz = tmp_path / "DvsGesture.tar.gz"
    with gzip.open(tgz, "wb") as gz:
        gz.write(_info("DvsGesture/user01_lab.aedat", MAX_RECORDING_BYTES + 1).tobuf())
        gz.write(bytes(1024))
    assert _refused(tgz, tmp_path, ResourceLimitError) == (
        f"{tgz}: member 'DvsGesture/user01_lab.aedat' declares 536,870,913 bytes, over the "
        f"536,870,912-byte bound for a recording; refusing the archive")


def test_a_member_twice(tmp_path):
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [*_FILES, ("DvsGesture/a.aedat", b"abc")])
    assert _refused(tgz, tmp_path, ReleaseError) == f"{tgz}: member 'DvsGesture/a.aedat' appears twice"


def test_member_count_bound_at_itself_and_one_past(tmp_path, monkeypatch):
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [("DvsGesture", None), *_FILES])   # 3 members
    monkeypatch.setattr(release_mod, "MAX_MEMBERS", 3)
    dest = tmp_path / "ok"
    dest.mkdir()
    safe_extract(tgz, dest)
    assert (dest / "DvsGesture" / "a.aedat").read_bytes() == b"xyz"
    monkeypatch.setattr(release_mod, "MAX_MEMBERS", 2)
    assert _refused(tgz, tmp_path, ResourceLimitError) == f"{tgz}: more than 2 members; not a DVS128 Gesture release"


def test_total_bound_at_itself_and_one_past(tmp_path, monkeypatch):
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [("DvsGesture", None), ("DvsGesture/a.aedat", b"xyz"),
                                                ("DvsGesture/b.aedat", b"abc")])   # 6 bytes in all
    monkeypatch.setattr(release_mod, "MAX_RELEASE_BYTES", 6)
    dest = tmp_path / "ok"
    dest.mkdir()
    safe_extract(tgz, dest)
    assert (dest / "DvsGesture" / "b.aedat").read_bytes() == b"abc"
    monkeypatch.setattr(release_mod, "MAX_RELEASE_BYTES", 5)
    assert _refused(tgz, tmp_path, ResourceLimitError) == (
        f"{tgz}: members declare more than 5 bytes in all, over the bound for a DVS128 Gesture release "
        f"(~5 GB extracted); refusing the archive")
    assert sorted(p.name for p in (tmp_path / "dest" / "DvsGesture").iterdir()) == ["a.aedat"]  # b never read


@pytest.mark.parametrize("when", ["archive", "member"])
def test_free_space_refusals_name_the_archive(tmp_path, monkeypatch, when):
    import collections

    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [("DvsGesture/a.aedat", bytes(100_000))])
    size = tgz.stat().st_size
    assert size < 100_000
    # "archive": one byte short of the archive's size; "member": the archive fits, its member not
    free = resources_mod.FREE_SPACE_RESERVE + size - (when == "archive")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(resources_mod.shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 40, free))
    need = size if when == "archive" else 100_000
    assert _refused(tgz, tmp_path, ResourceLimitError) == (
        f"{tgz}: needs {need / 1e6:,.1f} MB in {tmp_path} (plus {resources_mod.FREE_SPACE_RESERVE >> 20} MB "
        f"kept free), only {free / 1e6:,.1f} MB free")


@pytest.mark.parametrize("exc, error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), ResourceLimitError, None),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), ResourceLimitError, None),
    (PermissionError(errno.EACCES, "Permission denied"), ReleaseError, "Permission denied"),
    (OSError("odd\nfailure"), ReleaseError, "odd failure"),      # no strerror: the exception, one line
])
def test_os_errors_while_writing_a_member(tmp_path, monkeypatch, exc, error, reason):
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", _FILES)

    def failing_open(path, mode="r", *a, **k):
        if mode == "xb":
            raise exc
        return open(path, mode, *a, **k)

    monkeypatch.setattr(release_mod, "open", failing_open, raising=False)
    message = _refused(tgz, tmp_path, error)
    assert message == (f"{tgz}: no space left on device to extract it in {tmp_path}" if reason is None
                       else f"{tgz}: cannot extract ({reason})")


def test_members_are_copied_in_bounded_chunks(tmp_path, monkeypatch):
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [("DvsGesture/a.aedat", bytes(range(250)) * 10)])
    monkeypatch.setattr(release_mod, "_COPY_BUF", 1000)
    reads = []
    real = tarfile.TarFile.extractfile

    def spying(self, member):
        src = real(self, member)
        read = src.read

        def recorded(n=-1):
            data = read(n)
            reads.append((n, len(data)))
            return data

        src.read = recorded
        return src

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spying)
    dest = tmp_path / "dest"
    dest.mkdir()
    safe_extract(tgz, dest)
    assert (dest / "DvsGesture" / "a.aedat").read_bytes() == bytes(range(250)) * 10
    assert reads == [(1000, 1000), (1000, 1000), (500, 500)]


def test_extraction_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """Run from a folder that was removed (os.getcwd() fails there): absolute paths only."""
    tgz = _tar(tmp_path / "DvsGesture.tar.gz", [("DvsGesture", None), *_FILES])
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    safe_extract(tgz, dest)
    assert (dest / "DvsGesture" / "trials_to_train.txt").read_bytes() == b"a.aedat\n"
