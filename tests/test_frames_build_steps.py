"""The steps of `dvsprep frames` (dvsprep.frames.build) one by one, at their edges: counts at
the limit of the store's dtype (255 / 256 for uint8, 65535 / 65536 for uint16), events outside
the sensor by one pixel, reads that fail or come back short, events.h5 changing between the
checks, the pieces a split is cut into and the shard each piece completes, the in-flight limit,
the memory check at its exact byte boundary, and what the build reports (summary, log, bar).

Expected values are worked out by hand here (sizes in bytes, piece lists, messages) or counted
by the definition of split_by "number" (`store_fixtures.spec_number`); no step is its own oracle.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numcodecs
import numpy as np
import pytest

import dvsprep.frames.build as build_mod
import dvsprep.resources as resources_mod
from dvsprep.errors import InputOutputClashError, MissingFileError, OutputLockedError, ResourceLimitError, StoreError
from dvsprep.events.store import EventsSplit, EventsWriter
from dvsprep.frames.build import (
    BuildSummary,
    _blocks,
    _check_chunk_codec,
    _check_resources,
    _check_unchanged,
    _close_worker_files,
    _events_split,
    _InlineExecutor,
    _Overflow,
    _read_events_meta,
    _Shards,
    build_frame_store,
    frame_block,
    task_bytes,
)
from dvsprep.frames.store import DEFAULT_CODEC, chunk_codec, open_frame_store
from dvsprep.integrity.trust import stamp_path
from store_fixtures import spec_number

H = W = 128
FRAME = 2 * H * W   # one frame of both polarities: 32768 counts


@pytest.fixture(autouse=True)
def _no_cached_files():
    """frame_block keeps events.h5 open per path (one open per worker): none across tests."""
    _close_worker_files()
    yield
    _close_worker_files()


def _sample(m: int, seed: int, pixel: tuple[int, int] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    ev = {"t": np.sort(rng.integers(0, 1_000_000, m)).astype(np.int64),
          "x": rng.integers(0, W, m).astype(np.uint8), "y": rng.integers(0, H, m).astype(np.uint8),
          "p": rng.integers(0, 2, m).astype(np.uint8)}
    if pixel is not None:   # every event on one pixel, one polarity
        ev["x"][:], ev["y"][:], ev["p"][:] = pixel[0], pixel[1], 1
    return ev


def _write(path: Path, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """events.h5 holding exactly these samples (an absent or empty split holds none)."""
    w = EventsWriter(path)
    for split, samples in splits.items():
        n = len(samples)
        if not n:
            continue
        w.append(split, {k: np.concatenate([s[k] for s in samples]) for k in "txyp"},
                 np.array([s["x"].size for s in samples]),
                 {"label": np.arange(n) % 11, "row": np.arange(n), "t_start": np.zeros(n), "t_end": np.ones(n),
                  "recording": ["user01_lab"] * n})
    w.finish({"recordings": {}, "n_invalid_dropped": 0})
    return splits



def _decode(chunks: list[bytes], T: int, dtype: str) -> list[np.ndarray]:
    """The encoded samples frame_block returns, decoded by numcodecs' own Blosc."""
    return [np.frombuffer(numcodecs.Blosc().decode(c), dtype=dtype).reshape(T, 2, H, W) for c in chunks]


def _frame(events: Path, split: str, a: int, b: int, T: int, dtype: str = "|u1", *, stamp=None,
           split_by: str = "number"):
    """frame_block with the encoding codec of the default store (the workers' path)."""
    return frame_block(str(events), "unused.zarr", split, a, b, T, split_by, dtype,
                       stamp if stamp is not None else stamp_path(events), chunk_codec(DEFAULT_CODEC, np.dtype(dtype)))


# ------------------------------------------------------------------ frame_block: counts and dtypes


def test_a_block_is_each_sample_counted_and_the_largest_count(tmp_path):
    """Samples 1..3 (not from 0: the block's offsets are relative to its first event), one of
    them empty; the largest count is the block's (5 events on one pixel in a frame of T = 2)."""
    samples = [_sample(40, 1), _sample(23, 2), _sample(0, 3), _sample(10, 4, pixel=(127, 127)), _sample(7, 5)]
    _write(tmp_path / "e.h5", {"train": samples})
    a, b, top, chunks = _frame(tmp_path / "e.h5", "train", 1, 4, T=2)
    assert (a, b, top) == (1, 4, 5)
    got = _decode(chunks, 2, "|u1")
    assert len(got) == 3
    for k, i in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(got[k], spec_number(samples[i], 2), err_msg=f"sample {i}")
    assert got[2][1, 1, 127, 127] == 5 and got[2].sum() == 10


def test_a_block_of_empty_samples_is_zeros_and_a_count_of_0(tmp_path):
    """No event at all: no x or y to check, every frame 0, and the largest count 0 (not 1)."""
    _write(tmp_path / "e.h5", {"train": [_sample(3, 1), _sample(0, 2), _sample(0, 3)]})
    a, b, top, chunks = _frame(tmp_path / "e.h5", "train", 1, 3, T=3)
    assert (a, b, top) == (1, 3, 0)
    assert [int(f.sum()) for f in _decode(chunks, 3, "|u1")] == [0, 0]


