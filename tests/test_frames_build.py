"""events.h5 -> frame store (dvsprep.frames.build), `dvsprep frames` / `dvsprep info`, and the
end-to-end check against SpikingJelly's DVS128Gesture frames."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dvsprep.cli import main
from dvsprep.errors import StoreError
from dvsprep.events.store import EventsFile, EventsWriter
from dvsprep.frames.build import build_frame_store
from dvsprep.frames.store import open_frame_store
from dvsprep.frames.integrate import integrate
from dvsprep.raw.release import sj_sample_names

from aedat_fixtures import small_release


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write_events(path: Path, seed: int = 0, sizes=(37, 6), hot_test: bool = False,
                  hot: tuple[str, int] | None = None) -> dict:
    """A small events.h5 with samples of 0..3000 events (sorted t); returns the events per split.
    `hot`: (split, sample) of 40000 events on one pixel (over 255 in a frame up to T = 128)."""
    rng = np.random.default_rng(seed)
    w = EventsWriter(path)
    truth = {}
    for split, n in zip(("train", "test"), sizes):
        lens = rng.integers(0, 3000, n)
        lens[:3] = [0, 1, 5][: min(3, n)]
        if hot is not None and hot[0] == split:
            lens[hot[1]] = 40_000
        samples = []
        for k, m in enumerate(lens):
            t = np.sort(rng.integers(0, 2_000_000, m)).astype(np.int64)
            ev = {"t": t, "x": rng.integers(0, 128, m).astype(np.uint8),
                  "y": rng.integers(0, 128, m).astype(np.uint8), "p": rng.integers(0, 2, m).astype(np.uint8)}
            if (hot_test and split == "test" and k == n - 1) or (split, k) == hot:
                ev["x"][:], ev["y"][:] = 9, 10  # one pixel far beyond uint8 in a frame
            samples.append(ev)
        cat = {k: np.concatenate([s[k] for s in samples]) for k in "txyp"}
        meta = {"label": np.arange(n) % 11, "row": np.arange(n) % 4, "t_start": np.zeros(n), "t_end": np.ones(n),
                "recording": [f"user{i // 4 + 1:02d}_lab" for i in range(n)]}
        w.append(split, cat, lens, meta)
        truth[split] = samples
    w.finish({"recordings": {}, "n_invalid_dropped": 0})
    return truth


def _check_store(store_path: Path, truth: dict, T: int, split_by: str) -> None:
    store = open_frame_store(store_path)
    for split, samples in truth.items():
        sp = store.split(split)
        assert len(sp) == len(samples)
        for i, ev in enumerate(samples):
            expect = integrate(ev["t"], ev["x"], ev["y"], ev["p"], T, split_by)
            np.testing.assert_array_equal(sp[i], expect)
        assert sp.n_events.tolist() == [s["t"].size for s in samples]


@pytest.mark.parametrize("split_by", ["number", "time"])
def test_build_from_events_matches_integration(tmp_path, split_by):
    truth = _write_events(tmp_path / "events.h5")
    summary = build_frame_store(tmp_path / "events.h5", tmp_path / "f.zarr", T=16, split_by=split_by, jobs=1)
    store = open_frame_store(tmp_path / "f.zarr")
    assert store.dtype == np.uint8 and summary.dtype == np.uint8
    assert store.fingerprint == summary.fingerprint
    with EventsFile(tmp_path / "events.h5") as ef:
        assert store.events_fingerprint == ef.fingerprint
        sp = ef.split("train")
        assert store.split("train").recordings == sp.recordings
        assert store.split("train").rows.tolist() == sp.rows.tolist()
    assert store.attrs["splits"]["test"]["n_samples"] == 6
    _check_store(tmp_path / "f.zarr", truth, 16, split_by)


def test_parallel_build_is_identical_and_promotes_to_uint16(tmp_path):
    # The only overflowing sample is the last test sample, framed after the train shards were
    # written as uint8: those are rewritten, nothing is clipped, and -j 1 / -j 2 agree byte for byte.
    truth = _write_events(tmp_path / "events.h5", seed=1, hot_test=True)
    s1 = build_frame_store(tmp_path / "events.h5", tmp_path / "a.zarr", T=2, split_by="number", jobs=1)
    s2 = build_frame_store(tmp_path / "events.h5", tmp_path / "b.zarr", T=2, split_by="number", jobs=2)
    assert s1.dtype == s2.dtype == np.uint16 and s1.max_count > 255
    assert s1.fingerprint == s2.fingerprint
    _check_store(tmp_path / "b.zarr", truth, 2, "number")
    assert open_frame_store(tmp_path / "a.zarr").attrs["dtype"] == "uint16"


def _naive_number_frames(ev: dict, T: int) -> np.ndarray:
    """split_by "number" by its definition, event by event (np.add.at): the oracle below."""
    n = ev["x"].size
    di = n // T
    frame = np.minimum(np.arange(n) // di, T - 1) if di else np.full(n, T - 1)
    out = np.zeros((T, 2, 128, 128), dtype=np.int64)
    np.add.at(out, (frame, (ev["p"] != 0).astype(int), ev["y"].astype(int), ev["x"].astype(int)), 1)
    return out


@pytest.mark.parametrize("jobs", [1, 2])
def test_shards_assembled_from_pieces_are_zarrs_bytes(tmp_path, monkeypatch, jobs):
    # T=64: 8 samples a shard, pieces of 2 samples, the last train shard partial (37 = 4*8 + 5).
    # Train sample 13 overflows uint8 after the pieces 8..11 of its shard were encoded as uint8:
    # the store is promoted, those pieces are framed again. Every file must equal, byte for
    # byte, the store that zarr writes shard by shard (no chunk codec: the workers write
    # through zarr), and every sample the frames counted event by event.
    truth = _write_events(tmp_path / "events.h5", seed=2, hot=("train", 13))
    fast = build_frame_store(tmp_path / "events.h5", tmp_path / "fast.zarr", T=64, jobs=jobs)
    import dvsprep.frames.build as build_mod

    monkeypatch.setattr(build_mod, "chunk_codec", lambda codec, dtype: None)
    ref = build_frame_store(tmp_path / "events.h5", tmp_path / "zarr.zarr", T=64, jobs=jobs)
    assert fast.dtype == ref.dtype == np.uint16 and fast.max_count == ref.max_count > 255
    names = sorted(str(p.relative_to(tmp_path / "zarr.zarr")) for p in (tmp_path / "zarr.zarr").rglob("*") if p.is_file())
    assert len([n for n in names if "/frames/c/" in n]) == 5 + 1   # 5 train shards, 1 test shard
    assert names == sorted(str(p.relative_to(tmp_path / "fast.zarr")) for p in (tmp_path / "fast.zarr").rglob("*")
                           if p.is_file())
    for name in names:
        assert (tmp_path / "fast.zarr" / name).read_bytes() == (tmp_path / "zarr.zarr" / name).read_bytes(), name
    assert fast.fingerprint == ref.fingerprint
    store = open_frame_store(tmp_path / "fast.zarr")
    for split, samples in truth.items():
        for i, ev in enumerate(samples):
            np.testing.assert_array_equal(store.split(split)[i], _naive_number_frames(ev, 64))


def test_cli_frames_and_info(tmp_path):
    _write_events(tmp_path / "events.h5", sizes=(5, 2))
    r = _run("frames", "-T", "8", "--split-by", "time", "-d", tmp_path, "-j", "1")
    assert r.exit_code == 0, r.output
    store = tmp_path / "frames_T8_time.zarr"
    assert "wrote" in r.output and open_frame_store(store).T == 8
    r = _run("info", store)
    assert r.exit_code == 0, r.output
    fp = open_frame_store(store).fingerprint
    assert "T=8  split_by=time  dtype=uint8" in r.output and fp in r.output
    assert "train: 5 samples" in r.output and "per class 0:1  1:1  2:1  3:1  4:1  5:0" in r.output
    r = _run("info", "--json", store)
    d = json.loads(r.output)
    assert d["kind"] == "frames" and d["splits"]["test"]["n_samples"] == 2 and d["size_bytes"] > 0
    r = _run("info", tmp_path / "events.h5")
    assert r.exit_code == 0, r.output
    with EventsFile(tmp_path / "events.h5") as ef:
        assert ef.fingerprint in r.output
    assert "events file (dvsprep-events/1)" in r.output and "train: 5 samples" in r.output


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(200))


@pytest.mark.parametrize("args, prepare, match", [
    (["-T", "4"], "missing", "events.h5: no such events file"),
    (["-T", "4"], "corrupt", "events.h5: not a readable HDF5 file"),
    (["-T", "4"], "not_events", "events.h5: not a dvsprep events file"),
    (["-T", "4"], "exists", "frames_T4_number.zarr: already exists"),
])
def test_bad_inputs_one_line_exit_1_nothing_written(tmp_path, args, prepare, match):
    import h5py

    if prepare != "missing":
        _write_events(tmp_path / "events.h5", sizes=(2, 1))
    if prepare == "corrupt":
        _corrupt(tmp_path / "events.h5")
    if prepare == "not_events":
        with h5py.File(tmp_path / "events.h5", "w") as f:
            f["x"] = np.zeros(3)
    existing = None
    if prepare == "exists":
        assert _run("frames", "-T", "4", "-d", tmp_path, "-j", "1").exit_code == 0
        existing = open_frame_store(tmp_path / "frames_T4_number.zarr").fingerprint
    before = sorted(p.name for p in tmp_path.iterdir())
    r = _run("frames", *args, "-d", tmp_path, "-j", "1")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.output
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    if existing:
        assert open_frame_store(tmp_path / "frames_T4_number.zarr").fingerprint == existing
        r = _run("frames", *args, "-d", tmp_path, "-j", "1", "--force")
        assert r.exit_code == 0 and open_frame_store(tmp_path / "frames_T4_number.zarr").fingerprint == existing


@pytest.mark.parametrize("out", ["events.h5", "events.h5/x.zarr", "."])
def test_frames_never_writes_onto_its_own_input(tmp_path, out):
    """`-o` that is events.h5, would lie inside it, or is the folder holding it (with --force,
    which would otherwise replace it): one line, events.h5 untouched."""
    _write_events(tmp_path / "events.h5", sizes=(2, 1))
    before = (tmp_path / "events.h5").read_bytes()
    names = sorted(p.name for p in tmp_path.iterdir())
    r = _run("frames", "-T", "4", "-d", tmp_path, "-o", tmp_path / out, "--force", "-j", "1")
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "events.h5" in lines[0], r.output
    assert "its own input" in lines[0] or "destroy the input" in lines[0]
    assert (tmp_path / "events.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_events_outside_sensor_is_an_error(tmp_path):
    import h5py

    _write_events(tmp_path / "events.h5", sizes=(4, 1))
    with h5py.File(tmp_path / "events.h5", "r+") as f:
        f["train/x"][5] = 200
    # events.h5 is verified first: the value and the changed bytes are both named
    with pytest.raises(StoreError, match=r"events.h5: events file NOT intact: invalid train/x \(holds 200, "
                                         r"outside 0..127\); corrupt train/x"):
        build_frame_store(tmp_path / "events.h5", tmp_path / "f.zarr", T=4, jobs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]


def test_info_errors(tmp_path):
    r = _run("info", tmp_path / "nothing")
    assert r.exit_code == 1 and "no such file or directory" in r.output
    (tmp_path / "d").mkdir()
    r = _run("info", tmp_path / "d")
    assert r.exit_code == 1 and "neither an events.h5 file nor a frame store" in r.output


# ----------------------------------------------------------------------------- end to end


def _sj_frames(raw_parent: Path, sj_root: Path, T: int, split_by: str) -> dict:
    """SpikingJelly's DVS128Gesture frames of both splits, by relative file name."""
    from spikingjelly.datasets import utils as sju
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    if not (sj_root / "events_np").exists():
        (sj_root / "events_np").mkdir(parents=True)
        DVS128Gesture.create_raw_from_extracted(raw_parent, sj_root / "events_np")
    out = {}
    for split in ("train", "test"):
        base = sj_root / f"frames_number_{T}_split_by_{split_by}" / split
        try:
            ds = DVS128Gesture(str(sj_root), train=split == "train", data_type="frame", frames_number=T,
                               split_by=split_by)
        except FileNotFoundError as exc:
            # torchvision's DatasetFolder refuses a split without some class; SpikingJelly has
            # written its frame files by then, so read those the way the dataset would.
            assert "Found no valid file for the classes" in str(exc)
            for f in sorted(base.rglob("*.npz")):
                out[(split, f.relative_to(base).as_posix())] = sju.load_npz_frames(f)
            continue
        for i, (fname, label) in enumerate(ds.samples):
            rel = Path(fname).relative_to(base).as_posix()
            frame, lab = ds[i]
            # DatasetFolder numbers the class folders in string order ("0", "1", "10", "2", ...),
            # so SpikingJelly's label differs from the folder (= csv class - 1) for classes 2..10.
            assert lab == label == sorted(str(c) for c in range(11)).index(rel.split("/")[0])
            out[(split, rel)] = np.asarray(frame)
    return out


