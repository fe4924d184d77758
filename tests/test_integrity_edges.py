"""dvsprep.integrity at its edges: the exact bytes a fingerprint hashes, the exact marker a
verification leaves (where, named how, holding what), and the boundaries of every rule that
decides whether a marker is written or trusted (the racy window, the marker size bound, the
writer's wait for the filesystem clock).

Oracles are written here: hashlib over hand-written bytes, marker bodies spelled out key by key,
the writer's back-off schedule as a list. The clock of `record_written` is a fake one advanced
by the sleeps it asks for, so nothing here waits.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from dvsprep.errors import IntegrityError
from dvsprep.integrity import manifest, trust

KIND, FP = "frames", "ab" * 32


def _marker_name(kind: str, path: Path) -> str:
    """The marker's file name, from its specification: sha256 of kind NUL realpath, 40 hex digits."""
    key = hashlib.sha256(kind.encode() + b"\0" + os.fsencode(os.path.realpath(path))).hexdigest()[:40]
    return f"{kind}-{key}.json"


def _body_bytes(path: Path, stamps: dict) -> bytes:
    """The marker's bytes as specified: sorted keys, json.dumps' default separators."""
    return (b'{"checks": 2, "fingerprint": "' + FP.encode() + b'", "kind": "' + KIND.encode() + b'", "path": '
            + json.dumps(os.path.realpath(path)).encode() + b', "stamps": '
            + json.dumps({k: list(v) for k, v in sorted(stamps.items())}).encode() + b"}")


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    for name, data in (("b.bin", b"\x01\x02"), ("a.bin", b"abc")):
        (path / name).write_bytes(data)
    return path


def _stamps(store: Path) -> dict:
    return {p.name: trust.stamp_path(p) for p in sorted(store.iterdir())}


# ----------------------------------------------------------------------------- manifest.py

def test_canonical_json_is_sorted_compact_ascii():
    obj = {"b": 1, "a": ["é", {"d": None, "c": 2.5}]}
    want = b'{"a":["\\u00e9",{"c":2.5,"d":null}],"b":1}'
    assert manifest.canonical_json(obj) == want
    # the fingerprint is sha256 of exactly those bytes
    assert manifest.fingerprint(obj) == hashlib.sha256(want).hexdigest()
    assert manifest.fingerprint({}) == hashlib.sha256(b"{}").hexdigest()


def test_sha256_and_md5_of_a_file_longer_than_the_read_buffer(tmp_path):
    data = bytes(range(256)) * (manifest._BUF // 256 * 2 + 3)    # two buffers and a bit
    (tmp_path / "x").write_bytes(data)
    (tmp_path / "y").write_bytes(b"")
    assert manifest.sha256_file(tmp_path / "x") == hashlib.sha256(data).hexdigest()
    assert manifest.md5_file(tmp_path / "x") == hashlib.md5(data).hexdigest()
    (tmp_path / "sub").mkdir()                                    # folders are not listed
    want = {"x": hashlib.md5(data).hexdigest(), "y": hashlib.md5(b"").hexdigest()}
    for jobs in (0, 1, 3):
        assert manifest.md5_files(tmp_path, jobs) == want
        assert list(manifest.md5_files(tmp_path, jobs)) == ["x", "y"]


# ----------------------------------------------------------------------------- markers

def test_a_verification_leaves_exactly_this_marker_in_the_given_cache(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "default"))
    cache = tmp_path / "cache"
    st = _stamps(store)
    newest = max(s[2] for s in st.values())
    assert trust.record_verified(KIND, store, FP, st, newest + trust.RACY_NS + 1, cache_dir=cache) is True
    assert trust.marker_dir(cache) == cache / "verified"
    assert [p.name for p in (cache / "verified").iterdir()] == [_marker_name(KIND, store)]
    assert (cache / "verified" / _marker_name(KIND, store)).read_bytes() == _body_bytes(store, st)
    assert not (tmp_path / "default").exists()                   # nothing in the default cache
    assert trust.is_verified(KIND, store, FP, st, cache_dir=cache)
    assert not trust.is_verified(KIND, store, FP, st)            # the default cache has none
    assert not trust.is_verified("events", store, FP, st, cache_dir=cache)
    assert not trust.is_verified(KIND, store, "cd" * 32, st, cache_dir=cache)
    trust.forget(KIND, store, cache_dir=cache)
    assert list((cache / "verified").iterdir()) == []
    trust.forget(KIND, store, cache_dir=cache)                   # no marker: nothing to do, no error