@pytest.mark.parametrize("hot, overflows", [(255, False), (256, True)])
def test_uint8_holds_255_and_256_overflows(tmp_path, hot, overflows):
    """T = 1: every event of a sample in its one frame. 255 on one pixel fits uint8; 256 stops
    the block (_Overflow with the largest count so far: the parent promotes and reruns it)."""
    _write(tmp_path / "e.h5", {"train": [_sample(9, 1), _sample(hot, 2, pixel=(3, 4)), _sample(4, 3)]})
    if overflows:
        with pytest.raises(_Overflow) as exc:
            _frame(tmp_path / "e.h5", "train", 0, 3, T=1)
        assert exc.value.args == (256,)
        return
    a, b, top, chunks = _frame(tmp_path / "e.h5", "train", 0, 3, T=1)
    assert top == 255
    assert _decode(chunks, 1, "|u1")[1][0, 1, 4, 3] == 255


@pytest.mark.parametrize("hot", [65535, 65536])
def test_uint16_holds_65535_and_65536_is_an_error_naming_the_sample(tmp_path, hot):
    """The block of samples 1..2 at uint16: 65535 fits; 65536 is more than any store may hold,
    one line naming events.h5, the split and the sample's own number (2, not its place 1)."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(5, 1), _sample(6, 2), _sample(hot, 3, pixel=(0, 127))]})
    if hot == 65536:
        with pytest.raises(StoreError) as exc:
            _frame(events, "train", 1, 3, T=1, dtype="<u2")
        assert str(exc.value) == (f"{events}: train sample 2: a frame pixel counts 65536 events, "
                                  f"more than uint16 holds")
        return
    a, b, top, chunks = _frame(events, "train", 1, 3, T=1, dtype="<u2")
    assert (a, b, top) == (1, 3, 65535)
    got = _decode(chunks, 1, "<u2")
    assert got[1][0, 1, 127, 0] == 65535 and int(got[1].sum()) == 65535


def test_split_by_number_reads_no_timestamps_and_time_reads_them(tmp_path, monkeypatch):
    """split_by "number" never looks at t (8 of the 11 bytes an event): not read at all."""
    samples = [_sample(50, 1), _sample(70, 2)]
    _write(tmp_path / "e.h5", {"test": samples})
    read = []
    real = EventsSplit.values

    def values(self, field, lo, hi):
        read.append((field, lo, hi))
        return real(self, field, lo, hi)

    monkeypatch.setattr(EventsSplit, "values", values)
    _frame(tmp_path / "e.h5", "test", 1, 2, T=4)
    assert read == [("x", 50, 120), ("y", 50, 120), ("p", 50, 120)]
    read.clear()
    _, _, _, chunks = _frame(tmp_path / "e.h5", "test", 0, 2, T=4, split_by="time")
    assert sorted(read) == [("p", 0, 120), ("t", 0, 120), ("x", 0, 120), ("y", 0, 120)]
    # by time: every event is counted once, in the frame of its timestamp
    got = _decode(chunks, 4, "|u1")
    for ev, frames in zip(samples, got):
        assert int(frames.sum()) == ev["x"].size
        t = ev["t"]
        first = (t - t[0]) < (t[-1] - t[0]) // 4   # certainly in frame 0 (before the first quarter ends)
        assert int(frames[0].sum()) >= int(first.sum()) > 0


# ------------------------------------------------------------- frame_block: bad events, bad reads


def _poke(path: Path, name: str, i: int, value: int) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        f[name][i] = value


@pytest.mark.parametrize("field, value, bad", [("x", 127, False), ("x", 128, True), ("y", 127, False),
                                               ("y", 128, True)])
def test_x_or_y_one_past_the_sensor_is_an_error(tmp_path, field, value, bad):
    """A file changed behind its manifest (only the structure is checked in a worker): x or y
    of 128 is one past the sensor. The bad event is the last sample's, after an empty sample,
    so no earlier sample's end hides it."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(0, 2), _sample(6, 3)]})
    _poke(events, f"train/{field}", 9, value)
    if bad:
        with pytest.raises(StoreError) as exc:
            _frame(events, "train", 1, 3, T=2)
        assert str(exc.value) == f"{events}: train samples 1..2 have x or y outside the 128x128 sensor"
    else:
        a, b, top, chunks = _frame(events, "train", 1, 3, T=2)
        assert [int(f.sum()) for f in _decode(chunks, 2, "|u1")] == [0, 6]


def _failing_values(monkeypatch, exc: Exception) -> None:
    def values(self, field, lo, hi):
        raise exc

    monkeypatch.setattr(EventsSplit, "values", values)


def _touch(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("error", [OSError("disk gone"), KeyError("x"), ValueError("bad slice")])
def test_a_failed_read_names_the_file_split_and_samples(tmp_path, monkeypatch, error):
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(5, 2), _sample(6, 3)]})
    stamp = stamp_path(events)
    _failing_values(monkeypatch, error)
    with pytest.raises(StoreError) as exc:
        _frame(events, "train", 1, 3, T=2, stamp=stamp)
    assert str(exc.value) == f"{events}: cannot read train samples 1..2 ({error})"


