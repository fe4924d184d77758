"""Verification at hashing speed: events.h5 event datasets verified from their stored bytes
(`dvsprep.events.stored`), frame store shards hashed and decoded from one read, -j threads."""
from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest

from dvsprep.events import store as events_store
from dvsprep.events.store import EVENT_CHUNK, EventsFile, EventsWriter
from dvsprep.frames import check as frames_check
from dvsprep.frames.pack import pack_store
from dvsprep.integrity.manifest import canonical_json, fingerprint
from dvsprep.verify import verify_path
from hostile_fixtures import flip, resign, resign_events
from store_fixtures import make_multishard_store

FIELDS = ("t", "x", "y", "p")


def _events(path, seed=0):
    """Three appends to train (the first two leave partial chunks behind), one to test."""
    rng = np.random.default_rng(seed)
    w = EventsWriter(path)
    t0 = 0
    for split, n_ev in (("train", 70_000), ("train", 50_000), ("train", 30_000), ("test", 1_000)):
        ev = {"t": t0 + np.sort(rng.integers(0, 1_000_000, n_ev)).astype(np.int64),
              "x": rng.integers(0, 128, n_ev).astype(np.uint8), "y": rng.integers(0, 128, n_ev).astype(np.uint8),
              "p": rng.integers(0, 2, n_ev).astype(np.uint8)}
        t0 += 1_000_000
        w.append(split, ev, np.array([n_ev // 2, n_ev - n_ev // 2]),
                 {"label": np.array([1, 2]), "row": np.array([0, 1]), "t_start": np.zeros(2), "t_end": np.ones(2),
                  "recording": ["user01_lab"] * 2})
    w.finish({"recordings": {}, "n_invalid_dropped": 0})
    return path


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    return _events(tmp_path_factory.mktemp("ev") / "events.h5")


@pytest.fixture()
def ev(events, tmp_path):
    p = tmp_path / "events.h5"
    p.write_bytes(events.read_bytes())
    return p


def _stored_oracle(ds: h5py.Dataset) -> str:
    """The stored digest as its format defines it, read through HDF5's own direct-chunk reads."""
    pl = ds.id.get_create_plist()
    filters = [[int(c), int(fl), [int(v) for v in cd]] for c, fl, cd, _ in
               (pl.get_filter(i) for i in range(pl.get_nfilters()))]
    head = json.dumps({"chunk": ds.chunks[0], "dtype": ds.dtype.str, "filters": filters},
                      sort_keys=True, separators=(",", ":")).encode()
    table, data = b"", hashlib.sha256()
    for a in range(0, ds.shape[0], ds.chunks[0]):
        mask, chunk = ds.id.read_direct_chunk((a,))
        table += int(mask).to_bytes(8, "little") + len(chunk).to_bytes(8, "little")
        data.update(chunk)
    return hashlib.sha256(head + table + data.digest()).hexdigest()


def test_the_writer_records_the_stored_digest_of_every_event_dataset(events):
    with h5py.File(events, "r") as f:
        m = json.loads(f.attrs["manifest"])["datasets"]
        assert f["train/t"].id.get_num_chunks() == 3  # 150,000 events in chunks of 65,536
        for split in ("train", "test"):
            for k in FIELDS:
                assert m[f"{split}/{k}"]["stored"] == _stored_oracle(f[f"{split}/{k}"]), f"{split}/{k}"
        assert "stored" not in m["train/label"]


def test_a_fresh_file_verifies_without_decoding_its_events(ev, monkeypatch):
    decoded, reads = [], []
    real_entry, real_read = events_store._decoded_entry, events_store._read
    monkeypatch.setattr(events_store, "_decoded_entry", lambda ds, name, *a: decoded.append(name) or real_entry(ds, name, *a))
    monkeypatch.setattr(events_store, "_read", lambda ds, where, sl=(): reads.append((ds.name, sl)) or real_read(ds, where, sl))
    for jobs in (1, 3):
        decoded.clear()
        report = verify_path(ev, jobs=jobs)
        assert report.ok, report.lines()
        assert sorted(decoded) == sorted(f"{s}/{k}" for s in ("train", "test")
                                         for k in ("offsets", "label", "row", "t_start", "t_end"))
    assert not [r for r in reads if r[0].rsplit("/", 1)[-1] in FIELDS]


def _chunk_offset(path, name, i=0):
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(i)
        return info.byte_offset, info.size


# a byte in the packed values (t, p: after the 21-byte scale-offset header) or a value (x) of
# the first chunk, within the dataset's extent: the file still decodes, to other values
@pytest.mark.parametrize("name, at", [("train/t", 163_000), ("train/x", 65_535), ("test/p", 21 + 100)])
def test_a_changed_stored_byte_is_found(ev, name, at):
    off, size = _chunk_offset(ev, name)
    assert at < size
    data = bytearray(ev.read_bytes())
    data[off + at] ^= 0x01
    ev.write_bytes(bytes(data))
    report = verify_path(ev)
    assert [(p.kind, p.name, p.detail) for p in report.problems] == [
        ("corrupt", name, "sha256 differ from the manifest")]


def test_values_outside_the_sensor_are_found_in_the_stored_bytes(ev, monkeypatch):
    with h5py.File(ev, "r+") as f:
        f["train/x"][70_001] = 200
        f["train/p"][5] = 3
        f["test/y"][999] = 128
    resign_events(ev)   # every hash matches: only the value checks can refuse it
    decoded = []
    real = events_store._read
    monkeypatch.setattr(events_store, "_read", lambda ds, where, sl=(): decoded.append((ds.name, sl)) or real(ds, where, sl))
    report = verify_path(ev)
    assert sorted((p.kind, p.name, p.detail) for p in report.problems) == [
        ("invalid", "test/y", "holds 128, outside 0..127"),
        ("invalid", "train/p", "holds 3, outside 0..1"),
        ("invalid", "train/x", "holds 200, outside 0..127"),
    ]
    # x and y are judged from their bytes; p's first chunk (its header allows 0..3) is decoded
    assert [d for d in decoded if d[0].rsplit("/", 1)[-1] in FIELDS] == [("/train/p", slice(0, EVENT_CHUNK))]


def test_a_manifest_without_stored_digests_is_verified_by_decoding(ev):
    with h5py.File(ev, "r+") as f:
        m = json.loads(f.attrs["manifest"])
        for entry in m["datasets"].values():
            entry.pop("stored", None)
        f.attrs["manifest"] = canonical_json(m).decode("ascii")
        f.attrs["fingerprint"] = fingerprint(m)
    assert verify_path(ev).ok
    with h5py.File(ev, "r+") as f:
        f["train/t"][3] += 1
    assert [(p.kind, p.name) for p in verify_path(ev).problems] == [("corrupt", "train/t")]


def test_a_changed_byte_past_the_extent_changes_no_value(ev):
    """test/p holds 1,000 events in a chunk of 65,536: a byte of the unused rest differs from
    what was written, yet every value is the same, and the dataset (decoded) verifies."""
    off, size = _chunk_offset(ev, "test/p")
    data = bytearray(ev.read_bytes())
    data[off + size - 2] ^= 0x01
    ev.write_bytes(bytes(data))
    assert verify_path(ev).ok


def test_the_same_values_stored_otherwise_still_verify(ev):
    """Stored digests are a shortcut: a dataset rewritten with other chunks (h5repack) but the
    same values is decoded and found intact."""
    with h5py.File(ev, "r+") as f:
        x = f["train/x"][()]
        del f["train/x"]
        f.create_dataset("train/x", data=x, chunks=(EVENT_CHUNK,), compression="lzf")
    assert verify_path(ev).ok
    with EventsFile(ev, check="none") as ef:
        assert ef.problems() == []


def test_stores_are_read_once_and_every_shard_decoded(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    pack_store(path, tmp_path / "s.zip")
    checked = []
    real = frames_check._ShardReader.check_shard
    monkeypatch.setattr(frames_check._ShardReader, "read", lambda *a: pytest.fail("a shard read a second time"))
    monkeypatch.setattr(frames_check._ShardReader, "check_shard",
                        lambda self, s, data, n: checked.append((self.split, s)) or real(self, s, data, n))
    for p in (path, tmp_path / "s.zip"):
        for jobs in (1, 2):
            checked.clear()
            assert verify_path(p, jobs=jobs, decode=True).ok
            assert sorted(checked) == [("test", 0), ("train", 0), ("train", 1), ("train", 2)]


def test_reports_do_not_depend_on_jobs(tmp_path):
    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    for name in ("train/frames/c/1/0/0/0/0", "train/label/c/0", "test/frames/c/0/0/0/0/0"):
        data = bytearray((path / name).read_bytes())
        data[20] ^= 0xFF
        (path / name).write_bytes(bytes(data))
    (path / "train/extra").write_bytes(b"x")
    one = verify_path(path, jobs=1)
    assert [p.name for p in one.problems] == ["test/frames/c/0/0/0/0/0", "train/frames/c/1/0/0/0/0",
                                              "train/label/c/0", "train/extra"]
    assert verify_path(path, jobs=4).lines() == one.lines()


def test_large_shards_are_hashed_streaming_then_decoded(tmp_path, monkeypatch):
    """Shards above the in-memory bound are streamed through sha256 and decoded afterwards."""
    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    monkeypatch.setattr(frames_check, "_IN_MEMORY", 0)
    monkeypatch.setattr(frames_check._ShardReader, "check_shard", lambda *a: pytest.fail("decoded from memory"))
    read, real = [], frames_check._ShardReader.read
    monkeypatch.setattr(frames_check._ShardReader, "read", lambda self, i: read.append((self.split, i)) or real(self, i))
    assert verify_path(path, jobs=2, decode=True).ok
    assert sorted(read) == sorted([("train", i) for i in range(20)] + [("test", i) for i in range(5)])
    shard = path / "train/frames/c/1/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert [(p.kind, p.name) for p in verify_path(path).problems] == [("corrupt", "train/frames/c/1/0/0/0/0")]


def test_verify_takes_jobs_for_every_kind(ev, tmp_path):
    from click.testing import CliRunner

    from dvsprep.cli import main

    store = tmp_path / "s.zarr"
    make_multishard_store(store)
    for target in (ev, store):
        r = CliRunner().invoke(main, ["verify", "-j", "3", str(target)])
        assert r.exit_code == 0 and " intact: " in r.output, r.output


# ----------------------------------------------------------------------------- content decoded before

SKIPPED_NOTE = ("  samples not decoded: this content (same fingerprint) was decoded on this machine before, "
                "and every file hashes as its manifest says (--decode decodes them again)")
SHARDS = [("test", 0), ("train", 0), ("train", 1), ("train", 2)]


@pytest.fixture
def watch(tmp_path, monkeypatch):
    """A cache of this test's own, and what a verification does: the shards it decodes (from
    the bytes it hashed, or read again) and the files it hashes."""
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    seen = {"decoded": [], "hashed": []}
    check_shard, read, check_file = frames_check._ShardReader.check_shard, frames_check._ShardReader.read, \
        frames_check.check_file
    monkeypatch.setattr(frames_check._ShardReader, "check_shard", lambda self, s, data, n: seen["decoded"].append(
        (self.split, s)) or check_shard(self, s, data, n))
    monkeypatch.setattr(frames_check._ShardReader, "read", lambda self, i: seen["decoded"].append(
        (self.split, i // self.shard)) or read(self, i))
    monkeypatch.setattr(frames_check, "check_file", lambda files, name, *a, **k: seen["hashed"].append(
        name) or check_file(files, name, *a, **k))

    def take() -> dict:
        out = {k: sorted(set(v)) for k, v in seen.items()}
        for v in seen.values():
            v.clear()
        return out
    return take


def _undecodable(path):
    """A store whose first train sample declares a decoded size one byte too large (its blosc
    header, bytes 4..8), with a manifest that matches: what only decoding can find."""
    shard = path / "train/frames/c/0/0/0/0/0"
    data = bytearray(shard.read_bytes())
    data[4:8] = (int.from_bytes(data[4:8], "little") + 1).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    resign(path)
    return fingerprint_of(path)


def fingerprint_of(path) -> str:
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def test_content_decoded_before_is_hashed_whole_but_not_decoded(tmp_path, watch):
    from dvsprep.integrity import trust

    path = tmp_path / "s.zarr"
    fp, _ = make_multishard_store(path)
    files = sorted(json.loads((path / "manifest.json").read_bytes())["files"])
    assert trust.is_decoded("frames", fp)          # its writer encoded every sample
    watch()
    report = verify_path(path, jobs=2)
    assert report.ok and report.lines()[1:] == [SKIPPED_NOTE]
    assert watch() == {"decoded": [], "hashed": files}
    assert verify_path(path, jobs=2, decode=True).lines()[1:] == []
    assert watch() == {"decoded": SHARDS, "hashed": files}
    trust.forget_decoded("frames", fp)
    assert verify_path(path, jobs=1).lines()[1:] == []   # decoded, and recorded so
    assert watch() == {"decoded": SHARDS, "hashed": files}
    assert trust.is_decoded("frames", fp)
    assert verify_path(path, jobs=1).lines()[1:] == [SKIPPED_NOTE]
    assert watch()["decoded"] == []


def test_a_copy_elsewhere_is_hashed_but_not_decoded_by_its_first_reader(tmp_path, watch):
    import shutil

    from dvsprep.frames import open_frame_store

    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    files = sorted(json.loads((path / "manifest.json").read_bytes())["files"])
    shutil.copytree(path, tmp_path / "copy.zarr")
    watch()
    open_frame_store(tmp_path / "copy.zarr")    # no marker for the copy: verified in full
    assert watch() == {"decoded": [], "hashed": files}


def test_a_decoded_record_does_not_hide_a_changed_byte(tmp_path, watch):
    from dvsprep.errors import IntegrityError
    from dvsprep.frames import open_frame_store

    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    flip(path / "train/frames/c/1/0/0/0/0", 40)
    assert [(p.kind, p.name) for p in verify_path(path).problems] == [("corrupt", "train/frames/c/1/0/0/0/0")]
    with pytest.raises(IntegrityError, match="corrupt train/frames/c/1/0/0/0/0"):
        open_frame_store(path)
    assert watch()["decoded"] == []


def test_content_not_decoded_before_is_decoded_whatever_else_was(tmp_path, watch):
    from dvsprep.errors import IntegrityError
    from dvsprep.frames import open_frame_store
    from dvsprep.integrity import trust

    path = tmp_path / "s.zarr"
    fp, _ = make_multishard_store(path)
    bad = _undecodable(path)
    assert trust.is_decoded("frames", fp) and not trust.is_decoded("frames", bad)
    report = verify_path(path)
    assert [(p.kind, p.name) for p in report.problems] == [("invalid", "train/frames/c/0/0/0/0/0")]
    assert "sample 0 has the wrong decoded size" in report.problems[0].detail
    assert not trust.is_decoded("frames", bad)
    with pytest.raises(IntegrityError, match="sample 0 has the wrong decoded size"):
        open_frame_store(path)
    assert not trust.is_decoded("frames", bad)


def test_a_forged_record_is_dropped_by_the_next_decoding_verification(tmp_path, watch):
    """A record is as trustworthy as the cache it lies in (as markers are): one written by hand
    for content that does not decode hides it until a verification decodes, which drops it."""
    from dvsprep.integrity import trust

    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    bad = _undecodable(path)
    assert trust.record_decoded("frames", bad)
    assert verify_path(path).lines()[1:] == [SKIPPED_NOTE]
    report = verify_path(path, decode=True)
    assert [(p.kind, p.name) for p in report.problems] == [("invalid", "train/frames/c/0/0/0/0/0")]
    assert not trust.is_decoded("frames", bad)
    assert [p.name for p in verify_path(path).problems] == ["train/frames/c/0/0/0/0/0"]


def test_a_store_with_a_corrupt_file_leaves_no_record(tmp_path, watch):
    from dvsprep.integrity import trust

    path = tmp_path / "s.zarr"
    fp, _ = make_multishard_store(path)
    trust.forget_decoded("frames", fp)
    flip(path / "train/label/c/0", 12)
    assert [p.kind for p in verify_path(path).problems] == ["corrupt"]
    assert watch()["decoded"] == SHARDS
    assert not trust.is_decoded("frames", fp)


def test_pack_and_unpack_record_nothing_they_did_not_decode(tmp_path, watch):
    from dvsprep.frames.pack import unpack_store
    from dvsprep.integrity import trust

    path = tmp_path / "s.zarr"
    fp, _ = make_multishard_store(path)
    trust.forget_decoded("frames", fp)
    pack_store(path, tmp_path / "s.zip")        # its source opened (decoded), not recorded by the copy
    unpack_store(tmp_path / "s.zip", tmp_path / "u.zarr")
    assert not trust.is_decoded("frames", fp)
    watch()
    assert verify_path(tmp_path / "u.zarr").lines()[1:] == []
    assert watch()["decoded"] == SHARDS and trust.is_decoded("frames", fp)


def test_verify_decode_option(tmp_path, watch):
    from click.testing import CliRunner

    from dvsprep.cli import main

    path = tmp_path / "s.zarr"
    make_multishard_store(path)
    watch()
    r = CliRunner().invoke(main, ["verify", str(path)])
    assert r.exit_code == 0 and r.output.splitlines()[1:] == [SKIPPED_NOTE], r.output
    assert watch()["decoded"] == []
    r = CliRunner().invoke(main, ["verify", "--decode", str(path)])
    assert r.exit_code == 0 and len(r.output.splitlines()) == 1, r.output
    assert watch()["decoded"] == SHARDS
