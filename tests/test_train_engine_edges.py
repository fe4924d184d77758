"""dvsg_train.engine's small parts with exact values: the duration text and the run forecast at
their boundaries (a fake clock), the checkpoint choice and the run summary, optimizer and
scheduler, the loss and one-hot targets, the loops' refusals, hooks and DDP sums (a stand-in
for the reduction), the backend choice, the resolved run, the run folder's name, claim and
config.json. No training: the network is a table of fixed outputs, the folders are tmp_path's."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from dvsg_train import engine
from dvsg_train.checkpoint import LATEST, MAX
from dvsg_train.config import TrainConfig
from dvsg_train.distributed import DistEnv
from dvsg_train.engine import (
    SILENT_OUTPUT,
    ResolvedRun,
    RunForecast,
    _claim_run_folder,
    _folder_run_id,
    _run_dir,
    _select,
    _start_run_folder,
    _summary,
    duration_text,
    evaluate,
    make_optimizer,
    make_scheduler,
    resolve_backend,
    resolve_run,
    train_one_epoch,
)
from dvsg_train.errors import BackendUnavailableError, ConfigError, TrainError

CPU = torch.device("cpu")
CUDA = torch.device("cuda")      # only named: nothing runs on it


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"data": "/data/s.zarr", "T": 4, "batch_size": 2, "epochs": 3, "channels": 4,
                          "workers": 0, **kw})


# ----------------------------------------------------------------------------- duration_text

@pytest.mark.parametrize("seconds,text", [
    (0, "0 s"), (42, "42 s"), (89.4, "89 s"), (89.99, "90 s"),          # below 90: whole seconds
    (90, "1.5 min"), (750, "12.5 min"), (5399, "90.0 min"),             # below 5400 (1.5 h): minutes
    (5400, "1.5 h"), (32_760, "9.1 h"), (172_799, "48.0 h"),            # below 2 days: hours
    (6300, "1.8 h"), (172_800, "2.0 days"), (237_600, "2.8 days"), (276_480, "3.2 days"),   # 1.75, 2.75: up
])
def test_duration_text_at_each_unit_boundary(seconds, text):
    assert duration_text(seconds) == text


# ----------------------------------------------------------------------------- RunForecast

def _clock(*times):
    it = iter(times)
    return lambda: next(it)


def test_forecast_after_five_timed_batches(caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    f = RunForecast(3, 10, CPU, clock=_clock(100.0, 101.0, 102.0, 103.0, 104.0, 110.0))
    assert f.at == 5 and f.t0 is None and f.said is None
    for step in range(5):
        f(step)
        assert f.said is None
    assert f.t0 == 100.0
    f(5)                                       # 10 s over 5 batches: 2 s a batch, 3 x 10 batches: 60 s
    want = ("projected time: about 60 s for 3 epochs of 10 batches (2.00 s per batch over batches 2-6; "
            "evaluation comes on top)")
    assert f.said == want
    assert [(r.msg, r.args) for r in caplog.records] == [("%s", (want,))]      # never read as a format
    f(6)                                       # once only (the clock would raise: it has no more ticks)
    f(5)
    assert len(caplog.records) == 1


def test_forecast_of_one_epoch_of_two_batches_times_the_second():
    f = RunForecast(1, 2, CPU, clock=_clock(0.0, 0.5))
    assert f.at == 1
    f(0)
    f(1)
    assert f.said == ("projected time: about 1 s for 1 epoch of 2 batches (0.50 s per batch over batches 2-2; "
                      "evaluation comes on top)")


def test_forecast_early_once_the_timed_batches_took_thirty_seconds():
    f = RunForecast(2, 100, CPU, clock=_clock(10.0, 39.99, 70.0))
    f(0)
    f(1)                                       # 29.99 s: not yet
    assert f.said is None
    f(2)                                       # 60 s over 2 batches: 30 s each, x 200 batches
    assert f.said == ("projected time: about 1.7 h for 2 epochs of 100 batches (30.00 s per batch over batches "
                      "2-3; evaluation comes on top)")
    f = RunForecast(2, 100, CPU, clock=_clock(10.0, 40.0))
    f(0)
    f(1)                                       # exactly 30 s: said
    assert f.said is not None and "(30.00 s per batch over batches 2-2;" in f.said


def test_forecast_never_for_a_single_batch_and_never_after_its_step():
    f = RunForecast(9, 1, CPU, clock=lambda: pytest.fail("no second batch to time"))
    assert f.at == 0
    f(0)
    f(1)
    assert f.said is None
    f = RunForecast(9, 4, CPU, clock=_clock(0.0))
    assert f.at == 3
    f(4)                                       # past the step to say it at: the clock is not read
    f(0)
    assert f.t0 == 0.0 and f.said is None


def test_forecast_on_cuda_waits_for_the_batches(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    f = RunForecast(1, 3, CUDA, clock=_clock(0.0, 1.0, 2.0))
    for step in range(3):
        f(step)
    assert synced == [CUDA] * 3 and f.said.startswith("projected time: about 3 s for 1 epoch of 3 batches (1.00 s")
    RunForecast(1, 3, CPU, clock=_clock(0.0))(0)
    assert synced == [CUDA] * 3


def test_silent_output_warning_text():
    assert SILENT_OUTPUT % (3, 0.001, 8) == (
        "the output layer emitted no spike in training epoch 3 (loss 1/11 = 0.0909, chance accuracy): the "
        "network is silent at --lr 0.001, --channels 8 and its loss cannot fall until it spikes; a larger --lr "
        "(at --channels 8 on the synthetic release: 0.005 or more) or more --channels usually helps")


# ----------------------------------------------------------------------------- _select, _summary

def test_select_takes_validation_even_at_zero_else_test():
    assert _select({"val_acc": 0.0, "test_acc": 0.9}) == 0.0
    assert _select({"val_acc": 0.25, "test_acc": 0.9}) == 0.25
    assert _select({"val_acc": None, "test_acc": 0.5}) == 0.5
    assert _select({"test_acc": 0.75}) == 0.75


def test_summary_of_no_epoch(tmp_path):
    assert _summary([], tmp_path / "r", "fp") == {"run_dir": str(tmp_path / "r"), "epochs": 0,
                                                    "data_fingerprint": "fp"}


def test_summary_without_validation(tmp_path):
    history = [{"epoch": 4, "test_acc": 0.5, "val_acc": None}, {"epoch": 5, "test_acc": 0.75, "val_acc": None},
               {"epoch": 6, "test_acc": 0.25, "val_acc": None}]
    assert _summary(history, tmp_path, "fp") == {
        "run_dir": str(tmp_path), "epochs": 3, "data_fingerprint": "fp", "max_test_acc": 0.75,
        "final_test_acc": 0.25, "final_epoch": 6}


def test_summary_with_validation_reports_the_test_accuracy_of_the_best_validation(tmp_path):
    # best validation 0.5 at epoch 1 (the first of two equal ones); a later val_acc of 0.0 is
    # still a validation accuracy (not "none": its test accuracy 0.9 is not what is chosen on)
    history = [{"epoch": 0, "val_acc": 0.25, "test_acc": 0.95}, {"epoch": 1, "val_acc": 0.5, "test_acc": 0.5},
               {"epoch": 2, "val_acc": 0.5, "test_acc": 0.6}, {"epoch": 3, "val_acc": 0.0, "test_acc": 0.9}]
    assert _summary(history, tmp_path, "fp") == {
        "run_dir": str(tmp_path), "epochs": 4, "data_fingerprint": "fp", "max_test_acc": 0.95,
        "final_test_acc": 0.9, "final_epoch": 3,
        "best_val_acc": 0.5, "best_val_epoch": 1, "test_acc_at_best_val": 0.5}


# ----------------------------------------------------------------------------- optimizer, scheduler

def test_make_optimizer_sgd_and_adam():
    model = nn.Linear(2, 1)
    opt = make_optimizer(model, cfg(opt="sgd", lr=0.25, momentum=0.5))
    assert type(opt) is torch.optim.SGD
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == (0.25, 0.5)
    assert opt.param_groups[0]["params"] == list(model.parameters())
    opt = make_optimizer(model, cfg(opt="adam", lr=0.125))
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 0.125
    assert opt.param_groups[0]["params"] == list(model.parameters())


def test_make_scheduler_of_each_kind():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0)
    s = make_scheduler(opt, cfg(lr_scheduler="cosalr", epochs=7))
    assert type(s) is torch.optim.lr_scheduler.CosineAnnealingLR and s.T_max == 7
    s = make_scheduler(opt, cfg(lr_scheduler="cosalr", epochs=7, T_max=3))
    assert s.T_max == 3
    s = make_scheduler(opt, cfg(lr_scheduler="steplr", step_size=5, gamma=0.5))
    assert type(s) is torch.optim.lr_scheduler.StepLR and (s.step_size, s.gamma) == (5, 0.5)
    assert make_scheduler(opt, cfg(lr_scheduler="none")) is None


# ----------------------------------------------------------------------------- loss, targets, loops

def test_one_hot_and_loss_by_hand():
    t = engine._one_hot(torch.tensor([0, 10, 3]))
    assert t.dtype == torch.float32 and t.shape == (3, 11)
    assert t.nonzero().tolist() == [[0, 0], [1, 10], [2, 3]] and t.sum() == 3
    out = torch.zeros(2, 11, dtype=torch.bfloat16)
    out[0, 0] = 0.5
    loss = engine._loss(out, engine._one_hot(torch.tensor([0, 1])))
    assert loss.dtype == torch.float32 and loss.item() == np.float32(1.25) / np.float32(22)


def test_autocast_only_with_an_amp_dtype():
    with engine._autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
    with engine._autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with engine._autocast(CPU, "fp16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    assert engine.AMP_TORCH_DTYPES == {"fp16": torch.float16, "bf16": torch.bfloat16}


def test_progress_bar_only_when_enabled():
    items = [1, 2]
    assert engine._progress(items, False, "train", 2) is items
    bar = engine._progress(items, True, "eval", 5)         # the total given, not the list's length
    assert (bar.desc, bar.total, bar.leave, bar.unit) == ("eval", 5, False, "batch") and list(bar) == [1, 2]
    bar.close()


TABLE = torch.zeros(3, 11)
TABLE[0, 3] = 0.5                    # id 0, label 3: right
TABLE[1, 2], TABLE[1, 5] = 0.5, 0.25  # id 1, label 5: wrong (argmax 2)
TABLE[2, 0] = 1.0                    # id 2, label 0: right
LABELS = [3, 5, 0]


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(11))

    def forward(self, x):
        return TABLE[x[0, :, 0, 0, 0].long()] + self.bias


def _batches():
    def frames(ids):
        f = torch.zeros(len(ids), 1, 2, 1, 1, dtype=torch.uint8)
        f[:, 0, 0, 0, 0] = torch.tensor(ids, dtype=torch.uint8)
        return f
    return [(frames([0, 1]), torch.tensor(LABELS[:2])), (frames([2]), torch.tensor(LABELS[2:]))]


def test_train_one_epoch_refusals_exact():
    model = Table()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(ValueError) as e:
        train_one_epoch(model, _batches(), opt, CPU, amp_dtype="fp16")
    assert str(e.value) == "fp16 autocast needs a GradScaler"
    with pytest.raises(TrainError) as e:
        train_one_epoch(model, [], opt, CPU)
    assert str(e.value) == "the train split produced no batch"


class FakeScaler:
    def __init__(self):
        self.calls = []

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 1.0

    def step(self, opt):
        self.calls.append("step")
        opt.step()

    def update(self):
        self.calls.append("update")


def test_train_one_epoch_steps_through_the_scaler_and_calls_the_hook_per_batch():
    model = Table()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler, steps = FakeScaler(), []
    r = train_one_epoch(model, _batches(), opt, CPU, scaler=scaler, on_batch=steps.append)
    assert scaler.calls == ["scale", "step", "update"] * 2 and steps == [0, 1]
    assert r["acc"] == 2 / 3 and r["samples"] == 3 and r["samples_per_s"] == 3 / r["seconds"]
    # bf16 autocast needs no scaler
    assert train_one_epoch(model, _batches(), opt, CPU, amp_dtype="bf16")["samples"] == 3


def test_train_one_epoch_takes_the_sums_over_ranks(monkeypatch):
    """The totals [loss sum, correct, samples, output sum] are what is reduced: another rank's
    3 samples, 3 right, no loss and no output, change every number as the sums say."""
    seen = []

    def reduce(env, totals):
        seen.append(totals.tolist())
        totals += torch.tensor([0.0, 3.0, 3.0, 0.0], dtype=torch.float64)
        return totals
    monkeypatch.setattr(engine.distributed, "all_reduce_sum", reduce)
    model = Table()
    r = train_one_epoch(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.0), CPU,
                        dist_env=DistEnv(CPU, rank=0, world_size=2))
    loss_sum = 1.0625 / 11                      # (0.25 + 0.8125 + 0) / 11 per sample, summed
    assert len(seen) == 1 and seen[0][1:3] == [2.0, 3.0] and abs(seen[0][0] - loss_sum) < 1e-7
    assert seen[0][3] == pytest.approx(2.25, abs=1e-12)
    assert r["samples"] == 6 and r["acc"] == 5 / 6 and abs(r["loss"] - loss_sum / 6) < 1e-7
    assert r["output_rate"] == pytest.approx(2.25 / 66, abs=1e-15)
    assert train_one_epoch(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.0), CPU)["samples"] == 3
    assert len(seen) == 1                       # no DDP: nothing reduced


class Class0(nn.Module):
    """Outputs exactly one_hot(0) for every sample of a [T, B, ...] input: loss 0 against label 0."""

    def __init__(self):
        super().__init__()
        self.out = nn.Parameter(torch.eye(11)[0])

    def forward(self, x):
        return self.out.expand(x.shape[1], 11)


def test_train_one_epoch_counts_exactly_past_float32s_integers():
    """2^24 + 1 samples (16 batches of 2^20, then one), all right: the count of right samples and
    of samples stay exact integers, where float32 would round 2^24 + 1 to 2^24."""
    big = (torch.zeros(1 << 20, 1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1 << 20, dtype=torch.int64))
    one = (torch.zeros(1, 1, 1, 1, 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64))
    model = Class0()
    r = train_one_epoch(model, [big] * 16 + [one], torch.optim.SGD(model.parameters(), lr=0.0), CPU)
    assert r["samples"] == (1 << 24) + 1 and r["acc"] == 1.0
    assert r["loss"] == 0.0 and r["output_rate"] == 1 / 11


def test_evaluate_takes_the_sums_over_ranks(monkeypatch):
    def reduce(env, totals):
        extra = torch.zeros_like(totals)
        extra[1] = 1.0                          # another rank's one sample, label 4 taken for 4
        extra[2 + 4 * 11 + 4] = 1.0
        totals += extra
        return totals
    monkeypatch.setattr(engine.distributed, "all_reduce_sum", reduce)
    r = evaluate(Table(), _batches(), CPU, dist_env=DistEnv(CPU, rank=1, world_size=2))
    want = np.zeros((11, 11), dtype=np.int64)
    want[3, 3] = want[5, 2] = want[0, 0] = want[4, 4] = 1
    assert np.array_equal(r["confusion"], want) and r["samples"] == 4 and r["acc"] == 3 / 4
    assert abs(r["loss"] - 1.0625 / 11 / 4) < 1e-7


# ----------------------------------------------------------------------------- backend, resolved run

def test_resolve_backend(monkeypatch, caplog):
    checked = []
    monkeypatch.setattr(engine, "check_backend", checked.append)
    assert resolve_backend(cfg(cupy=False), CUDA) == "torch" and checked == ["torch"]
    assert resolve_backend(cfg(cupy=True), CPU) == "cupy" and checked == ["torch", "cupy"]
    checked.clear()
    assert resolve_backend(cfg(cupy=None), CPU) == "torch"
    assert resolve_backend(cfg(cupy=None, net="stepwise"), CUDA) == "torch" and checked == []
    assert resolve_backend(cfg(cupy=None), CUDA) == "cupy" and checked == ["cupy"]

    def absent(backend):
        raise BackendUnavailableError("CuPy is not installed")
    monkeypatch.setattr(engine, "check_backend", absent)
    caplog.set_level(logging.WARNING, logger="dvsg_train.engine")
    assert resolve_backend(cfg(cupy=None), CUDA) == "torch"
    assert [r.getMessage() for r in caplog.records] == ["torch neurons instead of the CUDA kernels: CuPy is not installed"]
    with pytest.raises(BackendUnavailableError):
        resolve_backend(cfg(cupy=True), CPU)


def test_resolve_run_writes_this_machines_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = DistEnv(CPU, rank=0, world_size=2)
    run = resolve_run(cfg(data="rel/s.zarr", amp=True, epochs=5), env)
    c = run.config
    assert (c.device, c.world_size, c.data, c.amp_dtype, c.T_max) == ("cpu", 2, str(tmp_path / "rel/s.zarr"), "bf16", 5)
    assert (run.env, run.backend, run.device) == (env, "torch", CPU)
    assert run.name == "T4_b4_adam_lr0.001_c4_amp"            # the global batch, "_amp" as asked
    run = resolve_run(cfg(data="https://example.org/s.zarr", lr_scheduler="steplr", run_name="mine"), DistEnv(CPU))
    c = run.config
    assert (c.data, c.T_max, c.amp_dtype, c.world_size, run.name) == ("https://example.org/s.zarr", None, None, 1, "mine")
    assert resolve_run(cfg(T_max=2), DistEnv(CPU)).config.T_max == 2
    monkeypatch.setattr(engine, "check_backend", lambda backend: None)     # CuPy works "here"
    run = resolve_run(cfg(amp=True, cupy=None), DistEnv(CUDA))   # AMP and backend for the device
    assert (run.config.device, run.config.amp_dtype, run.backend) == ("cuda", "fp16", "cupy")
    run = resolve_run(cfg(amp=True, cupy=None), DistEnv(CPU))
    assert (run.config.device, run.config.amp_dtype, run.backend) == ("cpu", "bf16", "torch")


def test_run_dir_fresh_and_resumed(tmp_path):
    fresh = ResolvedRun(cfg(out_dir=str(tmp_path / "out")), DistEnv(CPU), "torch", "name")
    assert _run_dir(fresh) == tmp_path / "out" / "name"
    (tmp_path / "out" / "r").mkdir(parents=True)
    ck = tmp_path / "out" / "r" / LATEST
    ck.write_bytes(b"")
    resumed = ResolvedRun(cfg(out_dir=str(tmp_path / "out"), resume=str(ck)), DistEnv(CPU), "torch", "x")
    assert _run_dir(resumed) == tmp_path / "out" / "r"
    named = ResolvedRun(cfg(out_dir=str(tmp_path / "out"), resume=str(ck), run_name="r"), DistEnv(CPU), "torch", "x")
    assert _run_dir(named) == tmp_path / "out" / "r"
    other = ResolvedRun(cfg(out_dir=str(tmp_path / "out"), resume=str(ck), run_name="s"), DistEnv(CPU), "torch", "x")
    with pytest.raises(ConfigError) as e:
        _run_dir(other)
    assert str(e.value) == (f"{ck}: --run-name/--out-dir name {tmp_path / 'out' / 's'}, but the checkpoint belongs "
                            f"to the run in {tmp_path / 'out' / 'r'}; a resumed run continues in its own folder "
                            f"(copy that folder to branch off)")


# ----------------------------------------------------------------------------- the run folder

def test_folder_run_id(tmp_path):
    assert _folder_run_id(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"run_id": "abc"}))
    assert _folder_run_id(tmp_path) == "abc"
    (tmp_path / "config.json").write_text(json.dumps({"run_id": 7}))
    assert _folder_run_id(tmp_path) == ""
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert _folder_run_id(tmp_path) == ""
    for text, exc in (("{not json", "JSONDecodeError"), ("[1, 2]", "AttributeError")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(TrainError) as e:
            _folder_run_id(tmp_path)
        assert str(e.value) == (f"{tmp_path / 'config.json'}: unreadable run config ({exc}); not writing into a "
                                f"folder whose run is unknown")


def _claim(run_dir, config, ckpt):
    import contextlib
    with contextlib.ExitStack() as held:
        return _claim_run_folder(held, run_dir, config, ckpt)


def test_claim_a_fresh_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    a, b = _claim(run_dir, cfg(), None), _claim(run_dir, cfg(), None)
    assert len(a) == 32 and int(a, 16) >= 0 and a != b
    (run_dir / LATEST).write_bytes(b"")
    with pytest.raises(TrainError) as e:
        _claim(run_dir, cfg(), None)
    assert str(e.value) == (f"{run_dir} already holds a run; continue it with --resume {run_dir / LATEST}, start "
                            f"over with --force, or pick --run-name")
    assert len(_claim(run_dir, cfg(force=True), None)) == 32


def test_claim_a_resumed_run_folder(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ck = run_dir / LATEST
    ck.write_bytes(b"")
    run_id = "c" * 32
    ckpt = {"run": {"id": run_id, "dir": str(run_dir)}}
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    assert _claim(run_dir, cfg(resume=str(ck)), ckpt) == run_id              # no config.json: its own file
    assert caplog.records == []                                              # not moved: nothing said
    (run_dir / "config.json").write_text(json.dumps({"run_id": run_id}))
    assert _claim(run_dir, cfg(resume=str(ck)), ckpt) == run_id
    (run_dir / "config.json").write_text(json.dumps({"run_id": "d" * 40}))
    with pytest.raises(TrainError) as e:
        _claim(run_dir, cfg(resume=str(ck)), ckpt)
    assert str(e.value) == (f"{run_dir} holds another run (id {'d' * 12}, the checkpoint's is {'c' * 12}); a resumed "
                            f"run never writes into another run's folder")
    (run_dir / "config.json").write_text(json.dumps({"run_id": 3}))
    with pytest.raises(TrainError) as e:
        _claim(run_dir, cfg(resume=str(ck)), ckpt)
    assert str(e.value).startswith(f"{run_dir} holds another run (id unknown, the checkpoint's is {'c' * 12});")
    # no config.json, and a checkpoint_latest.pt there that is not the one resumed
    (run_dir / "config.json").unlink()
    elsewhere = tmp_path / "copy.pt"
    elsewhere.write_bytes(b"")
    with pytest.raises(TrainError) as e:
        _claim(run_dir, cfg(resume=str(elsewhere)), ckpt)
    assert str(e.value) == (f"{run_dir} holds another run's {LATEST}; a resumed run never writes into another "
                            f"run's folder")
    ck.unlink()
    moved = {"run": {"id": run_id, "dir": "/old/place"}}
    assert _claim(run_dir, cfg(resume=str(elsewhere)), moved) == run_id
    assert [r.getMessage() for r in caplog.records] == [f"run folder {run_dir} was moved here from /old/place"]


def test_start_run_folder_writes_the_config_and_a_fresh_start_removes_the_old_outputs(tmp_path):
    run_dir = tmp_path / "a" / "run"
    run = ResolvedRun(cfg(), DistEnv(CPU), "torch", "run")
    _start_run_folder(run_dir, run, True, "id1", "fp1")
    written = json.loads((run_dir / "config.json").read_text())
    assert written == {**cfg().to_dict(), "run_id": "id1", "run_dir": str(run_dir), "backend": "torch",
                       "data_fingerprint": "fp1", "version": engine.__version__, "torch": torch.__version__}
    old = [LATEST, MAX, "metrics.jsonl", "curves.png", "events.out.tfevents.1.host", "notes.txt"]
    for name in old:
        (run_dir / name).write_bytes(b"x")
    _start_run_folder(run_dir, run, False, "id2", "fp2")                  # a resume keeps them
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(old + ["config.json"])
    assert json.loads((run_dir / "config.json").read_text())["run_id"] == "id2"
    _start_run_folder(run_dir, run, True, "id3", "fp3")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "notes.txt"]


def test_previous_run_of_a_fresh_run_checks_the_output_then_the_data_then_the_folder(tmp_path):
    from dvsprep.errors import InputOutputClashError, MissingFileError

    root = tmp_path / "root"
    store = root / "frames_T4_number.zarr"
    store.mkdir(parents=True)
    c = cfg(data=str(root))
    assert engine._previous_run(c, root / "runs" / "r") is None             # beside the store: fine
    with pytest.raises(InputOutputClashError) as e:
        engine._previous_run(c, store / "r")
    assert str(e.value) == (f"{store / 'r'}: lies inside the input {store}; the training run would be written "
                            f"into its own input")
    init = tmp_path / "w" / "init.pt"
    init.parent.mkdir()
    init.write_bytes(b"")
    with pytest.raises(InputOutputClashError) as e:
        engine._previous_run(cfg(data=str(root), init=str(init)), tmp_path / "w")
    assert str(e.value) == f"{tmp_path / 'w'}: holds the input {init}; replacing it would destroy the input"
    run_dir = root / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / LATEST).write_bytes(b"")
    with pytest.raises(MissingFileError):                                    # the mistyped -T is said first
        engine._previous_run(cfg(data=str(root), T=5), run_dir)
    with pytest.raises(TrainError) as e:
        engine._previous_run(c, run_dir)
    assert str(e.value) == (f"{run_dir} already holds a run; continue it with --resume {run_dir / LATEST}, start "
                            f"over with --force, or pick --run-name")
    assert engine._previous_run(cfg(data=str(root), force=True), run_dir) is None


def test_claim_locks_the_run_folder_for_the_training_run(tmp_path):
    from dvsprep.atomic import output_lock
    from dvsprep.errors import OutputLockedError

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with output_lock(run_dir, "another run"):
        with pytest.raises(OutputLockedError) as e:
            _claim(run_dir, cfg(), None)
    assert str(e.value) == (f"{run_dir}: training run is being written by another process (pid {os.getpid()}); "
                            f"wait for it to finish")
    import contextlib
    with contextlib.ExitStack() as held:
        _claim_run_folder(held, run_dir, cfg(), None)
        with pytest.raises(OutputLockedError):                  # held until the stack closes
            with output_lock(run_dir, "another run"):
                pass
    with output_lock(run_dir, "another run"):
        pass


# ----------------------------------------------------------------------------- train_one_epoch's wiring

OUT = torch.tensor([[0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75],
                    [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                    [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.125]])


class Probe(nn.Module):
    """Fixed outputs OUT[:B] (+ a zero bias, lr 0); records the input and whether autocast is on."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(11))
        self.seen, self.autocast = [], []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return OUT[:x.shape[1]] + self.bias