@pytest.mark.parametrize("error", [OSError("disk gone"), StoreError("e.h5: corrupt train/x")])
def test_a_failed_read_of_a_changed_file_says_it_changed(tmp_path, monkeypatch, error):
    """The bytes changed under the read: that is the error, not "cannot read" (nor the
    reader's own message)."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(5, 2)]})
    stamp = stamp_path(events)
    _events_split(str(events), "train", stamp)   # opened (and checked) before the change
    _touch(events)
    _failing_values(monkeypatch, error)
    with pytest.raises(StoreError) as exc:
        _frame(events, "train", 0, 2, T=2, stamp=stamp)
    assert str(exc.value) == f"{events}: changed while the frame store was being written"


def test_a_reader_error_of_an_unchanged_file_is_passed_on(tmp_path, monkeypatch):
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1)]})
    _failing_values(monkeypatch, StoreError("e.h5: corrupt train/x"))
    with pytest.raises(StoreError, match=r"^e\.h5: corrupt train/x$"):
        _frame(events, "train", 0, 1, T=2)


def test_a_change_after_the_file_was_opened_is_found_after_the_read(tmp_path):
    """The worker's handle was opened before the change (it reads the new bytes): the stat
    after the read is what refuses them."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(5, 2)]})
    stamp = stamp_path(events)
    _events_split(str(events), "train", stamp)
    _touch(events)
    with pytest.raises(StoreError) as exc:
        _frame(events, "train", 0, 2, T=2, stamp=stamp)
    assert str(exc.value) == f"{events}: changed while the frame store was being written"


def test_a_short_read_is_offsets_inconsistent_with_the_events(tmp_path, monkeypatch):
    """Offsets that never decrease, but one field read back one event short."""
    events = tmp_path / "e.h5"
    _write(events, {"test": [_sample(4, 1), _sample(5, 2), _sample(6, 3)]})
    real = EventsSplit.values

    def values(self, field, lo, hi):
        out = real(self, field, lo, hi)
        return out[:-1] if field == "y" else out

    monkeypatch.setattr(EventsSplit, "values", values)
    with pytest.raises(StoreError) as exc:
        _frame(events, "test", 1, 3, T=2)
    assert str(exc.value) == f"{events}: test/offsets inconsistent with the events of samples 1..2"


def test_decreasing_offsets_are_inconsistent_with_the_events(tmp_path):
    """Offsets of the open split that decrease inside the block (its events still add up)."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(5, 2), _sample(6, 3)]})
    sp = _events_split(str(events), "train", stamp_path(events))
    assert sp.offsets.tolist() == [0, 4, 9, 15]
    sp.offsets[2] = 3
    with pytest.raises(StoreError) as exc:
        _frame(events, "train", 0, 3, T=2)
    assert str(exc.value) == f"{events}: train/offsets inconsistent with the events of samples 0..2"


# --------------------------------------------------------------------- events.h5 open per worker


def test_a_worker_opens_events_once_without_verifying_it_again(tmp_path, monkeypatch):
    """With the parent's stamp the worker checks the structure only (check "none": the parent
    verified the file); without one it verifies (check "auto"). One open per path."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(5, 2)], "test": [_sample(3, 3)]})
    opened = []
    real = build_mod.EventsFile

    def events_file(path, **kw):
        opened.append((path, kw))
        return real(path, **kw)

    monkeypatch.setattr(build_mod, "EventsFile", events_file)
    stamp = stamp_path(events)
    assert len(_events_split(str(events), "train", stamp)) == 2
    assert len(_events_split(str(events), "test", stamp)) == 1
    assert opened == [(str(events), {"check": "none"})]
    _close_worker_files()
    assert len(_events_split(str(events), "test")) == 1
    assert opened[1:] == [(str(events), {"check": "auto"})]