def test_the_same_marker_is_not_written_again_and_another_one_of_equal_size_is(store, tmp_path):
    cache = tmp_path / "cache"
    st = _stamps(store)
    late = max(s[2] for s in st.values()) + trust.RACY_NS + 1
    assert trust.record_verified(KIND, store, FP, st, late, cache_dir=cache)
    marker = cache / "verified" / _marker_name(KIND, store)
    first = trust.stamp_path(marker)
    assert trust.record_verified(KIND, store, FP, st, late, cache_dir=cache)
    assert trust.stamp_path(marker) == first                       # untouched: same inode, same ctime
    assert trust.record_verified(KIND, store, "cd" * 32, st, late, cache_dir=cache)   # same size, other bytes
    assert trust.stamp_path(marker)[3] != first[3]
    assert trust.is_verified(KIND, store, "cd" * 32, st, cache_dir=cache)
    assert not trust.is_verified(KIND, store, FP, st, cache_dir=cache)


def test_a_path_that_is_not_utf8_gets_a_marker(tmp_path):
    """A file name of arbitrary bytes (os.fsdecode's surrogates) still names one marker."""
    odd = tmp_path / os.fsdecode(b"st\xffore")
    odd.mkdir()
    (odd / "f").write_bytes(b"x")
    st = _stamps(odd)
    started = max(s[2] for s in st.values()) + trust.RACY_NS + 1
    assert trust.record_verified(KIND, odd, FP, st, started, cache_dir=tmp_path / "c") is True
    assert [p.name for p in (tmp_path / "c" / "verified").iterdir()] == [_marker_name(KIND, odd)]


@pytest.mark.parametrize("gap, written", [(trust.RACY_NS, False), (trust.RACY_NS + 1, True)])
def test_racy_window_boundary(store, tmp_path, gap, written):
    """A file whose ctime is RACY_NS or less before the verification began gets no marker."""
    st = _stamps(store)
    started = max(s[2] for s in st.values()) + gap
    assert trust.record_verified(KIND, store, FP, st, started, cache_dir=tmp_path / "c") is written
    assert trust.is_verified(KIND, store, FP, st, cache_dir=tmp_path / "c") is written


@pytest.mark.parametrize("extra, trusted", [(0, True), (1, False)])
def test_marker_size_bound(store, tmp_path, monkeypatch, extra, trusted):
    """A marker of exactly MAX_MARKER_BYTES is read; one byte more is not (whitespace pads the
    same JSON, so only the bound decides)."""
    cache = tmp_path / "c"
    st = _stamps(store)
    trust.record_verified(KIND, store, FP, st, max(s[2] for s in st.values()) + trust.RACY_NS + 1, cache_dir=cache)
    marker = cache / "verified" / _marker_name(KIND, store)
    body = marker.read_bytes()
    monkeypatch.setattr(trust, "MAX_MARKER_BYTES", len(body) + 10)
    marker.write_bytes(body + b" " * (10 + extra))
    assert trust.is_verified(KIND, store, FP, st, cache_dir=cache) is trusted


def test_a_cache_that_cannot_be_written_gives_no_marker(store, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=trust.__name__)
    (tmp_path / "c").write_bytes(b"a file where the cache folder should be")
    st = _stamps(store)
    started = max(s[2] for s in st.values()) + trust.RACY_NS + 1
    assert trust.record_verified(KIND, store, FP, st, started, cache_dir=tmp_path / "c") is False
    assert caplog.messages == [f"no verified-marker for {store}: [Errno 20] Not a directory: "
                               f"'{tmp_path / 'c' / 'verified'}'"]


# ----------------------------------------------------------------------------- the writer's marker