def _image_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 3, (3, 2, 2, 4, 4), generator=g, dtype=torch.uint8), torch.tensor([10, 3, 4])),
            (torch.randint(0, 3, (2, 2, 2, 4, 4), generator=g, dtype=torch.uint8), torch.tensor([3, 1]))]


@pytest.mark.parametrize("seed,epoch,rank", [(0, 0, 0), (3, 2, 1)])
def test_train_one_epoch_augments_each_batch_from_its_own_generator(seed, epoch, rank, monkeypatch):
    """Each step's batch and targets are augment_batch's from augment_generator(seed, epoch,
    rank, step); loss and accuracy are against those targets (accuracy: the target's argmax)."""
    from dvsg_train.augment import augment_batch, augment_generator
    from dvsg_train.augment_spec import parse_augment
    from dvsg_train.data import to_network_input

    spec = parse_augment("mirror,mixup=0.5")
    envs = []
    monkeypatch.setattr(engine.distributed, "all_reduce_sum", lambda env, totals: envs.append(env) or totals)
    dist_env = DistEnv(CPU, rank=rank, world_size=2) if rank else None
    model = Probe()
    kw = {} if (seed, epoch) == (0, 0) else {"seed": seed, "epoch": epoch}      # the defaults are 0, 0
    r = train_one_epoch(model, _image_batches(), torch.optim.SGD(model.parameters(), lr=0.0), CPU,
                        augment=spec, dist_env=dist_env, **kw)
    loss_sum, correct, n = 0.0, 0, 0
    for step, (frames, labels) in enumerate(_image_batches()):
        x, y = to_network_input(frames, labels, CPU)
        x, target = augment_batch(spec, x, y, augment_generator(seed, epoch, rank, step, CPU))
        assert torch.equal(model.seen[step], x)
        out = OUT[:len(y)]
        loss_sum += torch.nn.functional.mse_loss(out, target).double().item() * len(y)
        correct += int((out.argmax(1) == target.argmax(1)).sum())
        n += len(y)
    assert len(model.seen) == 2 and r["samples"] == n == 5
    assert r["loss"] == loss_sum / 5 and r["acc"] == correct / 5
    assert envs == ([dist_env] if rank else [])
    # not augmenting: the samples as they are
    model = Probe()
    r = train_one_epoch(model, _image_batches(), torch.optim.SGD(model.parameters(), lr=0.0), CPU, augment=None)
    assert torch.equal(model.seen[0], to_network_input(*_image_batches()[0], CPU)[0])
    assert r["acc"] == 2 / 5                                 # OUT's argmax 10, 3, 1 against 10, 3, 4; 10, 3 against 3, 1


