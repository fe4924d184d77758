"""Newcomer friction (issue 19, item 8), tried as a new user would: what the commands say on a
synthetic release, a mistyped --data, a URL, a packed store, and a checkpoint of another T."""
from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from dvsprep.cli import main
from dvsprep.raw import synth
from dvsg_train.cli import eval_main, train_main

from hostile_fixtures import tiny_store
from train_fixtures import make_learnable_store

SEED = 5


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("newcomer") / "raw"
    synth.write_release(out, users=2, test_users=1, seed=SEED, jobs=1)
    return out


def _verify(path: Path):
    return CliRunner().invoke(main, ["verify", str(path)])


def test_verify_of_the_synthetic_release_is_intact_and_still_catches_a_changed_byte(release, tmp_path):
    # 5 recordings per user, each an .aedat and a labels csv, plus two trial lists, the gesture
    # mapping and README.txt: 24 files, none of them the published release's
    res = _verify(release)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == \
        f"{release}: synthetic release (dvsprep synth, seed {SEED}): intact: 24 files match"
    record = json.loads((release / "DvsGesture" / synth.SYNTH_RECORD).read_text())
    assert (record["seed"], record["scale"], record["users"], record["test_users"]) == (SEED, "small", 2, 1)
    assert len(record["md5"]) == 24 and "README.txt" in record["md5"]
    # the same release as a tar.gz
    tgz = tmp_path / "DvsGesture.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(release / "DvsGesture", arcname="DvsGesture")
    res = _verify(tgz)
    assert res.exit_code == 0 and f"seed {SEED}): intact: 24 files match" in res.output, res.output
    # a changed byte, a removed file and an added one
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    rel = copy / "DvsGesture"
    aedat = rel / "user01_lab.aedat"
    data = bytearray(aedat.read_bytes())
    data[len(data) // 2] ^= 1
    aedat.write_bytes(bytes(data))
    (rel / "user02_led_labels.csv").unlink()
    (rel / "notes.txt").write_text("mine")
    res = _verify(copy)
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert lines[0] == f"{copy}: synthetic release (dvsprep synth, seed {SEED}): NOT intact: 1 missing, 1 extra, " \
                       f"1 mismatch (of 24 files)"
    assert lines[1] == f"  missing  user02_led_labels.csv: written by dvsprep synth, listed in {synth.SYNTH_RECORD}"
    assert lines[2] == f"  extra    notes.txt: not written by dvsprep synth (not in {synth.SYNTH_RECORD})"
    assert lines[3].startswith("  mismatch user01_lab.aedat: md5 ")
    # a record that is not one
    (rel / synth.SYNTH_RECORD).write_text("{}")
    res = _verify(copy)
    assert res.exit_code == 1 and "invalid  SYNTHETIC.json: not a record of dvsprep synth" in res.output


def test_a_mistyped_data_is_said_before_an_existing_run(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "checkpoint_latest.pt").write_bytes(b"a previous run")
    missing = tmp_path / "frames_T4_numbr.zarr"
    base = ["--data", str(missing), "--out-dir", str(tmp_path / "runs"), "-T", "4", "--device", "cpu", "-q"]
    res = CliRunner().invoke(train_main, [*base, "--run-name", "r"])
    assert res.exit_code == 1 and res.stderr == f"error: {missing}: no such frame store\n", res.output
    (tmp_path / "runs" / "r_seed0").mkdir()
    (tmp_path / "runs" / "r_seed0" / "checkpoint_latest.pt").write_bytes(b"a previous run")
    res = CliRunner().invoke(train_main, [*base, "--run-name", "r", "--seeds", "0,1"])
    assert res.exit_code == 1 and res.stderr == f"error: {missing}: no such frame store\n", res.output


def test_info_of_a_url_heads_with_the_url(store_server, tmp_path):
    url_base, served = store_server
    tiny_store(served / "info_T2.zarr")
    url = f"{url_base}/info_T2.zarr/"
    res = CliRunner().invoke(main, ["info", url])
    assert res.exit_code == 0, res.output
    first, second = res.output.splitlines()[:2]
    assert first == f"{url}: frame store (dvsprep-frames/1)"
    assert second.startswith("  cached at ") and "info_T2.zarr" in second


def test_pack_unpack_and_verify_count_the_same_files(tmp_path):
    store = tmp_path / "s.zarr"
    tiny_store(store)
    listed = len(json.loads((store / "manifest.json").read_text())["files"])
    res = CliRunner().invoke(main, ["pack", str(store), "-o", str(tmp_path / "s.zip")])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith(
        f"{tmp_path / 's.zip'}: {listed} files match the manifest ({listed + 1} zip members with manifest.json), ")
    res = CliRunner().invoke(main, ["unpack", str(tmp_path / "s.zip"), "-o", str(tmp_path / "u.zarr")])
    assert res.output.startswith(f"{tmp_path / 'u.zarr'}: {listed} files match the manifest ({listed + 1} files with ")
    for path in (store, tmp_path / "s.zip", tmp_path / "u.zarr"):
        said = re.search(r"intact: (\d+) files match", _verify(path).output)
        assert said and int(said.group(1)) == listed


def test_a_checkpoint_of_another_T_suggests_a_store_not_an_option(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    tiny_store(tmp_path / "frames_T2_number.zarr")          # T=2: what the checkpoint learns on
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path / "frames_T2_number.zarr"), "--out-dir",
                                          str(tmp_path / "runs"), "--run-name", "r", "-T", "2", "-b", "2",
                                          "--epochs", "1", "--channels", "4", "--device", "cpu", "-j", "0", "-q"])
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "runs" / "r" / "checkpoint_latest.pt"
    make_learnable_store(root / "frames_T4_number.zarr", T=4, n_train=2, n_test=2)
    png = ["--png", str(tmp_path / "c.png"), "--device", "cpu"]
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(root), *png])
    assert res.exit_code == 1 and res.stderr == (
        f"error: {root}: no frames_T2_number.zarr for T=2, what {ckpt} was trained with (it holds "
        f"frames_T4_number.zarr; make one with dvsprep frames -T 2 -d {root}, or pass the store path)\n")
    store = root / "frames_T4_number.zarr"
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(store), *png])
    assert res.exit_code == 1 and res.stderr == (
        f"error: {store}: store has T=4 frames per sample, but {ckpt} was trained with T=2; evaluate it on a "
        f"store made with dvsprep frames -T 2\n")
    assert "pass -T" not in res.stderr