def test_without_a_stamp_a_worker_verifies_the_file_itself(tmp_path):
    """frame_block called on its own (no parent stamp): a file changed behind its manifest is
    refused, as the parent would."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1), _sample(5, 2)]})
    _poke(events, "train/x", 0, 5 if _sample(4, 1)["x"][0] != 5 else 6)
    with pytest.raises(StoreError, match=r"events file NOT intact"):
        frame_block(str(events), "unused.zarr", "train", 0, 2, 2, "number", "|u1", None,
                    chunk_codec(DEFAULT_CODEC, np.dtype("u1")))


def test_a_stale_stamp_refuses_before_the_file_is_opened(tmp_path, monkeypatch):
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(4, 1)]})
    stamp = stamp_path(events)
    _touch(events)
    monkeypatch.setattr(build_mod, "EventsFile", lambda *a, **k: pytest.fail("opened"))
    with pytest.raises(StoreError) as exc:
        _events_split(str(events), "train", stamp)
    assert str(exc.value) == f"{events}: changed while the frame store was being written"


def test_check_unchanged(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    stamp = stamp_path(path)
    _check_unchanged(str(path), None)              # no stamp: nothing to compare
    _check_unchanged(str(path), stamp)
    _check_unchanged(str(path), list(stamp))       # a stamp passed as a list (through a pool)
    _touch(path)
    with pytest.raises(StoreError) as exc:
        _check_unchanged(str(path), stamp)
    assert str(exc.value) == f"{path}: changed while the frame store was being written"
    path.unlink()
    with pytest.raises(StoreError, match=r"changed while the frame store was being written$"):
        _check_unchanged(str(path), stamp)
    _check_unchanged(str(path), None)


def test_read_events_meta(tmp_path):
    events = tmp_path / "e.h5"
    with pytest.raises(MissingFileError) as exc:
        _read_events_meta(events)
    assert str(exc.value) == f"{events}: no such events file (run `dvsprep convert` first)"
    _write(events, {"train": [_sample(4, 1), _sample(0, 2), _sample(6, 3)], "test": [_sample(2, 4)]})
    got_fp, stamp, meta = _read_events_meta(events)
    assert stamp == stamp_path(events)
    assert len(got_fp) == 64
    assert sorted(meta) == ["test", "train"]
    assert sorted(meta["train"]) == ["label", "n_events", "recording", "row", "t_end", "t_start"]
    assert meta["train"]["n_events"].tolist() == [4, 0, 6] and meta["test"]["n_events"].tolist() == [2]
    assert meta["train"]["label"].tolist() == [0, 1, 2] and meta["train"]["row"].tolist() == [0, 1, 2]
    assert meta["train"]["recording"] == ["user01_lab"] * 3


# -------------------------------------------------------------------- pieces, shards, resources


def test_blocks_cut_each_shard_in_parts_never_across_a_boundary():
    # shards of 5 cut in 4: pieces of 2, the last piece of a shard cut at the shard's end
    assert _blocks({"train": 10, "test": 0}, {"train": 5, "test": 1}, 4) == [
        ("train", 0, 2), ("train", 2, 4), ("train", 4, 5), ("train", 5, 7), ("train", 7, 9), ("train", 9, 10)]
    # exact quarters; a partial last shard; parts of one sample
    assert _blocks({"test": 8}, {"test": 8}, 4) == [("test", 0, 2), ("test", 2, 4), ("test", 4, 6), ("test", 6, 8)]
    assert _blocks({"train": 11}, {"train": 8}, 4) == [
        ("train", 0, 2), ("train", 2, 4), ("train", 4, 6), ("train", 6, 8), ("train", 8, 10), ("train", 10, 11)]
    assert _blocks({"train": 4}, {"train": 4}, 4) == [("train", 0, 1), ("train", 1, 2), ("train", 2, 3),
                                                      ("train", 3, 4)]
    assert _blocks({"train": 3}, {"train": 3}, 4) == [("train", 0, 1), ("train", 1, 2), ("train", 2, 3)]
    # whole shards, the two splits one after the other
    assert _blocks({"train": 7, "test": 2}, {"train": 3, "test": 2}, 1) == [
        ("train", 0, 3), ("train", 3, 6), ("train", 6, 7), ("test", 0, 2)]


def test_shards_written_once_whole_in_sample_order(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(build_mod, "write_frames_shard",
                        lambda path, shard, index, chunks: written.append((path, shard, index, chunks)))
    s = _Shards(tmp_path, {"train": 10, "test": 3}, {"train": 4, "test": 3})
    assert s.add("train", 6, 8, [b"6", b"7"]) is None
    assert s.add("train", 0, 2, [b"0", b"1"]) is None
    assert s.add("train", 4, 6, [b"4", b"5"]) == (4, 8)   # pieces back out of order
    assert written == [(tmp_path / "train" / "frames", 4, 1, [b"4", b"5", b"6", b"7"])]
    assert type(written[0][2]) is int   # the shard's number names its file
    assert s.add("train", 8, 10, [b"8", b"9"]) == (8, 10)   # the partial last shard
    assert written[1] == (tmp_path / "train" / "frames", 4, 2, [b"8", b"9"])
    assert s.add("test", 0, 3, [b"a", b"b", b"c"]) == (0, 3)
    assert written[2] == (tmp_path / "test" / "frames", 3, 0, [b"a", b"b", b"c"])
    assert s.drop() == [("train", 0, 2)]
    assert s.drop() == []
    assert s.add("train", 2, 4, [b"2", b"3"]) is None   # the dropped piece is gone


def test_task_bytes_by_hand():
    # shard x T frames of 32768 uint16 counts, plus 2 x T frames of int64
    assert task_bytes(1, 1) == 1 * 1 * FRAME * 2 + 2 * 1 * FRAME * 8 == 589_824
    got = task_bytes(3, 5)
    assert got == 5 * 3 * 65_536 + 3 * 524_288 == 2_555_904 and type(got) is int


def test_check_resources_at_the_T_limit_and_one_past(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(build_mod, "check_memory", lambda *a: asked.append(a))
    _check_resources(tmp_path / "f.zarr", 4096, 1, 3)
    # 3 jobs x (1 x 4096 x 65536 + 4096 x 524288) bytes
    assert asked == [(tmp_path / "f.zarr", "framing at -T 4096 with -j 3", 3 * 2_415_919_104,
                      "use fewer jobs or a smaller -T")]
    with pytest.raises(StoreError) as exc:
        _check_resources(tmp_path / "f.zarr", 4097, 1, 3)
    assert str(exc.value) == (f"{tmp_path / 'f.zarr'}: -T 4097 is more frames per sample than a frame store "
                              f"may hold (4096; readers refuse larger stores)")
    assert len(asked) == 1


@pytest.mark.parametrize("spare", [0, -1])
def test_the_memory_check_at_its_exact_byte_boundary(tmp_path, monkeypatch, spare):
    """T = 4: shards of 128 samples; 2 jobs need 2 x (128 x 4 x 65536 + 4 x 524288) bytes.
    Exactly that much free builds; one byte less is one line, and nothing written."""
    need = 2 * (128 * 4 * 65_536 + 4 * 524_288)
    assert need == 71_303_168
    _write(tmp_path / "e.h5", {"train": [_sample(4, 1)], "test": [_sample(3, 2)]})
    monkeypatch.setattr(resources_mod, "available_memory", lambda: need + spare)
    out = tmp_path / "f.zarr"
    if spare == 0:
        assert build_frame_store(tmp_path / "e.h5", out, T=4, jobs=2).dtype == np.uint8
        return
    with pytest.raises(ResourceLimitError) as exc:
        build_frame_store(tmp_path / "e.h5", out, T=4, jobs=2)
    msg = str(exc.value)
    assert msg.startswith(f"{out}: framing at -T 4 with -j 2 needs about ") and \
        msg.endswith(" is free (use fewer jobs or a smaller -T)"), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5"]


def test_check_chunk_codec_names_the_array_and_both_codecs(tmp_path):
    _write(tmp_path / "e.h5", {"train": [_sample(4, 1)], "test": [_sample(3, 2)]})
    build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=2, jobs=1)
    u1 = chunk_codec(DEFAULT_CODEC, np.dtype("u1"))
    _check_chunk_codec(tmp_path / "f.zarr", u1)
    u2 = chunk_codec(DEFAULT_CODEC, np.dtype("u2"))
    with pytest.raises(StoreError) as exc:
        _check_chunk_codec(tmp_path / "f.zarr", u2)
    assert str(exc.value) == (f"{tmp_path / 'f.zarr'}: train/frames stores its samples with {u1}, not the {u2} "
                              f"they were encoded with")


def test_inline_executor_futures():
    ex = _InlineExecutor()
    assert ex.submit(lambda a, b: a + b, 2, 3).result() == 5
    fut = ex.submit(lambda: 1 // 0)
    assert isinstance(fut.exception(), ZeroDivisionError)


def test_summary_lines():
    s = BuildSummary(path=Path("d/f.zarr"), fingerprint="ab" * 32, T=16, split_by="time", dtype=np.dtype("u2"),
                     counts={"train": {"n_samples": 7}, "test": {"n_samples": 0}}, max_count=300, seconds=1.25)
    assert s.lines() == [
        "wrote d/f.zarr (train 7, test 0 samples, T=16, split_by=time, uint16, max count 300) in 1.2 s",
        f"fingerprint {'ab' * 32}",
    ]


# ------------------------------------------------------------------------- the build as a whole


class _Pool(_InlineExecutor):
    """A "process pool" that frames in this process, in submit order: what is handed out
    before the metadata is written can be counted."""

    made: list[int] = []

    def __init__(self, jobs):
        _Pool.made.append(jobs)
        self.shutdowns = []

    def shutdown(self, wait=True, cancel_futures=False):
        self.shutdowns.append(wait)


def _count_handed_out(monkeypatch) -> tuple[list, list]:
    """(frame_block calls (split, a, b, dtype), how many were made when the metadata was written)."""
    calls, at_meta = [], []
    real_block, real_counts = build_mod.frame_block, build_mod.split_counts

    def frame_block(events, store, split, a, b, T, split_by, dtype, stamp, codec):
        calls.append((split, a, b, dtype))
        return real_block(events, store, split, a, b, T, split_by, dtype, stamp, codec)

    def split_counts(labels):
        at_meta.append(len(calls))
        return real_counts(labels)

    monkeypatch.setattr(build_mod, "frame_block", frame_block)
    monkeypatch.setattr(build_mod, "split_counts", split_counts)
    _Pool.made = []
    monkeypatch.setattr(build_mod, "process_pool", _Pool)
    return calls, at_meta


@pytest.mark.parametrize("jobs, in_flight", [(1, 2), (2, 4), (3, 6)])
def test_at_most_two_blocks_a_job_are_handed_out_before_the_metadata(tmp_path, monkeypatch, jobs, in_flight):
    """T = 64: shards of 8, quarter pieces of 2 samples; train 13 = 8 + 5 (the second shard cut
    in pieces of 2, 2, 1), test 5 (a shard of 5: pieces of 2). 10 pieces in all."""
    truth = _write(tmp_path / "e.h5", {"train": [_sample(3 + i, i) for i in range(13)],
                                       "test": [_sample(5 + i, 50 + i) for i in range(5)]})
    calls, at_meta = _count_handed_out(monkeypatch)
    summary = build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=64, jobs=jobs)
    assert at_meta == [in_flight, in_flight]   # once per split, both after the first blocks
    assert calls == [(s, a, b, "|u1") for s, a, b in [
        ("train", 0, 2), ("train", 2, 4), ("train", 4, 6), ("train", 6, 8), ("train", 8, 10), ("train", 10, 12),
        ("train", 12, 13), ("test", 0, 2), ("test", 2, 4), ("test", 4, 5)]]
    assert _Pool.made == ([] if jobs == 1 else [jobs])
    assert summary.max_count == max(int(spec_number(ev, 64).max()) for s in truth.values() for ev in s)
    if jobs == 2:   # (the same store each time)
        store = open_frame_store(tmp_path / "f.zarr", verify=True)
        for split, samples in truth.items():
            for i, ev in enumerate(samples):
                np.testing.assert_array_equal(store.split(split)[i], spec_number(ev, 64))


def test_a_pool_is_never_larger_than_the_pieces(tmp_path, monkeypatch):
    _write(tmp_path / "e.h5", {"train": [_sample(3, 1), _sample(4, 2)], "test": [_sample(2, 3)]})
    calls, _ = _count_handed_out(monkeypatch)
    build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=64, jobs=8)
    assert calls == [("train", 0, 1, "|u1"), ("train", 1, 2, "|u1"), ("test", 0, 1, "|u1")]
    assert _Pool.made == [3]


@pytest.mark.parametrize("hot", [255, 256])
def test_the_store_is_promoted_at_256_not_at_255(tmp_path, monkeypatch, hot):
    """T = 1 (one frame a sample): a sample with `hot` events on one pixel. 256 overflows
    uint8: the store is rewritten as uint16, the overflowed piece framed again as uint16."""
    samples = [_sample(6, 1), _sample(hot, 2, pixel=(5, 6)), _sample(2, 3)]
    _write(tmp_path / "e.h5", {"train": samples})
    calls, _ = _count_handed_out(monkeypatch)
    summary = build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=1, jobs=1)
    store = open_frame_store(tmp_path / "f.zarr", verify=True)
    assert summary.max_count == hot
    if hot == 255:
        assert summary.dtype == store.dtype == np.uint8
        assert calls == [("train", 0, 1, "|u1"), ("train", 1, 2, "|u1"), ("train", 2, 3, "|u1")]
    else:
        assert summary.dtype == store.dtype == np.uint16
        # pieces 0..0 and 1..1 in flight (-j 1: 2 at a time); 1 overflows; after the promotion
        # the piece of the shard not yet written (0) runs again, then the overflowed one, then
        # the rest, all as uint16
        assert calls == [("train", 0, 1, "|u1"), ("train", 1, 2, "|u1"), ("train", 0, 1, "<u2"),
                         ("train", 1, 2, "<u2"), ("train", 2, 3, "<u2")]
    for i, ev in enumerate(samples):
        np.testing.assert_array_equal(store.split("train")[i], spec_number(ev, 1))
    assert store.split("train")[1][0, 1, 6, 5] == hot


def test_a_count_past_uint16_stops_the_build_naming_the_sample(tmp_path):
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(3, 1)], "test": [_sample(2, 2), _sample(65536, 3, pixel=(1, 1))]})
    with pytest.raises(StoreError) as exc:
        build_frame_store(events, tmp_path / "f.zarr", T=1, jobs=1)
    assert str(exc.value) == f"{events}: test sample 1: a frame pixel counts 65536 events, more than uint16 holds"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5"]


def test_a_store_of_empty_samples_has_a_max_count_of_0(tmp_path):
    _write(tmp_path / "e.h5", {"train": [_sample(0, 1), _sample(0, 2)], "test": [_sample(0, 3)]})
    summary = build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=3, jobs=1)
    assert summary.max_count == 0 and summary.dtype == np.uint8


class _Bar:
    made: list["_Bar"] = []

    def __init__(self, **kw):
        self.kw, self.updates, self.closed = kw, [], False
        _Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


def test_the_progress_bar_counts_samples_as_their_shards_are_written(tmp_path, monkeypatch):
    import tqdm

    _Bar.made = []
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    _write(tmp_path / "e.h5", {"train": [_sample(3 + i, i) for i in range(11)], "test": [_sample(2, 30)]})
    build_frame_store(tmp_path / "e.h5", tmp_path / "a.zarr", T=64, jobs=1)
    assert _Bar.made == []   # no bar unless asked for
    build_frame_store(tmp_path / "e.h5", tmp_path / "b.zarr", T=64, jobs=1, progress=True)
    [bar] = _Bar.made
    assert bar.kw == {"total": 12, "unit": "sample", "desc": "frames"}
    assert bar.updates == [8, 3, 1] and bar.closed   # whole shards: train 0..7, 8..10, test 0


def test_the_summary_and_the_log_line(tmp_path, caplog, monkeypatch):
    import types

    _write(tmp_path / "e.h5", {"train": [_sample(9, 1), _sample(4, 2)], "test": [_sample(5, 3)]})
    out = tmp_path / "f.zarr"
    # the build's clock, read at its start and its end
    monkeypatch.setattr(build_mod, "time", types.SimpleNamespace(perf_counter=iter([10.0, 12.5]).__next__))
    with caplog.at_level(logging.INFO, logger="dvsprep.frames.build"):
        s = build_frame_store(tmp_path / "e.h5", out, T=2)
    store = open_frame_store(out)
    assert (s.path, s.T, s.split_by, s.dtype) == (out, 2, "number", np.uint8)
    assert s.fingerprint == store.fingerprint
    assert {k: c["n_samples"] for k, c in s.counts.items()} == {"train": 2, "test": 1}
    assert s.seconds == 2.5
    monkeypatch.undo()                     # the real clock again
    assert [r.getMessage() for r in caplog.records if r.name == "dvsprep.frames.build"] == [
        f"frames: {out} written, fingerprint {s.fingerprint}"]
    # the default is never to replace a store
    with pytest.raises(Exception) as exc:
        build_frame_store(tmp_path / "e.h5", out, T=2)
    assert str(exc.value) == f"{out}: already exists (use --force to replace it)"
    assert open_frame_store(out).fingerprint == s.fingerprint


@pytest.mark.parametrize("sizes, jobs, made", [
    ((1, 0), 2, []),        # one piece: framed here, no pool
    ((1, 1), 2, [2]),       # two pieces: a pool of 2
    ((2, 1), 1, []),        # -j 1: never a pool
    ((2, 1), None, None),   # no -j: one job a core, at most one a piece
])
def test_a_pool_only_for_two_pieces_and_two_jobs(tmp_path, monkeypatch, sizes, jobs, made):
    _write(tmp_path / "e.h5", {"train": [_sample(3 + i, i) for i in range(sizes[0])],
                               "test": [_sample(2 + i, 9 + i) for i in range(sizes[1])]})
    _count_handed_out(monkeypatch)
    pools = []
    real = _Pool.__init__

    def init(self, n):
        real(self, n)
        pools.append(self)

    monkeypatch.setattr(_Pool, "__init__", init)
    build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=64, jobs=jobs)
    store = open_frame_store(tmp_path / "f.zarr")   # a split of one sample: a shard of one sample
    assert [store.samples_per_shard(s) for s in ("train", "test")] == [max(1, min(8, n)) for n in sizes]
    for split, n in zip(("train", "test"), sizes):   # read here (the writer vouched it decodes)
        assert [int(store.split(split)[i].sum()) for i in range(n)] == [3 + i if split == "train" else 2 + i
                                                                         for i in range(n)]
    if made is None:
        cores = os.cpu_count() or 1
        made = [min(cores, 3)] if cores > 1 else []
    assert _Pool.made == made
    # after success the workers may exit while the manifest is hashed (no wait), then are joined
    assert [p.shutdowns for p in pools] == [[False, True]] * len(made)
    assert build_mod._WORKER_FILES == {}   # this process's handle of events.h5 is closed


def test_an_unknown_core_count_is_one_job(tmp_path, monkeypatch):
    """os.cpu_count() may say None: no -j then means one job, in this process (no pool)."""
    _write(tmp_path / "e.h5", {"train": [_sample(3 + i, i) for i in range(2)], "test": [_sample(2, 9)]})
    _count_handed_out(monkeypatch)
    monkeypatch.setattr(build_mod.os, "cpu_count", lambda: None)
    build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=64)
    assert _Pool.made == []
    assert [int(x.sum()) for x in open_frame_store(tmp_path / "f.zarr").split("train")] == [3, 4]


def test_the_input_is_checked_again_when_the_output_is_locked(tmp_path, monkeypatch):
    """The early check and the one under the lock are separate: with the early one passed (as if
    the paths changed in between), publishing still refuses to write over events.h5."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(3, 1)]})
    before = events.read_bytes()
    monkeypatch.setattr(build_mod, "check_output", lambda *a, **kw: None)
    with pytest.raises(InputOutputClashError) as exc:
        build_frame_store(events, events, T=2, jobs=1, force=True)
    assert str(exc.value) == f"{events}: is the input {events}; the frame store would overwrite its own input"
    assert events.read_bytes() == before


