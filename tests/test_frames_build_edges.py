"""events.h5 changing while `dvsprep frames` builds a store (dvsprep.frames.build).

The build verifies events.h5 once, then frames it block by block from a handle each worker keeps
open. What it promises: the frames are the verified file's; a file rewritten, replaced or removed
before the last block is read is one error naming events.h5, nothing is left at the output, and
a store that --force would have replaced is kept byte for byte. The change is made by a hook at a
fixed point of the build (no sleeps): after the first blocks are handed out (`split_counts`,
called once per split by the metadata writer that runs while the workers frame), or just after
the verification (`EventsFile` in the parent).
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import dvsprep.frames.build as build_mod
from dvsprep.cli import main
from dvsprep.events.store import EventsWriter

# 4 + 3 blocks at T = 4 (a shard of 128 samples holds each split; quarter shards of 10 and 2):
# more than the 2 x jobs that are handed out before the hook runs, for -j 1 and -j 2.
SIZES = (37, 6)
T = 4


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write_events(path: Path, seed: int, sizes: tuple[int, int] = SIZES) -> None:
    rng = np.random.default_rng(seed)
    w = EventsWriter(path)
    for split, n in zip(("train", "test"), sizes):
        if not n:
            continue
        lens = rng.integers(50, 400, n)
        m = int(lens.sum())
        ev = {"t": np.sort(rng.integers(0, 1_000_000, m)).astype(np.int64),
              "x": rng.integers(0, 128, m).astype(np.uint8), "y": rng.integers(0, 128, m).astype(np.uint8),
              "p": rng.integers(0, 2, m).astype(np.uint8)}
        meta = {"label": np.arange(n) % 11, "row": np.arange(n) % 4, "t_start": np.zeros(n), "t_end": np.ones(n),
                "recording": [f"user{i // 4 + 1:02d}_lab" for i in range(n)]}
        w.append(split, ev, lens, meta)
    w.finish({"recordings": {}, "n_invalid_dropped": 0})


def _rewrite_last_test_x(path: Path) -> None:
    """Change, in place and without HDF5 (which the build holds open in this process), the x of
    the last test event: x is stored unfiltered, so its byte lies in its chunk as written.
    The test split is framed last: the workers read it after the change."""
    with h5py.File(path, "r") as f:
        ds = f["test/x"]
        assert ds.compression is None and not ds.shuffle and ds.shape[0] <= ds.chunks[0]
        k = ds.shape[0] - 1
        old = int(ds[k])
        where = ds.id.get_chunk_info(0).byte_offset + k
    with open(path, "r+b") as fh:
        fh.seek(where)
        assert fh.read(1)[0] == old
        fh.seek(where)
        fh.write(bytes([(old + 1) % 128]))


def _change(kind: str, events: Path) -> None:
    if kind == "rewritten":
        _rewrite_last_test_x(events)
    elif kind == "replaced":   # another valid events.h5, renamed over it
        _write_events(events.with_name("other.h5"), seed=99)
        os.replace(events.with_name("other.h5"), events)
    else:
        assert kind == "removed"
        events.unlink()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _hook_after_first_blocks(monkeypatch, action) -> list:
    """Run `action` once, inside the build, after its first blocks were handed out."""
    calls = []
    real = build_mod.split_counts

    def split_counts(labels):
        if not calls:
            action()
        calls.append(1)
        return real(labels)

    monkeypatch.setattr(build_mod, "split_counts", split_counts)
    return calls


@pytest.mark.parametrize("kind, jobs, force", [
    ("rewritten", 1, False),
    ("rewritten", 2, True),
    ("replaced", 1, True),
    ("replaced", 2, False),
    ("removed", 1, False),
    ("removed", 2, True),
])
def test_events_changed_after_the_first_blocks_is_one_error_and_nothing_written(
        tmp_path, monkeypatch, kind, jobs, force):
    events = tmp_path / "events.h5"
    _write_events(events, seed=1)
    store = tmp_path / "frames_T4_number.zarr"
    before = {}
    if force:
        assert _run("frames", "-T", T, "-d", tmp_path, "-j", "1").exit_code == 0
        before = _snapshot(store)
    names = sorted(p.name for p in tmp_path.iterdir())
    calls = _hook_after_first_blocks(monkeypatch, lambda: _change(kind, events))
    r = _run("frames", "-T", T, "-d", tmp_path, "-j", jobs, *(["--force"] if force else []))
    assert calls == [1, 1]   # the hook ran, once per split's metadata
    assert r.exit_code == 1, r.output
    assert r.output == f"error: {events}: changed while the frame store was being written\n"
    if kind == "removed":
        names.remove("events.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == names   # no temporary, no lock, no store
    if force:
        assert _snapshot(store) == before


def test_events_rewritten_just_after_its_verification_is_refused(tmp_path, monkeypatch):
    """A change between the parent's verification and the first read: the stamp the workers
    compare with was taken before the verification, so the unverified bytes are never framed."""
    events = tmp_path / "events.h5"
    _write_events(events, seed=2)
    real = build_mod.EventsFile
    opened = []

    def events_file(path, **kw):
        ef = real(path, **kw)    # verified (or structure-checked, in a worker) here
        if not opened:
            _rewrite_last_test_x(events)
        opened.append(kw.get("check", "auto"))
        return ef

    monkeypatch.setattr(build_mod, "EventsFile", events_file)
    r = _run("frames", "-T", T, "-d", tmp_path, "-j", "1")
    assert r.exit_code == 1, r.output
    assert r.output == f"error: {events}: changed while the frame store was being written\n"
    assert opened == ["auto"]   # the parent's verification only: no block was read from the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]


def test_an_unchanged_events_file_builds_with_the_hook_in_place(tmp_path, monkeypatch):
    """The control of the tests above: the same hook with nothing changed builds the store."""
    events = tmp_path / "events.h5"
    _write_events(events, seed=1)
    calls = _hook_after_first_blocks(monkeypatch, lambda: None)
    r = _run("frames", "-T", T, "-d", tmp_path, "-j", "2")
    assert r.exit_code == 0, r.output
    assert calls == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5", "frames_T4_number.zarr"]


def test_the_first_block_read_after_the_change_stops_the_build(tmp_path, monkeypatch):
    """With -j 1 (blocks run in this process, in order) no sample is framed after the change:
    the 2 blocks handed out before it (train 0..9 and 10..19) are all that is counted, not the
    whole split with the change found only at the end."""
    events = tmp_path / "events.h5"
    _write_events(events, seed=3)
    framed = []
    real = build_mod.count_frames

    def count_frames(t, x, y, p, T, split_by, out):
        framed.append(x.size)
        return real(t, x, y, p, T, split_by, out)

    monkeypatch.setattr(build_mod, "count_frames", count_frames)
    _hook_after_first_blocks(monkeypatch, lambda: _change("rewritten", events))
    r = _run("frames", "-T", T, "-d", tmp_path, "-j", "1")
    assert r.output == f"error: {events}: changed while the frame store was being written\n"
    assert len(framed) == 20


def test_a_store_with_no_sample_still_refuses_a_changed_events_file(tmp_path, monkeypatch):
    """No block reads the file (both splits empty): the check after the framing still runs."""
    events = tmp_path / "events.h5"
    _write_events(events, seed=4, sizes=(0, 0))
    _write_events(tmp_path / "other.h5", seed=5, sizes=(0, 0))
    calls = _hook_after_first_blocks(monkeypatch, lambda: os.replace(tmp_path / "other.h5", events))
    r = _run("frames", "-T", T, "-d", tmp_path, "-j", "1")
    assert calls == [1, 1]
    assert r.output == f"error: {events}: changed while the frame store was being written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]