class FakeClock:
    """monotonic() that moves only when the code under test sleeps."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(trust.time, "monotonic", c.monotonic)
    monkeypatch.setattr(trust.time, "sleep", c.sleep)
    return c


def test_writer_marker_is_recorded_in_the_given_cache_with_the_given_probe(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "default"))
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    st = _stamps(store)
    # no lock file beside the store: only the probe given can be touched
    assert trust.record_written(KIND, store, FP, lambda: st, probe=probe, cache_dir=tmp_path / "c") is True
    assert (tmp_path / "c" / "verified" / _marker_name(KIND, store)).read_bytes() == _body_bytes(store, st)
    assert not (tmp_path / "default").exists()


def test_writer_marker_without_files_or_probe_is_not_recorded(store, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=trust.__name__)
    assert trust.record_written(KIND, store, FP, lambda: {}, probe=tmp_path / "p", cache_dir=tmp_path / "c") is False
    st = _stamps(store)
    missing = tmp_path / "no-probe"
    assert trust.record_written(KIND, store, FP, lambda: st, probe=missing, cache_dir=tmp_path / "c") is False
    assert not (tmp_path / "c").exists()
    # os.utime's error names no file: the line names the store
    assert caplog.messages == [f"no verified-marker for {store}: [Errno 2] No such file or directory"]


def test_writer_marker_waits_with_doubling_sleeps_up_to_its_limit(store, tmp_path, clock, caplog):
    """A filesystem clock that never passes the output's newest ctime: sleeps 0.5 ms, doubling,
    at most 50 ms each, until max_wait_s has passed (>=), then no marker and one debug line."""
    caplog.set_level(logging.DEBUG, logger=trust.__name__)
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    future = {"f": (1, 1, 2**62, 1, 1)}             # a ctime no clock reaches
    assert trust.record_written(KIND, store, FP, lambda: future, probe=probe, cache_dir=tmp_path / "c",
                                max_wait_s=0.1275) is False
    # 0.0005 * (1 + 2 + ... + 64) = 0.0635, then 0.05 capped: 0.1135, 0.1635 >= 0.1275
    assert clock.sleeps == [0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.05, 0.05]
    assert caplog.messages == [f"no verified-marker for {store}: the filesystem clock did not move past it"]
    assert not (tmp_path / "c").exists()


def test_writer_marker_deadline_boundary(store, tmp_path, monkeypatch):
    """At exactly the deadline the writer gives up (>=): no further sleep. The clock reads are
    scripted (start 0.0, so the deadline is 1.0 exactly), since sums of sleeps round."""
    reads, sleeps = iter([0.0, 0.5, 1.0]), []
    monkeypatch.setattr(trust.time, "monotonic", lambda: next(reads))
    monkeypatch.setattr(trust.time, "sleep", sleeps.append)
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    future = {"f": (1, 1, 2**62, 1, 1)}
    assert trust.record_written(KIND, store, FP, lambda: future, probe=probe, cache_dir=tmp_path / "c",
                                max_wait_s=1.0) is False
    assert sleeps == [0.0005]                        # at 0.5 it waits, at 1.0 it stops


def test_writer_marker_needs_the_probe_strictly_past_the_newest_ctime(store, tmp_path, clock, monkeypatch):
    """A probe ctime equal to the newest file's ctime is the same clock tick: not yet."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    st = _stamps(store)
    newest = max(s[2] for s in st.values())
    seen = iter([newest, newest, newest + 1])          # the probe's ctime after each touch
    real_stat = os.stat

    class Probed:
        def __init__(self, st_ctime_ns):
            self.st_ctime_ns = st_ctime_ns

    def fake_stat(p, *a, **k):
        return Probed(next(seen)) if Path(p) == probe else real_stat(p, *a, **k)

    monkeypatch.setattr(trust.os, "stat", fake_stat)
    assert trust.record_written(KIND, store, FP, lambda: st, probe=probe, cache_dir=tmp_path / "c") is True
    assert clock.sleeps == [0.0005, 0.001]


def test_writer_marker_is_not_recorded_when_a_file_changed_meanwhile(store, tmp_path):
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    first, later = _stamps(store), {**_stamps(store), "a.bin": (9, 9, 9, 9, 9)}
    calls = iter([first, later])
    assert trust.record_written(KIND, store, FP, lambda: next(calls), probe=probe, cache_dir=tmp_path / "c") is False
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- ensure_verified

def test_ensure_verified_trusts_a_matching_marker_and_forced_verifies_anyway(store, tmp_path, monkeypatch):
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    st = _stamps(store)
    calls = []

    def verify():
        calls.append(1)
        return "intact", []

    trust.ensure_verified(KIND, store, FP, st, "src", verify)      # first: verified (racy: no marker)
    assert len(calls) == 1
    assert trust.record_verified(KIND, store, FP, st, max(s[2] for s in st.values()) + trust.RACY_NS + 1)
    trust.ensure_verified(KIND, store, FP, st, "src", verify)      # the marker matches: no verify
    assert len(calls) == 1
    trust.ensure_verified(KIND, store, FP, st, "src", verify, force=True)
    assert len(calls) == 2