def _compare_with_spikingjelly(store_path: Path, sj: dict) -> int:
    store = open_frame_store(store_path)
    seen = 0
    for split in ("train", "test"):
        sp = store.split(split)
        for rec in dict.fromkeys(sp.recordings):
            idx = [i for i, r in enumerate(sp.recordings) if r == rec]
            assert sp.rows[idx].tolist() == sorted(sp.rows[idx].tolist())  # sorted by (recording, row)
            for i, name in zip(idx, sj_sample_names(sp.labels[idx], rec)):
                ref = sj.pop((split, name))
                assert ref.shape == sp[i].shape and np.all(ref == np.round(ref))
                np.testing.assert_array_equal(sp[i], ref.astype(np.int64), err_msg=f"{split} {name}")
                seen += 1
    assert not sj, f"SpikingJelly samples missing from the store: {sorted(sj)[:5]}"
    return seen


def test_end_to_end_small_release_number(tmp_path):
    # The lead's tiny release: repeated classes, overlapping windows, a sample with 0 events and
    # one with fewer events than frames.
    small_release(tmp_path / "raw")
    assert _run("convert", tmp_path / "raw", "-o", tmp_path / "data", "-j", "1").exit_code == 0
    r = _run("frames", "-T", "16", "-d", tmp_path / "data", "-j", "1")
    assert r.exit_code == 0, r.output
    sj = _sj_frames(tmp_path / "raw", tmp_path / "sj", 16, "number")
    store = tmp_path / "data" / "frames_T16_number.zarr"
    assert _compare_with_spikingjelly(store, sj) == 10
    n_events = np.concatenate([open_frame_store(store).split(s).n_events for s in ("train", "test")])
    assert 0 in n_events.tolist() and (n_events < 16).sum() >= 2


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """Synthetic release -> `dvsprep convert`, plus SpikingJelly's events_np of the same raw files."""
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    synth = pytest.importorskip("dvsprep.raw.synth")
    root = tmp_path_factory.mktemp("e2e")
    synth.write_release(root / "raw", users=2, test_users=1, seed=7, scale="small", jobs=1)
    r = _run("convert", root / "raw", "-o", root / "data")
    assert r.exit_code == 0, r.output
    (root / "sj" / "events_np").mkdir(parents=True)
    DVS128Gesture.create_raw_from_extracted(root / "raw", root / "sj" / "events_np")
    return root


