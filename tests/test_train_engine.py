"""dvsg_train.engine: training learns, resume is exact, AMP steps, outputs of a run."""
from __future__ import annotations

import json

import pytest
import torch

from dvsg_train.checkpoint import load_checkpoint
from dvsg_train.config import TrainConfig
from dvsg_train.data import load_run_data
from dvsg_train.engine import main, make_optimizer, train_one_epoch
from dvsg_train.errors import TrainError
from dvsg_train.model import build_model

from train_fixtures import make_learnable_store

NUMBERS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
           "max_test_acc")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine") / "frames_T4_number.zarr"
    make_learnable_store(path, T=4, n_train=66, n_test=33)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A smaller store for the tests that check bookkeeping rather than learning."""
    path = tmp_path_factory.mktemp("engine_small") / "frames_T4_number.zarr"
    make_learnable_store(path, T=4, n_train=24, n_test=11, seed=5)
    return path


def cfg(store, out, **kw) -> TrainConfig:
    base = dict(data=str(store), out_dir=str(out), T=4, batch_size=6, epochs=3, channels=4, lr=0.01,
                device="cpu", workers=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def numbers(history):
    return [{k: r.get(k) for k in NUMBERS} for r in history]


@pytest.fixture(scope="module")
def learned(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    records = []
    summary = main(cfg(store, out, channels=8, epochs=4, lr=0.05), on_epoch=records.append)
    return out, summary, records


def test_training_lowers_loss_and_beats_chance(learned):
    _, summary, records = learned
    assert len(records) == 4
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.01
    assert summary["max_test_acc"] >= 0.4                       # chance is 1/11
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    assert summary["max_test_acc"] == max(r["test_acc"] for r in records)


def test_run_outputs(learned, store):
    out, summary, records = learned
    run = out / "T4_b6_adam_lr0.05_c8"
    assert summary["run_dir"] == str(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["test_acc"] for l in lines] == [r["test_acc"] for r in records]
    config = json.loads((run / "config.json").read_text())
    assert config["channels"] == 8 and config["T_max"] == 4 and config["data_fingerprint"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(run.glob("events.out.tfevents.*"))
    latest = load_checkpoint(run / "checkpoint_latest.pt")   # weights_only=True inside
    best = load_checkpoint(run / "checkpoint_max.pt")
    assert latest["epoch"] == 3
    assert best["history"][-1]["test_acc"] == summary["max_test_acc"]
    assert latest["data_fingerprint"] == summary["data_fingerprint"]
    assert set(latest["rng"]) == {"torch", "cuda", "data"}
    assert not list(run.glob(".*tmp*"))
    with pytest.raises(TrainError, match="already holds a run"):
        main(cfg(store, out, channels=8, epochs=4, lr=0.05))
    # --force starts over: nothing of the previous run is left beside the new one
    main(cfg(store, out, channels=8, epochs=1, lr=0.05, force=True))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert load_checkpoint(run / "checkpoint_max.pt")["epoch"] == 0


def test_resume_reproduces_uninterrupted_run(small, tmp_path):
    full = main(cfg(small, tmp_path / "a", T_max=3, epochs=3, channels=8, lr=0.05))
    want = load_checkpoint(f"{full['run_dir']}/checkpoint_latest.pt")
    # interrupted after epoch 1 (reading through the DataLoader this time), then resumed
    part = main(cfg(small, tmp_path / "b", T_max=3, epochs=2, channels=8, lr=0.05, preload="none"))
    ckpt = f"{part['run_dir']}/checkpoint_latest.pt"
    resumed = main(cfg(small, tmp_path / "b", T_max=3, epochs=3, channels=8, lr=0.05, resume=ckpt))
    got = load_checkpoint(f"{resumed['run_dir']}/checkpoint_latest.pt")
    assert numbers(got["history"]) == numbers(want["history"])
    assert len({r["train_loss"] for r in got["history"]}) == 3
    for k, v in want["model"].items():
        assert torch.equal(v, got["model"][k]), k
    assert torch.equal(want["rng"]["torch"], got["rng"]["torch"])
    lines = (tmp_path / "b" / "T4_b6_adam_lr0.05_c8" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [0, 1, 2]


def test_amp_bf16_one_optimizer_step_per_batch(small):
    torch.manual_seed(0)
    data = load_run_data(small, T=4, batch_size=6, device=torch.device("cpu"),
                         generator=torch.Generator().manual_seed(0))
    model = build_model(4)
    opt = make_optimizer(model, cfg(small, "unused"))
    steps = []
    real_step = opt.step
    opt.step = lambda *a, **k: (steps.append(1), real_step(*a, **k))[1]
    before = [p.detach().clone() for p in model.parameters()]
    r = train_one_epoch(model, data.train, opt, torch.device("cpu"), amp_dtype="bf16")
    assert len(steps) == len(data.train) == 4 and r["samples"] == 24
    assert all(int(s["step"]) == 4 for s in opt.state.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert 0 < r["loss"] < 1


def test_validation_selects_checkpoint_and_reports_accuracy_b(small, tmp_path):
    summary = main(cfg(small, tmp_path, epochs=2, val_fraction=0.2, net="stepwise", neuron="plif"))
    assert {"best_val_acc", "best_val_epoch", "test_acc_at_best_val"} <= set(summary)
    best = load_checkpoint(f"{summary['run_dir']}/checkpoint_max.pt")
    assert best["epoch"] == summary["best_val_epoch"]
    assert best["history"][-1]["test_acc"] == summary["test_acc_at_best_val"]
    assert summary["run_dir"].endswith("T4_b6_adam_lr0.01_c4_plif_stepwise_val0.2")
    assert any(k.endswith(".w") for k in best["model"])       # PLIF's learnable tau is saved


def test_threads_are_set_for_the_run_and_restored(small, tmp_path):
    before = torch.get_num_threads()
    seen = []
    main(cfg(small, tmp_path, epochs=1, threads=1), on_epoch=lambda r: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before
    seen.clear()
    main(cfg(small, tmp_path / "all", epochs=1, threads=0), on_epoch=lambda r: seen.append(torch.get_num_threads()))
    assert seen == [before]                      # 0: torch's own default is left alone


def test_amp_on_a_cpu_without_bf16_warns_once(monkeypatch, caplog):
    import dataclasses
    import logging

    from dvsg_train import engine

    rc = TrainConfig(data="x", amp=True, device="cpu")
    rc = dataclasses.replace(rc, amp_dtype=rc.resolved_amp_dtype("cpu"))
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="dvsg_train.engine"):
        engine._warn_slow_amp(rc, torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records] == [
        "--amp on this CPU (no avx512_bf16/amx_bf16) emulates bf16: expect it several times slower than fp32; "
        "leave --amp out on CPU"]
    caplog.clear()
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    engine._warn_slow_amp(rc, torch.device("cpu"))
    engine._warn_slow_amp(dataclasses.replace(rc, amp=False, amp_dtype=None), torch.device("cpu"))
    assert caplog.records == []


def test_cpu_bf16_detection_reads_cpuinfo(monkeypatch, tmp_path):
    import builtins

    from dvsg_train import engine

    real_open = builtins.open
    for flags, want in (("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        assert engine.cpu_has_bf16() is want
    info.write_text("processor\t: 0\n")
    assert engine.cpu_has_bf16() is None