def test_an_output_onto_its_input_is_refused_before_any_other_check(tmp_path):
    """Even -T past the limit is said after: the output is the input, first."""
    events = tmp_path / "e.h5"
    _write(events, {"train": [_sample(3, 1)]})
    with pytest.raises(InputOutputClashError) as exc:
        build_frame_store(events, events, T=5000)
    assert str(exc.value) == f"{events}: is the input {events}; the frame store would overwrite its own input"


def test_a_locked_output_names_the_frame_store(tmp_path):
    from dvsprep.atomic import output_lock

    _write(tmp_path / "e.h5", {"train": [_sample(3, 1)]})
    out = tmp_path / "f.zarr"
    with output_lock(out, "other"):
        with pytest.raises(OutputLockedError) as exc:
            build_frame_store(tmp_path / "e.h5", out, T=2, jobs=1)
    assert str(exc.value).startswith(f"{out}: frame store is being written by another process"), str(exc.value)
    assert not out.exists()


class _Proc:
    def __init__(self):
        self.calls = []

    def kill(self):
        self.calls.append("kill")

    def join(self):
        self.calls.append("join")


@pytest.mark.parametrize("fails", [False, True])
def test_on_an_error_the_workers_are_killed_before_the_temporary_goes(tmp_path, monkeypatch, fails):
    """A failing build (a count past uint16) kills its workers at once, and joins them; a build
    that succeeds lets them go idle (never killed)."""
    hot = 65536 if fails else 65535
    _write(tmp_path / "e.h5", {"train": [_sample(3, 1), _sample(hot, 2, pixel=(2, 2))], "test": [_sample(2, 3)]})
    _count_handed_out(monkeypatch)
    procs = []
    real = _Pool.__init__

    def init(self, n):
        real(self, n)
        self._processes = {1: _Proc()}
        procs.append(self._processes[1])

    monkeypatch.setattr(_Pool, "__init__", init)
    if fails:
        with pytest.raises(StoreError, match="train sample 1: a frame pixel counts 65536 events"):
            build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=1, jobs=2)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5"]
    else:
        assert build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=1, jobs=2).max_count == 65535
    assert _Pool.made == [2]
    assert [p.calls for p in procs] == [["kill", "join"] if fails else []]
    assert build_mod._WORKER_FILES == {}


