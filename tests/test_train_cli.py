"""dvsg-train / dvsg-eval through click's CliRunner: output, one-line errors, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from dvsg_train.cli import eval_main, train_main

from train_fixtures import make_learnable_store
from previous_output import lay_previous, tree

TINY = ["-T", "4", "-b", "6", "--epochs", "1", "--channels", "4", "--device", "cpu", "-j", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_learnable_store(root / "frames_T4_number.zarr", T=4, n_train=12, n_test=11)
    res = CliRunner().invoke(train_main, ["--data", str(root), "--out-dir", str(root / "runs"), "-q", *TINY])
    return root, res


def test_train_prints_epoch_lines_and_summary(trained):
    root, res = trained
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("epoch = 0, train_loss =") and "max_test_acc =" in lines[0]
    assert "samples/s" in lines[0]
    assert any(l.startswith("max test acc ") and "final epoch (0) test acc" in l for l in lines)
    run = root / "runs" / "T4_b6_adam_lr0.001_c4"
    assert (run / "checkpoint_latest.pt").is_file() and (run / "checkpoint_max.pt").is_file()
    assert json.loads((run / "config.json").read_text())["data"] == str(root)


def error_line(res) -> str:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_train_errors_are_one_line(trained, tmp_path):
    root, _ = trained
    run = CliRunner().invoke
    out = ["--out-dir", str(tmp_path)]
    assert "no such frame store" in error_line(run(train_main, ["--data", str(tmp_path / "nope"), *out, *TINY]))
    msg = error_line(run(train_main, ["--data", str(root / "frames_T4_number.zarr"), *out, *TINY[2:], "-T", "8"]))
    assert "T=4" in msg and "-T 8" in msg
    msg = error_line(run(train_main, ["--data", str(root), *out, *TINY, "--cupy"]))
    assert "pip install 'dvsgesture-kit[cuda]'" in msg
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in error_line(
        run(train_main, ["--data", str(root), *out, *TINY, "--resume", str(bad)]))
    ckpt = root / "runs" / "T4_b6_adam_lr0.001_c4" / "checkpoint_latest.pt"
    msg = error_line(run(train_main, ["--data", str(root), *TINY[:-6], "--channels", "8",
                                      "--device", "cpu", "--resume", str(ckpt)]))
    assert msg.startswith(f"error: {ckpt}: ") and "--channels gives channels 8, the run has 4" in msg
    msg = error_line(run(train_main, ["--resume", str(ckpt), *out]))
    assert f"--out-dir name {tmp_path / ckpt.parent.name}, but the checkpoint's run is in {ckpt.parent}" in msg
    assert "no CUDA" in error_line(run(train_main, ["--data", str(root), *out, *TINY[:-4], "--device", "cuda"])) \
        or torch.cuda.is_available()


def test_usage_errors_exit_2(tmp_path):
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--opt", "rmsprop"])
    assert res.exit_code == 2
    assert CliRunner().invoke(train_main, ["-T", "4"]).exit_code == 2          # --data is required
    assert CliRunner().invoke(eval_main, ["--data", str(tmp_path)]).exit_code == 2


def test_debug_shows_traceback(tmp_path):
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path / "nope"), "--debug", *TINY])
    assert res.exit_code == 1 and res.exception is not None and "no such frame store" in str(res.exception)


def test_eval_prints_accuracy_confusion_and_png(trained, tmp_path):
    root, _ = trained
    ckpt = root / "runs" / "T4_b6_adam_lr0.001_c4" / "checkpoint_max.pt"
    png = tmp_path / "conf.png"
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu",
                                         "--png", str(png)])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output.splitlines()[0] and "/11)" in res.output.splitlines()[0]
    assert "per-class accuracy:" in res.output and "hand_clapping" in res.output
    assert "confusion matrix (rows: true class, columns: predicted):" in res.output
    rows = res.output.split("columns: predicted):\n")[1].splitlines()[1:12]
    assert sum(int(v) for r in rows for v in r.split()[1:]) == 11   # every test sample counted once
    assert png.read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(tmp_path / "none.pt"), "--data", str(root)])
    assert "no such checkpoint" in error_line(res)
    make_learnable_store(tmp_path / "frames_T2_number.zarr", T=2, n_train=11, n_test=11)
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(tmp_path / "frames_T2_number.zarr")])
    assert "T=2" in error_line(res)


def test_python_dash_m_runs_dvsg_train():
    res = subprocess.run([sys.executable, "-m", "dvsg_train", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--cupy" in res.stdout and "Usage: dvsg-train" in res.stdout


def test_store_is_verified_before_training(trained, tmp_path):
    import shutil

    from dvsprep.frames.store import open_frame_store

    root, _ = trained
    store = root / "frames_T4_number.zarr"
    fp = open_frame_store(store).fingerprint
    out = tmp_path / "runs"
    res = CliRunner().invoke(train_main, ["--data", str(store), "--out-dir", str(out), *TINY,
                                          "--data-fingerprint", "0123456789ab"])
    msg = error_line(res)
    assert "fingerprint" in msg and fp[:16] in msg and "0123456789ab" in msg
    assert not out.exists()                                     # refused before anything was written
    assert "12 to 64 hex digits" in error_line(CliRunner().invoke(
        train_main, ["--data", str(store), "--out-dir", str(out), *TINY, "--data-fingerprint", "xyz"]))
    # one flipped byte in a shard: found before the first epoch
    bad = tmp_path / "frames_T4_number.zarr"
    shutil.copytree(store, bad)
    shard = next(p for p in sorted((bad / "train" / "frames").rglob("*")) if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    msg = error_line(CliRunner().invoke(train_main, ["--data", str(bad), "--out-dir", str(out), *TINY]))
    assert "NOT intact: 1 corrupt" in msg and "train/frames" in msg and str(bad) in msg
    assert not out.exists()
    # both refusals over a run that --force would start over: it stays byte for byte
    for name in ("checkpoint_latest.pt", "checkpoint_max.pt", "metrics.jsonl", "config.json"):
        lay_previous(out / "r" / name)
    before = tree(out)
    for data, more in ((store, ["--data-fingerprint", "0123456789ab"]), (bad, [])):
        msg = error_line(CliRunner().invoke(train_main, ["--data", str(data), "--out-dir", str(out), *TINY, *more,
                                                         "--run-name", "r", "--force"]))
        assert ("fingerprint" if more else "NOT intact") in msg
    assert tree(out) == before


def test_eval_checks_the_png_location_before_the_work(trained, tmp_path, monkeypatch):
    root, _ = trained
    ckpt = root / "runs" / "T4_b6_adam_lr0.001_c4" / "checkpoint_max.pt"
    monkeypatch.chdir(tmp_path)
    import dvsg_train.engine as engine

    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --png"))
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(root), "--device", "cpu",
                                         "--png", "nodir/c.png"])
    assert error_line(res) == "error: nodir/c.png: no such directory nodir"
    (tmp_path / "adir").mkdir()
    assert error_line(CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data", str(root),
                                                     "--png", "adir"])) == "error: adir: is a directory, not a file to write"
    assert not list(tmp_path.rglob(".*tmp*"))


def test_eval_on_a_store_of_another_T_says_what_it_needs(trained, tmp_path):
    root, _ = trained
    ckpt = root / "runs" / "T4_b6_adam_lr0.001_c4" / "checkpoint_max.pt"
    make_learnable_store(tmp_path / "frames_T2_number.zarr", T=2, n_train=11, n_test=11)
    msg = error_line(CliRunner().invoke(eval_main, ["--checkpoint", str(ckpt), "--data",
                                                    str(tmp_path / "frames_T2_number.zarr")]))
    assert "store has T=2" in msg and f"{ckpt} was trained with T=4" in msg and "dvsprep frames -T 4" in msg
    assert "pass -T" not in msg


def test_lr_scheduler_help_is_lowercase():
    out = CliRunner().invoke(train_main, ["--help"], terminal_width=200).output
    line = " ".join(out.split("--lr-scheduler", 1)[1].split("--step-size")[0].split())
    assert line == "[cosalr|steplr|none] [default: cosalr]"


def test_eval_into_a_closed_pipe_is_quiet(trained, tmp_path):
    """`dvsg-eval ... | head -1`: no `error: Broken pipe`, no traceback."""
    root, _ = trained
    ckpt = root / "runs" / "T4_b6_adam_lr0.001_c4" / "checkpoint_latest.pt"
    cmd = [sys.executable, "-c", "from dvsg_train.cli import eval_main; eval_main()", "--checkpoint", str(ckpt),
           "--data", str(root), "--device", "cpu", "--png", str(tmp_path / "c.png")]
    # a pipe whose reader takes one line and goes away, as `| head -1` does
    res = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" | head -c 10 >/dev/null', "_", *cmd],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr == ""
