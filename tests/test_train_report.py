"""dvsg-report (runs compared from hand-written run folders), dvsg-train --seeds, and the
dead-network warning."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dvsg_train.cli import MAX_SEED, _parse_seeds, report_main, train_main
from dvsg_train.compare import groups, mean_std, read_runs

from train_fixtures import make_learnable_store
from previous_output import tree


def config(**kw) -> dict:
    """What dvsg-train writes into config.json (the keys that matter here, plus the per-run ones)."""
    base = {"T": 4, "batch_size": 6, "channels": 8, "epochs": 3, "lr": 0.01, "opt": "adam", "seed": 0,
            "val_fraction": 0.0, "data": "/somewhere/frames_T4_number.zarr", "data_fingerprint": "ab" * 32,
            "out_dir": "logs", "run_name": None, "workers": 0, "progress": False, "force": False,
            "resume": None, "preload": "auto"}
    base.update(kw)
    return base


def record(epoch: int, test_acc: float, seconds: float = 1.0, val_acc: float | None = None,
           loss: float = 0.08) -> dict:
    return {"epoch": epoch, "lr": 0.01, "train_loss": loss, "train_acc": 0.5, "val_loss": None if val_acc is None else loss,
            "val_acc": val_acc, "test_loss": loss, "test_acc": test_acc, "max_test_acc": test_acc,
            "epoch_seconds": seconds, "train_samples_per_s": 10.0}


def write_run(folder: Path, cfg: dict, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**cfg, "run_id": folder.name * 2, "run_dir": str(folder)},
                                                   indent=2))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture
def runs(tmp_path):
    """Three seeds of lr 0.01 and one run of lr 0.02 (2 of its 3 epochs done)."""
    return [
        write_run(tmp_path / "a_seed0", config(seed=0), [record(0, 0.2, 2.0), record(1, 0.5, 3.0), record(2, 0.4, 4.0)]),
        write_run(tmp_path / "a_seed1", config(seed=1), [record(0, 0.3), record(1, 0.6), record(2, 0.6)]),
        write_run(tmp_path / "a_seed2", config(seed=2), [record(0, 0.1), record(1, 0.7), record(2, 0.5)]),
        write_run(tmp_path / "b", config(lr=0.02), [record(0, 0.25, 5.0), record(1, 0.75, 6.0)]),
    ]


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def test_report_table_and_mean_std_over_seeds(runs, monkeypatch):
    monkeypatch.chdir(runs[0].parent)
    res = CliRunner().invoke(report_main, ["a_seed0", "a_seed1", "a_seed2", "b"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    # only the settings that differ: lr and seed (not run_id, run_dir, data path, ...)
    assert cells(lines[0]) == ["run", "lr", "seed", "epochs", "max test", "final test", "s/epoch"]
    assert cells(lines[2]) == ["a_seed0", "0.01", "0", "3", "0.5000", "0.4000", "3.0"]
    assert cells(lines[3]) == ["a_seed1", "0.01", "1", "3", "0.6000", "0.6000", "1.0"]
    assert cells(lines[4]) == ["a_seed2", "0.01", "2", "3", "0.7000", "0.5000", "1.0"]
    assert cells(lines[5]) == ["b", "0.02", "0", "2/3", "0.7500", "0.7500", "5.5"]
    assert lines[6] == "" and lines[7] == "over seeds (mean +- sample std):"
    assert cells(lines[8]) == ["runs", "seeds", "max test", "final test"]
    # by hand: max 0.5, 0.6, 0.7 -> mean 0.6, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1;
    # final 0.4, 0.6, 0.5 -> mean 0.5, std sqrt((0.01 + 0.01 + 0) / 2) = 0.1
    assert cells(lines[10]) == ["lr=0.01 (n=3)", "0,1,2", "0.6000 +- 0.1000", "0.5000 +- 0.1000"]
    assert cells(lines[11]) == ["lr=0.02 (n=1)", "0", "0.7500 (n=1, no std)", "0.7500 (n=1, no std)"]
    assert len(lines) == 12


def test_an_empty_setting_is_shown_as_none(tmp_path, monkeypatch):
    # dvsg-train writes augment "" for no augmentation: a group label `augment=` read as cut off
    write_run(tmp_path / "plain", config(augment=""), [record(0, 0.2)])
    write_run(tmp_path / "aug", config(augment="mirror"), [record(0, 0.4)])
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(report_main, ["plain", "aug"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert cells(lines[0]) == ["run", "augment", "epochs", "max test", "final test", "s/epoch"]
    assert cells(lines[2]) == ["plain", "none", "1/3", "0.2000", "0.2000", "1.0"]
    assert cells(lines[8]) == ["augment=none (n=1)", "0", "0.2000 (n=1, no std)", "0.2000 (n=1, no std)"]
    assert cells(lines[9]) == ["augment=mirror (n=1)", "0", "0.4000 (n=1, no std)", "0.4000 (n=1, no std)"]


def test_mean_std_and_groups_by_hand(runs):
    mean, std = mean_std([0.5, 0.625, 0.875])
    assert mean == pytest.approx(2 / 3) and std == pytest.approx(((1 / 6) ** 2 + (1 / 24) ** 2 + (5 / 24) ** 2) ** 0.5
                                                                  / 2 ** 0.5)
    assert mean_std([0.4]) == (0.4, None)
    parsed = read_runs(runs)
    assert [[r.path for r in g] for g in groups(parsed)] == [[str(p) for p in runs[:3]], [str(runs[3])]]


def test_report_with_validation_gives_the_test_acc_at_the_best_val_epoch(tmp_path):
    a = write_run(tmp_path / "v0", config(val_fraction=0.1, seed=0),
                  [record(0, 0.2, val_acc=0.3), record(1, 0.5, val_acc=0.9), record(2, 0.7, val_acc=0.9)])
    b = write_run(tmp_path / "v1", config(val_fraction=0.1, seed=1),
                  [record(0, 0.4, val_acc=0.8), record(1, 0.3, val_acc=0.6), record(2, 0.6, val_acc=0.7)])
    res = CliRunner().invoke(report_main, [str(a), str(b)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert cells(lines[0]) == ["run", "seed", "epochs", "max test", "final test", "best val", "test at best val",
                               "s/epoch"]
    # the first epoch with the best val acc (what checkpoint_max.pt holds): epoch 1, not 2
    assert cells(lines[2])[1:] == ["0", "3", "0.7000", "0.7000", "0.9000 (epoch 1)", "0.5000", "1.0"]
    assert cells(lines[3])[1:] == ["1", "3", "0.6000", "0.6000", "0.8000 (epoch 0)", "0.4000", "1.0"]
    # test at best val 0.5, 0.4 -> mean 0.45, std sqrt(2 * 0.05**2) = 0.0707
    assert cells(lines[-1]) == ["all runs (n=2)", "0,1", "0.6500 +- 0.0707", "0.6500 +- 0.0707", "0.4500 +- 0.0707"]


def error_line(res) -> str:
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "config.json").unlink(), "config.json: no such file"),
    (lambda d: (d / "metrics.jsonl").unlink(), "metrics.jsonl: no such file"),
    (lambda d: (d / "config.json").write_text('{"seed": 0'), "config.json: corrupt run config: not JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: corrupt run config: not a JSON object"),
    (lambda d: (d / "config.json").write_text("[" * 100000), "config.json: corrupt run config: not JSON"),
    (lambda d: (d / "config.json").write_bytes(b'{"seed": "\xff"}'), "config.json: corrupt run config: not UTF-8"),
    (lambda d: (d / "metrics.jsonl").write_text(json.dumps(record(0, 0.2)) + "\n{oops\n"),
     "metrics.jsonl: line 2: corrupt metrics: not JSON"),
    (lambda d: (d / "metrics.jsonl").write_text(json.dumps(record(0, 1.5)) + "\n"),
     "metrics.jsonl: line 1: corrupt metrics: test_acc 1.5 outside [0, 1]"),
    (lambda d: (d / "metrics.jsonl").write_text(json.dumps(record(1, 0.5)) + "\n"),
     "metrics.jsonl: line 1: corrupt metrics: epoch 1, expected 0"),
    (lambda d: (d / "metrics.jsonl").write_text(json.dumps({**record(0, 0.5), "test_acc": "high"}) + "\n"),
     "metrics.jsonl: line 1: corrupt metrics: test_acc is 'high', not a number"),
    (lambda d: (d / "metrics.jsonl").write_text(""), "metrics.jsonl: no finished epoch"),
    (lambda d: (d / "metrics.jsonl").write_text(json.dumps(record(0, 0.2, val_acc=0.5)) + "\n"
                                                 + json.dumps(record(1, 0.2)) + "\n"),
     "metrics.jsonl: line 2: corrupt metrics: validation accuracy in some epochs only"),
])
def test_a_missing_or_corrupt_run_file_is_one_line_and_nothing_is_written(runs, damage, expected):
    bad = runs[1]
    damage(bad)
    png = runs[0].parent / "report.png"
    res = CliRunner().invoke(report_main, [*map(str, runs), "-o", str(png)])
    msg = error_line(res)
    assert msg.startswith(f"error: {bad}/") and expected in msg, msg
    assert not png.exists() and not list(runs[0].parent.glob(".report.png*"))


def test_report_refuses_bad_folders(runs, tmp_path):
    import os

    run = CliRunner().invoke
    (runs[2] / "metrics.jsonl").unlink()
    os.mkfifo(runs[2] / "metrics.jsonl")           # would block a reader that opened it
    assert error_line(run(report_main, [str(runs[2])])) == \
        f"error: {runs[2] / 'metrics.jsonl'}: not a regular file, not the run's metrics"
    assert error_line(run(report_main, [str(tmp_path / "nope")])) == f"error: {tmp_path / 'nope'}: no such run folder"
    msg = error_line(run(report_main, [str(runs[0]), str(runs[0]) + "/"]))
    assert "the same run folder" in msg and "given twice" in msg
    assert run(report_main, []).exit_code == 2


def test_report_png_is_published_and_refuses_run_files(runs, tmp_path):
    png = runs[0] / "report.png"                   # inside a run folder: fine
    res = CliRunner().invoke(report_main, [*map(str, runs), "-o", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:4] == b"\x89PNG" and res.output.splitlines()[-1] == f"curves written to {png}"
    assert "already exists" in error_line(CliRunner().invoke(report_main, [str(runs[0]), "-o", str(png)]))
    assert CliRunner().invoke(report_main, [str(runs[0]), "-o", str(png), "--force"]).exit_code == 0
    # never onto a run's own files, --force or not
    before = (runs[1] / "metrics.jsonl").read_bytes()
    for name in ("metrics.jsonl", "config.json", "checkpoint_max.pt"):
        msg = error_line(CliRunner().invoke(report_main, [*map(str, runs), "-o", str(runs[1] / name), "--force"]))
        assert "own input" in msg, msg
    assert (runs[1] / "metrics.jsonl").read_bytes() == before
    assert error_line(CliRunner().invoke(report_main, [str(runs[0]), "-o", str(tmp_path / "no" / "r.png")])) \
        == f"error: {tmp_path / 'no' / 'r.png'}: no such directory {tmp_path / 'no'}"


# --- dvsg-train --seeds ----------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("", "holds an empty seed"), ("0,,1", "holds an empty seed"), ("0,", "holds an empty seed"),
    ("a", "'a' is not an integer"), ("1.5", "'1.5' is not an integer"), ("0x1", "'0x1' is not an integer"),
    ("-1", "seed -1 is negative"), ("0,1,0", "seed 0 is given twice"), ("1, 01", "seed 1 is given twice"),
    (str(2**64), f"seed {2**64} does not fit in 64 bits"),
])
def test_seeds_usage_errors(value, expected, tmp_path):
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--seeds", value])
    assert res.exit_code == 2 and expected in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "'--seeds'" in errors[0]


def test_seeds_parse():
    assert _parse_seeds(None, None, " 2, 0 ,1") == [2, 0, 1]
    assert _parse_seeds(None, None, f"0,{MAX_SEED}") == [0, 2**64 - 1]
    assert _parse_seeds(None, None, None) is None


def test_seeds_exclude_seed_and_resume(tmp_path):
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--seeds", "0,1", "--seed", "0"])
    assert res.exit_code == 2 and "cannot be combined with --seed" in res.output
    res = CliRunner().invoke(train_main, ["--seeds", "0,1", "--resume", str(tmp_path / "c.pt")])
    assert res.exit_code == 2 and "cannot be combined with --seeds" in res.output
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--seeds", "0,1"], env={"WORLD_SIZE": "2"})
    assert res.exit_code == 2 and "under torchrun" in res.output


TINY = ["-T", "4", "-b", "6", "--epochs", "1", "--channels", "4", "--device", "cpu", "-j", "0", "-q"]


def test_seeds_train_sibling_runs_and_print_the_report(tmp_path):
    make_learnable_store(tmp_path / "frames_T4_number.zarr", T=4, n_train=12, n_test=11)
    out = tmp_path / "runs"
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--out-dir", str(out), *TINY,
                                          "--seeds", f"3,{MAX_SEED}"])
    assert res.exit_code == 0, res.output
    names = ["T4_b6_adam_lr0.001_c4_seed3", f"T4_b6_adam_lr0.001_c4_seed{MAX_SEED}"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(names)
    for name, seed in zip(names, (3, MAX_SEED)):
        cfg = json.loads((out / name / "config.json").read_text())
        assert (cfg["seed"], cfg["run_name"]) == (seed, name)
        assert (out / name / "checkpoint_latest.pt").is_file()
    lines = res.output.splitlines()
    assert lines[0] == f"seed 3 (run 1 of 2): {out / names[0]}"
    assert f"seed {MAX_SEED} (run 2 of 2): {out / names[1]}" in lines
    # the report of the two runs ends the output: the seed is what differs, one group of 2
    table = lines[lines.index("") + 1:]
    assert cells(table[0]) == ["run", "seed", "epochs", "max test", "final test", "s/epoch"]
    assert [cells(t)[:3] for t in table[2:4]] == [[str(out / names[0]), "3", "1"],
                                                  [str(out / names[1]), str(MAX_SEED), "1"]]
    assert table[-1].startswith("all runs (n=2)") and "+-" in table[-1]
    # a second time: every folder is checked before the first run starts, the runs there kept whole
    before = tree(out)
    res = CliRunner().invoke(train_main, ["--data", str(tmp_path), "--out-dir", str(out), *TINY,
                                          "--seeds", "0,3"])
    assert error_line(res) == f"error: {out / names[0]} already holds a run; start over with --force, or pick --run-name"
    assert tree(out) == before


# --- the dead-network warning ---------------------------------------------------------------

def test_a_silent_output_layer_warns_once_per_run(tmp_path, monkeypatch, caplog):
    import dvsg_train.engine as engine
    from dvsg_train.config import TrainConfig

    make_learnable_store(tmp_path / "frames_T4_number.zarr", T=4, n_train=12, n_test=11)
    real = engine.build_model

    def linear_weights_times(scale: float):
        def build(*args, **kwargs):
            model = real(*args, **kwargs)
            for fc in (m for m in model.modules() if isinstance(m, engine.nn.Linear)):
                with engine.torch.no_grad():
                    fc.weight.mul_(scale)
                fc.weight.requires_grad_(scale != 0)    # 0: stays silent, the output LIF's input is 0
            return model
        return build

    monkeypatch.setattr(engine, "build_model", linear_weights_times(0.0))
    cfg = dict(data=str(tmp_path), out_dir=str(tmp_path / "runs"), T=4, batch_size=6, epochs=2, channels=4,
               device="cpu", workers=0)
    with caplog.at_level(logging.WARNING, logger="dvsg_train.engine"):
        summary = engine.main(TrainConfig(**cfg))
    warnings = [r.getMessage() for r in caplog.records if "no spike" in r.getMessage()]
    assert warnings == [engine.SILENT_OUTPUT % (0, 0.001, 4)], warnings
    assert "a larger --lr" in warnings[0] and "more --channels" in warnings[0] and "\n" not in warnings[0]
    history = [json.loads(ln) for ln in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in history] == [pytest.approx(1 / 11, rel=1e-6)] * 2   # 1/11 in float32
    # a network whose output layer spikes does not warn (at their random init small networks are
    # silent on this data until training wakes them: weights x 30 make this one fire at once)
    monkeypatch.setattr(engine, "build_model", linear_weights_times(30.0))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dvsg_train.engine"):
        summary = engine.main(TrainConfig(**{**cfg, "epochs": 1, "run_name": "alive"}))
    assert [r for r in caplog.records if "no spike" in r.getMessage()] == []
    assert json.loads(Path(summary["run_dir"], "metrics.jsonl").read_text())["train_loss"] != pytest.approx(1 / 11)