# ----------------------------------------------------------------------------- the pool at work

_PARENT = os.getpid()
_REAL_FRAME_BLOCK = frame_block
_PIDS: list[Path] = []      # where the workers' frame_block writes its pid (set before the pool forks)
_KILL_WORKER = [False]


def _frame_block_watched(*args, **kwargs):
    """frame_block that says which process ran it; with _KILL_WORKER, a worker (never this test's
    process) dies at once, as one killed by the kernel would."""
    if _KILL_WORKER[0] and os.getpid() != _PARENT:
        os.kill(os.getpid(), 9)
    with open(_PIDS[0], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _REAL_FRAME_BLOCK(*args, **kwargs)


def _watch_workers(monkeypatch, tmp_path, kill: bool) -> Path:
    pids = tmp_path / "pids"
    monkeypatch.setattr(build_mod, "frame_block", _frame_block_watched)
    _PIDS[:] = [pids]
    _KILL_WORKER[0] = kill
    return pids


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the build makes a pool only on 2 cores or more")
def test_with_two_jobs_the_blocks_are_framed_in_the_workers(tmp_path, monkeypatch):
    _write(tmp_path / "e.h5", {"train": [_sample(3 + i, i) for i in range(3)], "test": [_sample(4, 9)]})
    pids = _watch_workers(monkeypatch, tmp_path, kill=False)
    try:
        build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=2, jobs=2)
    finally:
        _KILL_WORKER[0] = False
    ran = {int(p) for p in pids.read_text().split()}
    assert ran and _PARENT not in ran   # every block in a worker, none in this process


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the build makes a pool only on 2 cores or more")
def test_a_worker_that_dies_is_one_line_naming_the_output(tmp_path, monkeypatch):
    from dvsprep.errors import WorkerDiedError

    _write(tmp_path / "e.h5", {"train": [_sample(3 + i, i) for i in range(3)], "test": [_sample(4, 9)]})
    _watch_workers(monkeypatch, tmp_path, kill=True)
    try:
        with pytest.raises(WorkerDiedError) as exc:
            build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=2, jobs=2)
    finally:
        _KILL_WORKER[0] = False
    assert str(exc.value) == f"{tmp_path / 'f.zarr'}: a worker process died before finishing (killed, or out of memory?)"
    assert not (tmp_path / "f.zarr").exists()


def test_the_codec_zarr_stores_is_checked_against_the_one_the_workers_encode_with(tmp_path, monkeypatch):
    """The workers encode before the arrays exist, with the codec `chunk_codec` predicts: a
    prediction that differs from what zarr then stores (another zarr version) stops the build."""
    _write(tmp_path / "e.h5", {"train": [_sample(4, 1)], "test": [_sample(3, 2)]})
    real = chunk_codec(DEFAULT_CODEC, np.dtype("u1"))
    wrong = {**real, "clevel": real["clevel"] + 1}
    monkeypatch.setattr(build_mod, "chunk_codec", lambda codec, dtype: wrong)
    with pytest.raises(StoreError) as exc:
        build_frame_store(tmp_path / "e.h5", tmp_path / "f.zarr", T=2, jobs=1)
    assert str(exc.value).endswith(f": train/frames stores its samples with {real}, not the {wrong} "
                                   f"they were encoded with")
    assert not (tmp_path / "f.zarr").exists()