def test_train_one_epoch_sums_in_float64_and_times_itself(monkeypatch):
    """Loss and output sums are float64: a float32 sum would lose the 2^-30 beside 1.0."""
    tiny = 2.0 ** -30
    out = torch.zeros(3, 11)
    out[0, 0], out[1, 0], out[2, 2] = 1.0, tiny, 1.0 + 2.0 ** -20
    ticks = iter([10.0, 12.5])
    monkeypatch.setattr(engine, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(11))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return (out[:2] if self.calls == 1 else out[2:]) + self.bias

    batches = [(torch.zeros(2, 1, 2, 1, 1, dtype=torch.uint8), torch.tensor([0, 0])),
               (torch.zeros(1, 1, 2, 1, 1, dtype=torch.uint8), torch.tensor([2]))]
    model = Fixed()
    r = train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.0), CPU)
    l1 = float(torch.nn.functional.mse_loss(out[:2], torch.nn.functional.one_hot(torch.tensor([0, 0]), 11).float()))
    l2 = float(torch.nn.functional.mse_loss(out[2:], torch.nn.functional.one_hot(torch.tensor([2]), 11).float()))
    assert l2 == np.float32(2.0 ** -40) / np.float32(11)       # (2^-20)^2 / 11 in float32
    assert r["loss"] == (l1 * 2 + l2) / 3                      # float64 sums of float32 batch means
    assert r["output_rate"] == (1.0 + tiny + 1.0 + 2.0 ** -20) / 33
    assert (r["seconds"], r["samples_per_s"]) == (2.5, 3 / 2.5)


def test_train_one_epoch_progress_bar_only_when_asked(capfd):
    model = Table()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, _batches(), opt, CPU)
    assert capfd.readouterr().err == ""
    train_one_epoch(model, _batches(), opt, CPU, progress=True)
    err = capfd.readouterr().err
    assert err.startswith("\rtrain:   0%|          | 0/2 [00:00<?, ?batch/s]")     # then cleared (leave=False)


def test_train_one_epoch_autocasts_forward_with_the_amp_dtype():
    model = Probe()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, _image_batches(), opt, CPU)
    train_one_epoch(model, _image_batches(), opt, CPU, amp_dtype="bf16")
    assert model.autocast == [False, False, True, True]
