"""A writer vouches for what it wrote: convert, frames, pack and unpack record the verified-marker
of their output (from the hashes they computed while writing, under the output's lock), so the
next reader on this machine does not hash it again; a byte changed after the writer finished is
still caught on the next open, however quickly it follows and even with the mtime put back."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

from aedat_fixtures import small_release
from dvsprep.errors import IntegrityError
from dvsprep.events.convert import convert_release
from dvsprep.events.store import EventsFile
from dvsprep.frames import store as frames_store
from dvsprep.frames.build import build_frame_store
from dvsprep.frames.files import open_store_files
from dvsprep.frames.pack import pack_store, unpack_store
from dvsprep.frames.store import open_frame_store
from dvsprep.integrity import trust
from hostile_fixtures import flip


@pytest.fixture()
def hashing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full verification of events.h5 or of a frame store, as it happens."""
    calls: list[str] = []
    real_problems, real_report = EventsFile.problems, frames_store.full_report
    monkeypatch.setattr(EventsFile, "problems", lambda self: calls.append(f"events {self.path.name}")
                        or real_problems(self))
    monkeypatch.setattr(frames_store, "full_report", lambda files, *a: calls.append(f"frames {Path(files.path).name}")
                        or real_report(files, *a))
    return calls


def _tamper(path: Path, edit) -> None:
    """Change `path` in place at once, then give it back its size-keeping mtime (only ctime tells)."""
    st = path.stat()
    edit(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    convert_release(small_release(tmp_path / "raw"), tmp_path / "data", jobs=1)
    return tmp_path / "data"


def test_convert_vouches_for_events_h5(data: Path, hashing: list[str]) -> None:
    ev = data / "events.h5"
    with EventsFile(ev, check="none") as ef:
        fp = ef.fingerprint
    assert trust.is_verified("events", ev, fp, {"": trust.stamp_path(ev)})
    with EventsFile(ev) as ef:                 # the first reader on this machine: no hashing
        assert ef.fingerprint == fp
    assert hashing == []
    EventsFile(ev, check="full").close()       # a full check still hashes when asked
    assert hashing == ["events events.h5"]


def test_a_change_after_convert_is_still_caught(data: Path, hashing: list[str]) -> None:
    ev = data / "events.h5"

    def edit(p: Path) -> None:
        with h5py.File(p, "r+") as f:
            f["train/label"][0] = (int(f["train/label"][0]) + 1) % 11

    _tamper(ev, edit)
    with pytest.raises(IntegrityError) as exc:
        EventsFile(ev)
    assert str(exc.value) == (f"{ev}: events file NOT intact: corrupt train/label (sha256 differ from the "
                              f"manifest) (dvsprep verify lists them)")
    assert hashing == ["events events.h5"]


@pytest.fixture()
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of this test's own: no record left by another test's store of the same content."""
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "own-cache"))


def test_frames_vouches_for_its_store_and_a_changed_byte_is_caught(own_cache: None, data: Path,
                                                                   hashing: list[str]) -> None:
    out = data / "frames_T4_number.zarr"
    fp = build_frame_store(data / "events.h5", out, T=4, jobs=1).fingerprint
    assert hashing == []                      # events.h5 came from convert: not hashed again
    assert trust.is_verified("frames", out, fp, open_store_files(out).stamps())
    assert trust.is_decoded("frames", fp)     # it encoded every sample: a full verification only hashes
    assert open_frame_store(out).fingerprint == fp
    assert hashing == []
    label = out / "test" / "label" / "c" / "0"
    _tamper(label, lambda p: flip(p, -2))
    with pytest.raises(IntegrityError) as exc:
        open_frame_store(out)
    assert str(exc.value) == (f"{out}: frame store NOT intact: 1 corrupt (of {len(open_store_files(out).names()) - 1} "
                              f"files): corrupt test/label/c/0 (sha256 differs from the manifest) "
                              f"(dvsprep verify lists them)")
    assert hashing == [f"frames {out.name}"]


def test_pack_and_unpack_vouch_for_their_outputs(data: Path, hashing: list[str]) -> None:
    store = data / "frames_T4_number.zarr"
    fp = build_frame_store(data / "events.h5", store, T=4, jobs=1).fingerprint
    zipped = pack_store(store)
    assert zipped.fingerprint == fp and trust.is_verified("frames", zipped.out, fp, {"": trust.stamp_path(zipped.out)})
    unpacked = unpack_store(zipped.out, data / "copy.zarr")
    assert trust.is_verified("frames", unpacked.out, fp, open_store_files(unpacked.out).stamps())
    for path in (zipped.out, unpacked.out):
        assert open_frame_store(path).fingerprint == fp
    assert hashing == []
    # a byte changed in either output after its writer finished: hashed again, and refused
    _tamper(zipped.out, lambda p: flip(p, zipped.out.stat().st_size // 2))
    with pytest.raises(IntegrityError, match="frame store NOT intact"):
        open_frame_store(zipped.out)
    shard = next(p for p in sorted((unpacked.out / "train").rglob("*")) if p.is_file() and p.stat().st_size > 64)
    _tamper(shard, lambda p: flip(p, p.stat().st_size // 2))
    with pytest.raises(IntegrityError, match="frame store NOT intact"):
        open_frame_store(unpacked.out)
    assert hashing == [f"frames {zipped.out.name}", f"frames {unpacked.out.name}"]


def test_record_written_needs_the_lock_file_and_unchanged_stamps(tmp_path: Path) -> None:
    out = tmp_path / "x.bin"
    out.write_bytes(b"x")
    stamps = lambda: {"": trust.stamp_path(out)}  # noqa: E731
    assert not trust.record_written("events", out, "a" * 64, stamps)          # no lock file: nothing held
    probe = tmp_path / ".x.bin.lock"
    probe.touch()
    assert trust.record_written("events", out, "a" * 64, stamps, probe=probe)
    assert trust.is_verified("events", out, "a" * 64, stamps())
    looks = iter([{"": trust.stamp_path(out)}, {"": (0, 0, 0, 0, 0)}])
    assert not trust.record_written("events", tmp_path / "y", "a" * 64, lambda: next(looks), probe=probe)
    assert not trust.is_verified("events", tmp_path / "y", "a" * 64, {"": trust.stamp_path(out)})


def test_the_writer_waits_for_the_clock_not_the_racy_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker is written once the probe's ctime is past the output's newest ctime, and none
    when the clock does not get there within the wait."""
    out, probe = tmp_path / "x.bin", tmp_path / ".x.bin.lock"
    out.write_bytes(b"x")
    probe.touch()
    future = trust.stamp_path(out)[:2] + (trust.stamp_path(out)[2] + 10**12,) + trust.stamp_path(out)[3:]
    assert not trust.record_written("events", out, "b" * 64, lambda: {"": future}, probe=probe, max_wait_s=0.05)
    assert not trust.is_verified("events", out, "b" * 64, {"": future})
    assert trust.record_written("events", out, "b" * 64, lambda: {"": trust.stamp_path(out)}, probe=probe)
    assert os.stat(probe).st_ctime_ns > trust.stamp_path(out)[2]
