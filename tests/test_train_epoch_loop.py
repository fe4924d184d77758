"""The run's loop, checked step by step with exact values and no training: `_train_epochs` with
train_one_epoch, evaluate, the clock and TensorBoard replaced by stand-ins that return numbers
chosen here (what each epoch hands on, its record, checkpoints, warnings, DDP's seeds and shared
clock), and `_run` with `_train_epochs` replaced (what it hands each step, resume, --init, its
log lines). The stand-ins for DDP's collectives run each rank's own part (no process group)."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dvsg_train import distributed, engine
from dvsg_train.checkpoint import LATEST, MAX, TrainingState, load_checkpoint
from dvsg_train.config import TrainConfig
from dvsg_train.distributed import DistEnv
from dvsg_train.model import build_model
from train_fixtures import fp, save_run_checkpoint, spy, step_config, store  # noqa: F401 (fixtures)

# the stand-ins take no optimizer step before the scheduler's
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")

CPU = torch.device("cpu")
CUDA = torch.device("cuda")       # only named: nothing here runs on it
FP = "ab" * 32
RUN_ID = "cd" * 16
LR = 0.01


class FakeScalars:
    made: list = []

    def __init__(self, log_dir, purge_step):
        self.args, self.added, self.closed = (log_dir, purge_step), [], False
        FakeScalars.made.append(self)

    def add(self, record):
        self.added.append(dict(record))

    def close(self):
        self.closed = True


class Loop:
    """One `_train_epochs` call with its stand-ins. ``train``: per epoch (loss, acc, output_rate,
    samples_per_s); ``val`` / ``test``: per epoch (loss, acc); ``clock``: perf_counter's values in
    order (two per epoch: the epoch's start and its end)."""

    def __init__(self, monkeypatch, tmp_path, *, env=DistEnv(CPU), train, test, val=None, clock=None,
                 history=None, start_epoch=0, on_epoch=None, scaler=None, fail_at=None, **config):
        self.train_calls, self.eval_calls, self.buffers, self.main_calls = [], [], [], []
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = step_config(tmp_path / "s.zarr", tmp_path, **{"seed": 7, "lr": LR, **config})
        self.run = engine.resolve_run(cfg, env)
        torch.manual_seed(0)
        model = build_model(4, "multistep", "lif", "torch", 2.0, False)
        optimizer = engine.make_optimizer(model, self.run.config)
        self.state = TrainingState(model, optimizer, engine.make_scheduler(optimizer, self.run.config), scaler,
                                   torch.Generator().manual_seed(7))
        self.net = object()                    # the model as trained (DDP's wrapper): only handed on
        self.data = SimpleNamespace(train=[None] * 5, val=["val"] if val else None, test=["test"], fingerprint=FP)
        train, val, test = list(train), list(val or []), list(test)
        FakeScalars.made = []
        monkeypatch.setattr(engine, "Scalars", FakeScalars)
        ticks = iter(clock if clock is not None else [float(i) for i in range(100)])
        monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
        monkeypatch.setattr(distributed, "broadcast_buffers", lambda env, model: self.buffers.append((env, model)))
        monkeypatch.setattr(distributed, "on_main", lambda env, fn: self.main_calls.append(env) or fn())
        self.payloads = spy(monkeypatch, engine, "make_payload")
        self.saves = spy(monkeypatch, engine, "save_checkpoint")
        self.curves = []                       # (path, epochs drawn): matplotlib is slow and tested in report's tests
        monkeypatch.setattr(engine, "write_curves", lambda path, history: self.curves.append((path, len(history))))

        def fake_train(*args, **kw):
            self.train_calls.append((args, kw))
            if fail_at is not None and kw["epoch"] == fail_at:
                raise RuntimeError("out of memory")
            loss, acc, rate, speed = train.pop(0)
            return {"loss": loss, "acc": acc, "output_rate": rate, "samples_per_s": speed}

        def fake_evaluate(model, batches, device, **kw):
            self.eval_calls.append(((model, batches, device), kw))
            loss, acc = (val if batches == ["val"] else test).pop(0)
            return {"loss": loss, "acc": acc}
        monkeypatch.setattr(engine, "train_one_epoch", fake_train)
        monkeypatch.setattr(engine, "evaluate", fake_evaluate)
        self.history = list(history or [])
        self.start_epoch, self.on_epoch = start_epoch, on_epoch

    def saved(self) -> dict[str, list[int]]:
        """The epochs saved, by checkpoint name."""
        out: dict[str, list[int]] = {}
        for (path, payload), _ in self.saves:
            out.setdefault(path.name, []).append(payload["epoch"])
        return out

    def __call__(self):
        engine._train_epochs(self.run, self.run_dir, RUN_ID, self.state, self.net, self.data, self.history,
                             self.start_epoch, self.on_epoch)
        return self.history


def _record(epoch, lr, train, test, best, seconds, speed, val=(None, None)):
    return {"epoch": epoch, "lr": lr, "train_loss": train[0], "train_acc": train[1], "val_loss": val[0],
            "val_acc": val[1], "test_loss": test[0], "test_acc": test[1], "max_test_acc": best,
            "epoch_seconds": seconds, "train_samples_per_s": speed}


# cosine annealing over 3 epochs: lr * (1 + cos(pi * e / 3)) / 2
LR1, LR2 = LR * 0.75, LR * 0.25


def test_each_epochs_record_from_its_train_and_test_results_and_the_clock(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    loop = Loop(monkeypatch, tmp_path, train=[(0.5, 0.25, 0.1, 40.0), (0.25, 0.5, 0.2, 50.0), (0.125, 0.75, 0.3, 60.0)],
                test=[(0.375, 0.5), (0.5, 0.25), (0.25, 0.75)], clock=[100.0, 102.5, 200.0, 203.25, 300.0, 300.5])
    history = loop()
    want = [_record(0, LR, (0.5, 0.25), (0.375, 0.5), 0.5, 2.5, 40.0),
            _record(1, LR1, (0.25, 0.5), (0.5, 0.25), 0.5, 3.25, 50.0),
            _record(2, LR2, (0.125, 0.75), (0.25, 0.75), 0.75, 0.5, 60.0)]
    # torch steps the cosine recursively from the last lr: a few ulps (rel 1e-15 is about 4 ulps)
    assert [r["lr"] for r in history] == [LR, pytest.approx(LR1, rel=1e-15), pytest.approx(LR2, rel=1e-15)]
    want[1]["lr"], want[2]["lr"] = history[1]["lr"], history[2]["lr"]
    assert history == want
    assert [json.loads(line) for line in (loop.run_dir / "metrics.jsonl").read_text().splitlines()] == want
    assert sorted(p.name for p in loop.run_dir.iterdir()) == sorted([LATEST, MAX, "metrics.jsonl"])
    assert loop.curves == [(loop.run_dir / "curves.png", n) for n in (1, 2, 3)]
    assert loop.saved() == {LATEST: [0, 1, 2], MAX: [0, 2]}        # 0.75 beats epoch 0's 0.5
    assert load_checkpoint(loop.run_dir / MAX)["epoch"] == 2
    [scalars] = FakeScalars.made
    assert scalars.args == (loop.run_dir, 0) and scalars.added == want and scalars.closed
    assert [r.getMessage() for r in caplog.records] == [
        "epoch = 0, train_loss = 0.5000, train_acc = 0.2500, test_loss = 0.3750, test_acc = 0.5000, "
        "max_test_acc = 0.5000, epoch_time = 2.5 s, train speed = 40.0 samples/s",
        "epoch = 1, train_loss = 0.2500, train_acc = 0.5000, test_loss = 0.5000, test_acc = 0.2500, "
        "max_test_acc = 0.5000, epoch_time = 3.2 s, train speed = 50.0 samples/s",
        "epoch = 2, train_loss = 0.1250, train_acc = 0.7500, test_loss = 0.2500, test_acc = 0.7500, "
        "max_test_acc = 0.7500, epoch_time = 0.5 s, train speed = 60.0 samples/s"]
    assert loop.buffers == [(loop.run.env, loop.state.model)] * 3
    assert loop.main_calls == []                                  # one process: no shared clock


def test_what_each_epoch_hands_train_and_evaluate(monkeypatch, tmp_path):
    scaler = torch.amp.GradScaler("cpu")
    loop = Loop(monkeypatch, tmp_path, train=[(0.5, 0.5, 0.1, 1.0)] * 2, test=[(0.5, 0.5)] * 2,
                val=[(0.25, 0.5)] * 2, epochs=2, amp=True, amp_dtype="bf16", progress=True, augment="mirror",
                scaler=scaler)
    loop()
    spec = loop.run.config.augment_spec()
    assert spec.active
    forecasts = [kw.pop("on_batch") for _, kw in loop.train_calls]
    assert [args for args, _ in loop.train_calls] == [(loop.net, loop.data.train, loop.state.optimizer, CPU)] * 2
    assert [kw for _, kw in loop.train_calls] == [
        {"scaler": scaler, "amp_dtype": "bf16", "progress": True, "dist_env": None, "augment": spec, "seed": 7,
         "epoch": e} for e in (0, 1)]
    assert type(forecasts[0]) is engine.RunForecast and forecasts[1] is None      # the first epoch only
    assert (forecasts[0].epochs, forecasts[0].batches, forecasts[0].device) == (2, 5, CPU)
    assert loop.eval_calls == [
        ((loop.state.model, ["val"], CPU), {"amp_dtype": "bf16", "dist_env": None}),
        ((loop.state.model, ["test"], CPU), {"amp_dtype": "bf16", "progress": True, "dist_env": None})] * 2
    assert [kw["cuda_device"] for _, kw in loop.payloads] == [None, None]


def test_the_best_checkpoint_follows_validation_when_held_out(monkeypatch, tmp_path):
    """checkpoint_max.pt is saved at an epoch whose val accuracy beats every earlier one (a tie
    does not), whatever the test accuracy does."""
    loop = Loop(monkeypatch, tmp_path, epochs=4, train=[(0.5, 0.5, 0.1, 1.0)] * 4,
                test=[(0.5, 0.75), (0.5, 1.0), (0.5, 0.25), (0.5, 0.5)],
                val=[(0.5, 0.25), (0.5, 0.25), (0.5, 0.5), (0.5, 0.0)])
    history = loop()
    assert loop.saved() == {LATEST: [0, 1, 2, 3], MAX: [0, 2]}
    assert [r["max_test_acc"] for r in history] == [0.75, 1.0, 1.0, 1.0]
    assert [(r["val_loss"], r["val_acc"]) for r in history] == [(0.5, 0.25), (0.5, 0.25), (0.5, 0.5), (0.5, 0.0)]


def test_a_resumed_loop_starts_where_the_checkpoint_left_off(monkeypatch, tmp_path, caplog):
    """After epoch 0 of 3 (its record in the history): the forecast covers the 2 epochs left, the
    scalars purge from epoch 1, the best so far is the history's, and epoch 1 trains at the
    scheduler's lr as restored (here the optimizer's, set by hand)."""
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    before = _record(0, LR, (0.5, 0.5), (0.5, 0.5), 0.5, 1.0, 1.0)
    loop = Loop(monkeypatch, tmp_path, train=[(0.5, 0.5, 0.1, 1.0)] * 2, test=[(0.5, 0.5), (0.5, 0.625)],
                history=[before], start_epoch=1, clock=[10.0, 11.0, 20.0, 22.0])
    loop.state.optimizer.param_groups[0]["lr"] = 0.004
    history = loop()
    assert [r["epoch"] for r in history] == [0, 1, 2] and history[1]["lr"] == 0.004
    assert loop.saved() == {LATEST: [1, 2], MAX: [2]}                     # 0.5 does not beat epoch 0's 0.5
    [scalars] = FakeScalars.made
    assert scalars.args == (loop.run_dir, 1)
    forecast = loop.train_calls[0][1]["on_batch"]
    assert (forecast.epochs, forecast.batches) == (2, 5) and loop.train_calls[1][1]["on_batch"] is None
    assert [kw["epoch"] for _, kw in loop.train_calls] == [1, 2]
    assert [(r["epoch_seconds"], r["max_test_acc"]) for r in history[1:]] == [(1.0, 0.5), (2.0, 0.625)]


def test_a_silent_output_layer_is_warned_of_once(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dvsg_train.engine")
    loop = Loop(monkeypatch, tmp_path, epochs=4, train=[(0.5, 0.5, 0.25, 1.0), (1 / 11, 0.0, 0.0, 1.0),
                                                      (1 / 11, 0.0, 0.0, 1.0), (0.5, 0.5, 0.125, 1.0)],
                test=[(0.5, 0.5)] * 4)
    loop()
    assert [r.getMessage() for r in caplog.records] == [engine.SILENT_OUTPUT % (1, LR, 4)]
    assert caplog.records[0].getMessage().startswith("the output layer emitted no spike in training epoch 1 ")


def test_on_epoch_takes_the_records_instead_of_the_log(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    seen = []
    loop = Loop(monkeypatch, tmp_path, epochs=2, train=[(0.5, 0.5, 0.1, 1.0)] * 2, test=[(0.5, 0.5)] * 2,
                on_epoch=seen.append)
    history = loop()
    assert seen == history and len(seen) == 2 and caplog.records == []


def test_the_scalars_are_closed_when_an_epoch_fails(monkeypatch, tmp_path):
    loop = Loop(monkeypatch, tmp_path, train=[(0.5, 0.5, 0.1, 1.0)], test=[(0.5, 0.5)], fail_at=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        loop()
    [scalars] = FakeScalars.made
    assert scalars.closed and [r["epoch"] for r in scalars.added] == [0]
    assert load_checkpoint(loop.run_dir / LATEST)["epoch"] == 0


def test_the_loop_without_a_scheduler_keeps_the_lr(monkeypatch, tmp_path):
    loop = Loop(monkeypatch, tmp_path, epochs=2, train=[(0.5, 0.5, 0.1, 1.0)] * 2, test=[(0.5, 0.5)] * 2,
                lr_scheduler="none")
    assert loop.state.scheduler is None
    assert [r["lr"] for r in loop()] == [LR, LR]


# ----------------------------------------------------------------------------- under DDP

def _ddp(rank: int, device=CPU) -> DistEnv:
    return DistEnv(device, rank=rank, world_size=2, local_rank=rank, local_world_size=2)


def test_rank_0_under_ddp(monkeypatch, tmp_path, caplog):
    """Each epoch reseeds the rank's dropout RNG from (seed, epoch, rank); the clock and speed come
    from rank 0 (on_main); the collectives' env goes to train and evaluate; files and logs as one
    process."""
    caplog.set_level(logging.WARNING, logger="dvsg_train.engine")
    seeds = []
    env = _ddp(0)
    loop = Loop(monkeypatch, tmp_path, env=env, epochs=2, train=[(0.5, 0.5, 0.0, 8.0), (0.5, 0.5, 0.0, 9.0)],
                test=[(0.5, 0.5)] * 2, val=[(0.25, 0.75)] * 2, clock=[0.0, 4.0, 5.0, 11.0], progress=True)
    monkeypatch.setattr(torch, "manual_seed", seeds.append)
    history = loop()
    assert seeds == [distributed.rank_seed(7, 0, 0), distributed.rank_seed(7, 1, 0)]
    assert len(set(seeds)) == 2
    assert loop.main_calls == [env, env]
    assert [(r["epoch_seconds"], r["train_samples_per_s"]) for r in history] == [(4.0, 8.0), (6.0, 9.0)]
    assert set(history[0]) == set(_record(0, LR, (0, 0), (0, 0), 0, 0, 0))
    assert [kw["dist_env"] for _, kw in loop.train_calls] == [env, env]
    assert [kw["progress"] for _, kw in loop.train_calls] == [True, True]
    assert [kw for _, kw in loop.eval_calls] == [{"amp_dtype": None, "dist_env": env},
                                                 {"amp_dtype": None, "progress": True, "dist_env": env}] * 2
    assert type(loop.train_calls[0][1]["on_batch"]) is engine.RunForecast
    assert [kw["cuda_device"] for _, kw in loop.payloads] == [None, None]      # a CPU rank has no CUDA RNG
    assert len(caplog.records) == 1                                            # silent: said on rank 0
    assert (loop.run_dir / LATEST).exists() and len(FakeScalars.made) == 1


def test_rank_1_under_ddp_keeps_the_history_and_writes_nothing(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    seeds, seen = [], []
    env = _ddp(1)
    loop = Loop(monkeypatch, tmp_path, env=env, epochs=2, train=[(0.5, 0.5, 0.0, 8.0)] * 2, test=[(0.5, 0.5)] * 2,
                progress=True, on_epoch=seen.append)
    monkeypatch.setattr(torch, "manual_seed", seeds.append)
    history = loop()
    assert [r["epoch"] for r in history] == [0, 1] and seen == []
    assert seeds == [distributed.rank_seed(7, 0, 1), distributed.rank_seed(7, 1, 1)]
    assert seeds[0] != distributed.rank_seed(7, 0, 0)
    assert list(loop.run_dir.iterdir()) == [] and FakeScalars.made == [] and loop.payloads == []
    assert [kw["progress"] for _, kw in loop.train_calls] == [False, False]    # bars on rank 0 only
    assert [kw["on_batch"] for _, kw in loop.train_calls] == [None, None]      # and the forecast
    assert caplog.records == []


def test_a_cuda_rank_saves_its_own_gpus_rng(monkeypatch, tmp_path):
    """Only named: the stand-ins never touch the device. Under DDP a checkpoint holds the CUDA RNG
    of the rank's own GPU; one process saves every GPU's (cuda_device None)."""
    gpu = torch.device("cuda", 0)      # one a GPU machine has: there the payload reads its RNG
    for i, (env, want) in enumerate([(_ddp(0, gpu), gpu), (DistEnv(gpu), None), (_ddp(0), None)]):
        loop = Loop(monkeypatch, tmp_path / str(i), env=env, epochs=1,
                    train=[(0.5, 0.5, 0.1, 1.0)], test=[(0.5, 0.5)])
        loop()
        assert [kw["cuda_device"] for _, kw in loop.payloads] == [want]


# ----------------------------------------------------------------------------- _run

def _cfg(store, tmp_path, **kw) -> TrainConfig:
    return step_config(store, tmp_path, run_name="r", **kw)


class Epochs:
    """`_train_epochs`' stand-in: records its call and appends one record per epoch."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(engine, "_train_epochs", self)

    def __call__(self, run, run_dir, run_id, state, net, data, history, start_epoch, on_epoch):
        self.calls.append(SimpleNamespace(run=run, run_dir=run_dir, run_id=run_id, state=state, net=net, data=data,
                                          start=start_epoch, on_epoch=on_epoch, history=list(history)))
        for e in range(start_epoch, run.config.epochs):
            history.append({"epoch": e, "train_loss": 0.5, "train_acc": 0.5, "test_loss": 0.5, "test_acc": e / 8})


def test_cudnn_picks_its_convolutions_once_on_cuda_only(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    seen = []

    def stop(config, env):
        seen.append(torch.backends.cudnn.benchmark)
        raise Stop
    monkeypatch.setattr(engine, "resolve_run", stop)
    for device in (CPU, CUDA):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        with pytest.raises(Stop):
            engine._run(_cfg(tmp_path, tmp_path), DistEnv(device), None)
    assert seen == [False, True]


def test_a_fresh_run_hands_each_step_the_resolved_run(store, fp, tmp_path, monkeypatch):
    epochs = Epochs(monkeypatch)
    claims, builds, starts = (spy(monkeypatch, engine, n) for n in ("_claim_run_folder", "_build_training",
                                                                    "_start_run_folder"))
    inits = spy(monkeypatch, engine, "read_init_weights")
    seen = []
    summary = engine._run(_cfg(store, tmp_path), DistEnv(CPU), seen.append)
    run = engine.resolve_run(_cfg(store, tmp_path), DistEnv(CPU))
    run_dir = tmp_path / "runs" / "r"
    [call] = epochs.calls
    assert call.run == run and call.run_dir == run_dir and call.start == 0 and call.history == []
    assert call.net is call.state.model and call.on_epoch == seen.append and call.data.fingerprint == fp
    assert len(call.run_id) == 32
    [(args, _)] = claims
    assert args[1:] == (run_dir, run.config, None)
    [(args, _)] = builds
    assert args[0] == run and args[1] is call.state.data_generator and args[2:] == (None, None)
    assert starts == [((run_dir, run, True, call.run_id, fp), {})]
    assert inits == []
    assert summary == {"run_dir": str(run_dir), "epochs": 3, "data_fingerprint": fp, "max_test_acc": 0.25,
                       "final_test_acc": 0.25, "final_epoch": 2}
    assert json.loads((run_dir / "config.json").read_text())["data_fingerprint"] == fp


def test_init_weights_are_read_for_the_runs_network_and_built_in(store, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    Epochs(monkeypatch)
    src = tmp_path / "w" / "init.pt"
    src.parent.mkdir()
    torch.manual_seed(3)
    model = build_model(4, "multistep", "plif", "torch", 3.0, False)
    save_run_checkpoint(src, model, engine.resolve_run(_cfg(store, tmp_path, neuron="plif", tau=3.0),
                                                       DistEnv(CPU)).config, FP)
    reads = spy(monkeypatch, engine, "read_init_weights")
    builds = spy(monkeypatch, engine, "_build_training")
    engine._run(_cfg(store, tmp_path, neuron="plif", tau=3.0, init=str(src)), DistEnv(CPU), None)
    assert reads == [((str(src), 4, "multistep", "plif", 3.0), {})]
    [(args, _)] = builds
    init = args[3]
    assert args[2] is None and init is not None and init.source == "dvsg-train"
    assert all(torch.equal(init.state[k], v) for k, v in model.state_dict().items())
    assert f"starting from the weights of {src} (dvsg-train checkpoint)" in [r.getMessage() for r in caplog.records]


def _resume_from(store, fp, tmp_path, epoch: int, env: DistEnv = DistEnv(CPU), **kw) -> tuple[TrainConfig, Path]:
    """A checkpoint after ``epoch`` of a run on ``env`` (an untrained network), and the config resuming it."""
    run = engine.resolve_run(_cfg(store, tmp_path, **kw), env)
    ckpt = tmp_path / "runs" / "r" / LATEST
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_run_checkpoint(ckpt, build_model(4, "multistep", "lif", "torch", 2.0, False), run.config, fp, epoch=epoch)
    return _cfg(store, tmp_path, resume=str(ckpt), **kw), ckpt


def test_a_resumed_run_restores_the_checkpoint_and_goes_on(store, fp, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    config, ckpt = _resume_from(store, fp, tmp_path, 0)
    epochs = Epochs(monkeypatch)
    restores, builds, starts, claims = (spy(monkeypatch, engine, n) for n in (
        "restore_state", "_build_training", "_start_run_folder", "_claim_run_folder"))
    inits = spy(monkeypatch, engine, "read_init_weights")
    saved = load_checkpoint(ckpt)
    summary = engine._run(config, DistEnv(CPU), None)
    [call] = epochs.calls
    assert call.start == 1 and [r["epoch"] for r in call.history] == [0]
    assert call.run_id == saved["run"]["id"]
    [(args, kw)] = restores
    assert args[0]["run"] == saved["run"] and args[1:] == (str(ckpt), call.state) and kw == {"data_only_rng": False}
    [(args, _)] = builds
    assert args[2]["run"] == saved["run"] and args[3] is None
    assert starts == [((ckpt.parent, call.run, False, saved["run"]["id"], fp), {})]
    assert claims[0][0][2] == call.run.config and inits == []
    assert f"resuming from {ckpt} after epoch 0" in [r.getMessage() for r in caplog.records]
    assert summary["epochs"] == 3 and summary["data_fingerprint"] == fp


def test_a_resumed_run_never_reads_init_weights(store, fp, tmp_path, monkeypatch):
    config, ckpt = _resume_from(store, fp, tmp_path, 0)
    Epochs(monkeypatch)
    monkeypatch.setattr(engine, "read_init_weights", lambda *a: pytest.fail("--init read on resume"))
    builds = spy(monkeypatch, engine, "_build_training")
    engine._run(dataclasses.replace(config, init=str(ckpt)), DistEnv(CPU), None)
    assert builds[0][0][3] is None


def test_a_checkpoint_of_the_last_epoch_has_nothing_to_train(store, fp, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    config, ckpt = _resume_from(store, fp, tmp_path, 2)
    epochs = Epochs(monkeypatch)
    summary = engine._run(config, DistEnv(CPU), None)
    assert epochs.calls == []
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-2:] == [f"resuming from {ckpt} after epoch 2", "checkpoint already at epoch 2 of 3; nothing to train"]
    assert summary == {"run_dir": str(ckpt.parent), "epochs": 3, "data_fingerprint": fp, "max_test_acc": 0.25,
                       "final_test_acc": 0.25, "final_epoch": 2}


def test_a_checkpoint_one_epoch_short_trains_the_last(store, fp, tmp_path, monkeypatch):
    config, _ = _resume_from(store, fp, tmp_path, 1)
    epochs = Epochs(monkeypatch)
    assert engine._run(config, DistEnv(CPU), None)["epochs"] == 3
    assert [c.start for c in epochs.calls] == [2]


def _collectives(monkeypatch, barriers: list) -> None:
    """A 2-rank run seen from rank 0, each collective its own part: results are rank 0's, every
    rank holds the same store."""
    monkeypatch.setattr(distributed, "on_main", lambda env, fn: fn())
    monkeypatch.setattr(distributed, "agree", lambda env, fn: fn())
    monkeypatch.setattr(distributed, "all_gather_object", lambda env, obj: [obj, obj])
    monkeypatch.setattr(distributed, "wrap_model", lambda env, model: ("ddp", model))
    monkeypatch.setattr(distributed, "convert_sync_batchnorm", lambda model, device: model)
    monkeypatch.setattr(distributed, "barrier", barriers.append)


@pytest.mark.parametrize("sync_bn,suffix", [(False, ""), (True, ", SyncBatchNorm")])
def test_a_ddp_run_says_its_batches_and_ends_at_a_barrier(store, fp, tmp_path, monkeypatch, caplog, sync_bn, suffix):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    barriers = []
    _collectives(monkeypatch, barriers)
    epochs = Epochs(monkeypatch)
    env = _ddp(0)
    engine._run(_cfg(store, tmp_path, batch_size=3, sync_bn=sync_bn), env, None)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("DDP")] == [
        f"DDP over 2 processes: -b 3 per process, global batch 6{suffix}"]
    assert barriers == [env]
    [call] = epochs.calls
    assert call.net == ("ddp", call.state.model)


def test_a_resumed_ddp_run_restores_only_the_data_order(store, fp, tmp_path, monkeypatch):
    """Under DDP each rank reseeds its dropout RNG per epoch, so only the data-order RNG is restored."""
    config, ckpt = _resume_from(store, fp, tmp_path, 0, _ddp(0))
    _collectives(monkeypatch, [])
    Epochs(monkeypatch)
    restores = spy(monkeypatch, engine, "restore_state")
    engine._run(config, _ddp(0), None)
    assert [kw for _, kw in restores] == [{"data_only_rng": True}]