@pytest.mark.parametrize("n, tail", [(3, ""), (4, " ...")])
def test_ensure_verified_refusal_lists_three_problems_and_drops_the_marker(store, tmp_path, monkeypatch, n, tail):
    monkeypatch.setenv("DVSPREP_CACHE", str(tmp_path / "cache"))
    st = _stamps(store)
    assert trust.record_verified(KIND, store, FP, st, max(s[2] for s in st.values()) + trust.RACY_NS + 1)
    problems = [("changed", f"f{i}", f"d{i}") for i in range(n)]
    with pytest.raises(IntegrityError) as err:
        trust.ensure_verified(KIND, store, FP, st, "src", lambda: ("2 problems", problems), force=True)
    assert str(err.value) == ("src: 2 problems: changed f0 (d0); changed f1 (d1); changed f2 (d2)"
                              f"{tail} (dvsprep verify lists them)")
    assert list((tmp_path / "cache" / "verified").iterdir()) == []


# ----------------------------------------------------------------------------- decoded-records


def test_a_decoded_record_is_exactly_this_file_in_the_given_cache(tmp_path):
    cache = tmp_path / "cache"
    assert not trust.is_decoded(KIND, FP, cache)
    assert trust.record_decoded(KIND, FP, cache)
    record = cache / "verified" / f"decoded-frames-{FP}.json"
    assert sorted(p.name for p in (cache / "verified").iterdir()) == [record.name]
    assert record.read_bytes() == b'{"checks": 2, "decoded": "' + FP.encode() + b'", "kind": "frames"}'
    assert trust.is_decoded(KIND, FP, cache)
    assert not trust.is_decoded("events", FP, cache)      # another kind: another record
    assert not trust.is_decoded(KIND, "cd" * 32, cache)   # other content
    trust.forget_decoded(KIND, FP, cache)
    assert not record.exists() and not trust.is_decoded(KIND, FP, cache)
    trust.forget_decoded(KIND, FP, cache)                 # nothing to forget: no error


@pytest.mark.parametrize("fingerprint", ["ab" * 31, "ab" * 32 + "a", "AB" * 32, "../" + "a" * 61, "g" * 64, ""])
def test_a_fingerprint_that_is_not_a_sha256_is_never_recorded(tmp_path, fingerprint):
    cache = tmp_path / "cache"
    assert not trust.record_decoded(KIND, fingerprint, cache)
    assert not (cache / "verified").exists()
    assert not trust.is_decoded(KIND, fingerprint, cache)


@pytest.mark.parametrize("body", [
    b'{"checks": 1, "decoded": "' + FP.encode() + b'", "kind": "frames"}',    # older checks
    b'{"checks": 2, "decoded": "' + b"cd" * 32 + b'", "kind": "frames"}',    # other content under its name
    b'{"checks": 2, "decoded": "' + FP.encode() + b'", "kind": "events"}',
    b'{"checks": 2, "decoded": "' + FP.encode() + b'", "kind": "frames", "x": 1}',
    b'{"checks": 2, "decoded": "' + FP.encode() + b'"',                       # cut short
    b"[" * 100_000,                                                            # nested past the recursion limit
])
def test_a_record_that_is_not_exactly_ours_does_not_count(tmp_path, body):
    cache = tmp_path / "cache"
    (cache / "verified").mkdir(parents=True)
    (cache / "verified" / f"decoded-frames-{FP}.json").write_bytes(body)
    assert not trust.is_decoded(KIND, FP, cache)


@pytest.mark.parametrize("extra, trusted", [(0, True), (1, False)])
def test_decoded_record_size_bound(tmp_path, monkeypatch, extra, trusted):
    cache = tmp_path / "cache"
    assert trust.record_decoded(KIND, FP, cache)
    size = (cache / "verified" / f"decoded-frames-{FP}.json").stat().st_size
    monkeypatch.setattr(trust, "MAX_MARKER_BYTES", size - extra)
    assert trust.is_decoded(KIND, FP, cache) is trusted


def test_a_cache_that_cannot_be_written_gives_no_decoded_record(tmp_path, caplog):
    blocker = tmp_path / "cache"
    blocker.write_bytes(b"a file where the cache folder would be")
    with caplog.at_level(logging.DEBUG, logger="dvsprep.integrity.trust"):
        assert not trust.record_decoded(KIND, FP, blocker)
    assert any(r.getMessage().startswith(f"no decoded-record for {FP}: ") for r in caplog.records)
    assert blocker.read_bytes() == b"a file where the cache folder would be"