@pytest.mark.parametrize("split_by", ["number", "time"])
def test_end_to_end_synthetic_release_matches_spikingjelly(synthetic_data, split_by):
    root = synthetic_data
    r = _run("frames", "-T", "16", "--split-by", split_by, "-d", root / "data", "-j", "2")
    assert r.exit_code == 0, r.output
    sj = _sj_frames(root / "raw", root / "sj", 16, split_by)
    n = len(sj)
    assert _compare_with_spikingjelly(root / "data" / f"frames_T16_{split_by}.zarr", sj) == n > 20


def _big_events(path: Path, n: int = 40, m: int = 60_000) -> None:
    rng = np.random.default_rng(7)
    w = EventsWriter(path)
    for split, k in (("train", n), ("test", 4)):
        lens = np.full(k, m)
        ev = {"t": np.sort(rng.integers(0, 1_000_000, k * m)).astype(np.int64),
              "x": rng.integers(0, 128, k * m).astype(np.uint8), "y": rng.integers(0, 128, k * m).astype(np.uint8),
              "p": rng.integers(0, 2, k * m).astype(np.uint8)}
        meta = {"label": np.arange(k) % 11, "row": np.arange(k), "t_start": np.zeros(k), "t_end": np.ones(k),
                "recording": ["user01_lab"] * k}
        w.append(split, ev, lens, meta)
    w.finish({"recordings": {}, "n_invalid_dropped": 0})