def test_forecast_from_the_first_batches_with_an_injected_clock(caplog):
    import logging

    import torch

    from dvsg_train.engine import RunForecast, duration_text

    ticks = iter([100.0, 102.5, 105.0, 107.5, 110.0, 112.5])   # after batches 1..6: 12.5 s for 5 batches
    f = RunForecast(256, 67, torch.device("cpu"), clock=lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="dvsg_train"):
        for step in range(67):
            f(step)                               # the clock is read 6 times, or next() raises
    # 256 x 67 x 2.5 s = 42,880 s
    line = "projected time: about 11.9 h for 256 epochs of 67 batches (2.50 s per batch over batches 2-6; " \
           "evaluation comes on top)"
    assert f.said == line and [r.getMessage() for r in caplog.records] == [line]
    ticks = iter([0.0, 3.0])
    f = RunForecast(1, 2, torch.device("cpu"), clock=lambda: next(ticks))   # two batches: times the second
    f(0), f(1)
    assert f.said == "projected time: about 6 s for 1 epoch of 2 batches (3.00 s per batch over batches 2-2; " \
                     "evaluation comes on top)"
    ticks = iter([0.0, 45.0])                     # a slow batch: said after it, not after 5 more
    f = RunForecast(256, 13, torch.device("cpu"), clock=lambda: next(ticks))
    for step in range(13):
        f(step)
    assert f.said == "projected time: about 41.6 h for 256 epochs of 13 batches (45.00 s per batch over " \
                     "batches 2-2; evaluation comes on top)"
    f = RunForecast(9, 1, torch.device("cpu"), clock=lambda: pytest.fail("no second batch to time"))
    f(0)
    assert f.said is None
    assert [duration_text(s) for s in (42, 750, 32_760, 276_480)] == ["42 s", "12.5 min", "9.1 h", "3.2 days"]


def test_training_says_the_forecast_once_after_the_first_batches(tmp_path, caplog):
    import logging

    tiny_store(tmp_path / "s.zarr")                 # 6 train samples: 3 batches of 2
    with caplog.at_level(logging.INFO, logger="dvsg_train"):
        res = CliRunner().invoke(train_main, ["--data", str(tmp_path / "s.zarr"), "--out-dir", str(tmp_path / "runs"),
                                              "-T", "2", "-b", "2", "--epochs", "2", "--channels", "4", "--device",
                                              "cpu", "-j", "0"])
    assert res.exit_code == 0, res.output
    said = [r.getMessage() for r in caplog.records if "projected time" in r.getMessage()]
    assert len(said) == 1 and re.fullmatch(r"projected time: about \S+ (s|min) for 2 epochs of 3 batches "
                                           r"\(\d+\.\d\d s per batch over batches 2-3; evaluation comes on top\)",
                                           said[0]), said
