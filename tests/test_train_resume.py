"""--resume continues a run in its own folder with its saved settings, exactly, and never
touches another run; a run folder is locked while a run trains in it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from dvsg_train.checkpoint import load_checkpoint
from dvsg_train.cli import train_main
from dvsprep.atomic import output_lock

from train_fixtures import make_learnable_store

TINY = ["-T", "4", "-b", "6", "--channels", "4", "--device", "cpu", "-j", "0"]
TIMING = ("epoch_seconds", "train_samples_per_s")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "frames_T4_number.zarr"
    make_learnable_store(path, T=4, n_train=24, n_test=11, seed=3)
    return path


def train(*args) -> str:
    res = CliRunner().invoke(train_main, [*args, "-q"])
    assert res.exit_code == 0, res.output
    return res.output


def error_line(res) -> str:
    assert res.exit_code == 1, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same(a, b) -> bool:
    """Equal nested checkpoint content (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_never_touches_another_run(store, tmp_path, monkeypatch):
    """The issue's case: A (default name), B (--run-name B), then --resume B's checkpoint with
    A-like options: B continues in logs/B, A's files stay byte-identical."""
    monkeypatch.chdir(tmp_path)
    train("--data", str(store), *TINY, "--epochs", "2")
    train("--data", str(store), *TINY, "--epochs", "2", "--run-name", "B")
    a = tmp_path / "logs" / "T4_b6_adam_lr0.001_c4"
    b = tmp_path / "logs" / "B"
    before = snapshot(a)
    assert "checkpoint_latest.pt" in before and "metrics.jsonl" in before
    assert load_checkpoint(a / "checkpoint_latest.pt")["run"] == {
        "id": json.loads((a / "config.json").read_text())["run_id"], "name": a.name, "dir": str(a)}
    out = train("--data", str(store), *TINY, "--epochs", "3", "--resume", "logs/B/checkpoint_latest.pt")
    assert f"run: {b}" in out
    assert snapshot(a) == before
    assert [json.loads(l)["epoch"] for l in (b / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    ckpt = load_checkpoint(b / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 2 and ckpt["run"]["name"] == "B" and ckpt["run"]["dir"] == str(b)
    assert json.loads((b / "config.json").read_text())["run_id"] == ckpt["run"]["id"]
    assert json.loads((a / "config.json").read_text())["run_id"] != ckpt["run"]["id"]
    # B's checkpoint copied into A's folder: refused, nothing of A changes
    shutil.copy(b / "checkpoint_latest.pt", a / "stray.pt")
    before = snapshot(a)
    msg = error_line(CliRunner().invoke(train_main, ["--resume", str(a / "stray.pt"), "--epochs", "4"]))
    assert f"{a} holds another run" in msg
    assert snapshot(a) == before
    # a moved (copied) run folder continues where it is now, the original stays as it was
    c = tmp_path / "elsewhere" / "C"
    shutil.copytree(b, c)
    b_before = snapshot(b)
    train("--resume", str(c / "checkpoint_latest.pt"), "--epochs", "4")
    assert snapshot(b) == b_before
    assert load_checkpoint(c / "checkpoint_latest.pt")["run"]["dir"] == str(c)
    assert len((c / "metrics.jsonl").read_text().splitlines()) == 4


# name -> options of a run whose bare resume must reproduce the uninterrupted run bit for bit
EXACT = {
    # 2 channels: fp16 convolutions are slow on a CPU (8 channels took 19 s), and the scaler's
    # state (scale, growth tracker) is saved and restored whatever the width
    "fp16 GradScaler": ["--amp", "--amp-dtype", "fp16", "--T-max", "3", "--lr", "0.05", "--channels", "2"],
    "StepLR": ["--lr-scheduler", "steplr", "--step-size", "1", "--gamma", "0.5", "--lr", "0.05"],
    "SGD momentum": ["--opt", "sgd", "--momentum", "0.9", "--lr", "0.1", "--T-max", "3"],
    "val-fraction": ["--val-fraction", "0.25", "--T-max", "3", "--lr", "0.05"],
    # every random draw of the recipe (mirror, geometry, thinning, cutout, mixup) comes from the
    # generator of (seed, epoch, rank, step), which a resumed run rebuilds
    "augment": ["--augment", "mirror,translate=4,rotate=10,drop=0.2,cutout=16,mixup=0.5,smooth=0.1",
                "--T-max", "3", "--lr", "0.05"],
}


@pytest.mark.parametrize("case", EXACT)
def test_bare_resume_reproduces_the_uninterrupted_run(store, tmp_path, case):
    opts = [*TINY, "--channels", "8", *EXACT[case], "--out-dir", str(tmp_path)]
    train("--data", str(store), *opts, "--epochs", "3", "--run-name", "straight")
    train("--data", str(store), *opts, "--epochs", "2", "--run-name", "cut")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoint_latest.pt")
    # a bare resume: the checkpoint knows its store and settings
    train("--resume", str(tmp_path / "cut" / "checkpoint_latest.pt"), "--epochs", "3")
    want = load_checkpoint(tmp_path / "straight" / "checkpoint_latest.pt")
    got = load_checkpoint(tmp_path / "cut" / "checkpoint_latest.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "rng"):
        assert same(got[key], want[key]), key
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING} for r in h]
    assert strip(got["history"]) == strip(want["history"]) and len(got["history"]) == 3
    assert not same(got["model"], cut["model"]) and not same(got["optimizer"], cut["optimizer"])
    if case == "fp16 GradScaler":
        assert want["scaler"] is not None and want["scaler"]["scale"] > 0
    if case == "augment":
        assert got["config"]["augment"] == want["config"]["augment"] == EXACT[case][1]
    if case == "StepLR":
        assert [r["lr"] for r in got["history"]] == [0.05, 0.025, 0.0125]
    if case == "SGD momentum":
        assert all("momentum_buffer" in s for s in got["optimizer"]["state"].values())
    if case == "val-fraction":
        assert all(r["val_acc"] is not None for r in got["history"])
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


@pytest.fixture(scope="module")
def one_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    train("--data", str(store), *TINY, "--epochs", "1", "--out-dir", str(out), "--run-name", "R")
    return out / "R" / "checkpoint_latest.pt"


def test_resume_options_that_conflict_are_refused(one_run, tmp_path):
    ckpt = str(one_run)
    run = lambda *a: CliRunner().invoke(train_main, ["--resume", ckpt, *a])
    before = snapshot(one_run.parent)
    msg = error_line(run("--lr", "0.5"))
    assert msg.startswith(f"error: {ckpt}: --lr gives lr 0.5, the run has 0.001")
    msg = error_line(run("-T", "8", "--opt", "sgd"))
    assert "-T gives T 8, the run has 4" in msg and "--opt gives opt 'sgd', the run has 'adam'" in msg
    assert "--preset seed (the run used no preset)" in error_line(run("--preset", "seed"))
    assert "--run-name name" in error_line(run("--run-name", "other"))
    assert "-b gives global_batch_size 12, the run has 6" in error_line(run("-b", "12"))
    res = run("--force")
    assert res.exit_code == 2 and "--force" in res.output
    # a store with other content: the fingerprint differs
    other = tmp_path / "frames_T4_number.zarr"
    make_learnable_store(other, T=4, n_train=24, n_test=11, seed=4)
    assert "fingerprint" in error_line(run("--data", str(other), "--epochs", "2"))
    assert snapshot(one_run.parent) == before
    res = CliRunner().invoke(train_main, ["-T", "4"])
    assert res.exit_code == 2 and "Missing option '--data'" in res.output


def test_resume_accepts_options_that_keep_the_numbers(one_run, store, tmp_path):
    copy = tmp_path / "R"
    shutil.copytree(one_run.parent, copy)
    # the store at another path (same fingerprint), and the options that do not change the numbers
    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    train("--resume", str(copy / "checkpoint_latest.pt"), "--data", str(moved), "--epochs", "2", "--device", "cpu",
          "-j", "0", "--preload", "none", "--threads", "1", "-T", "4", "--lr", "0.001", "--run-name", "R",
          "--out-dir", str(tmp_path))
    ckpt = load_checkpoint(copy / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["data"] == str(moved) and ckpt["config"]["preload"] == "none"


def test_run_folder_is_locked_while_training(one_run, store, tmp_path):
    copy = tmp_path / "R"
    shutil.copytree(one_run.parent, copy)
    before = snapshot(copy)
    with output_lock(copy, "training run"):
        msg = error_line(CliRunner().invoke(train_main, ["--resume", str(copy / "checkpoint_latest.pt"),
                                                         "--epochs", "2"]))
        assert msg == f"error: {copy}: training run is being written by another process (pid {__import__('os').getpid()}); wait for it to finish"
        msg = error_line(CliRunner().invoke(train_main, ["--data", str(store), *TINY, "--epochs", "1",
                                                         "--out-dir", str(tmp_path), "--run-name", "R", "--force"]))
        assert f"{copy}: training run is being written by another process" in msg
    assert snapshot(copy) == before
    train("--resume", str(copy / "checkpoint_latest.pt"), "--epochs", "2")     # free again
    assert not (tmp_path / ".R.lock").exists()


def test_resume_under_torchrun_splits_the_saved_global_batch(one_run):
    from dvsg_train.checkpoint import resume_config
    from dvsg_train.errors import ConfigMismatchError

    cfg = resume_config(one_run, {}, world_size=2)
    assert (cfg.batch_size, cfg.world_size, cfg.out_dir, cfg.run_name) == (3, 1, str(one_run.parent.parent), "R")
    with pytest.raises(ConfigMismatchError, match="the run's global batch of 6 does not split over 4 processes"):
        resume_config(one_run, {}, world_size=4)
    assert resume_config(one_run, {"batch_size": 2}, world_size=3).batch_size == 2