@pytest.fixture(scope="module")
def big_events(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    _big_events(root / "events.h5")
    return root / "events.h5"


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_with_two_jobs_prints_aborted_and_leaves_nothing(big_events, tmp_path, presses):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while -j 2 workers
    write: only "Aborted!", no temporary, no lock file; a second Ctrl-C during the clean-up too."""
    import shutil
    import signal
    import subprocess
    import sys

    from waits import wait_for_tree, wait_signal_taken

    shutil.copy(big_events, tmp_path / "events.h5")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", "from dvsprep.entry import dvsprep; dvsprep()", "frames", "-T", "256",
                             "-d", str(tmp_path), "-j", "2"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def writing() -> bool:
        """A frame shard (c/N/0/0/0/0) exists in the temporary; os.walk skips folders that vanish
        while it walks (the writer renames and removes as it goes)."""
        for tmp in tmp_path.glob(".frames_T256_number.zarr.tmp-*"):
            for folder, _, files in os.walk(tmp):
                parts = Path(folder).parts
                if len(parts) >= 5 and parts[-5] == "c" and parts[-3:] == ("0", "0", "0") and "0" in files:
                    return True
        return False

    try:
        # wait (on inotify, not a clock) until shards are being written
        assert wait_for_tree(tmp_path, writing, proc), proc.communicate()
        for _ in range(presses):
            os.killpg(proc.pid, signal.SIGINT)
            wait_signal_taken(proc.pid)     # the next press is a second press, not merged with this one
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:         # a failed wait must not leave a command running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1 and err == "\nAborted!\n" and out == "", (proc.returncode, out, err)  # click's words
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.h5"]
