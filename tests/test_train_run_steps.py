"""The training run's steps before the first epoch, each called alone with exact values and no
training: `_previous_run` (the run folder's refusals, the checkpoint to continue), `_load_data`
(what it hands load_run_data, the seeds, the fingerprint checks, the log line) and
`_build_training` (model, optimizer, scheduler, scaler and the starting weights)."""
from __future__ import annotations

import dataclasses
import logging
import re

import pytest
import torch

from dvsg_train import distributed, engine
from dvsg_train.checkpoint import LATEST, load_checkpoint
from dvsg_train.config import TrainConfig
from dvsg_train.distributed import DistEnv
from dvsg_train.errors import ConfigError, ConfigMismatchError, DataMismatchError, TrainError
from dvsg_train.export.network import has_linear_bias, read_weights
from dvsg_train.model import build_model
from dvsprep.errors import InputOutputClashError, MissingFileError
from train_fixtures import STEP_T as T, STEP_TEST as N_TEST, STEP_TRAIN as N_TRAIN
from train_fixtures import fp, save_run_checkpoint, spy, step_config, store  # noqa: F401 (fixtures)

CPU = torch.device("cpu")


_cfg = step_config


def _run(config: TrainConfig, env: DistEnv | None = None) -> engine.ResolvedRun:
    return engine.resolve_run(config, env or DistEnv(CPU))


def _save(path, run: engine.ResolvedRun, fingerprint: str, *, epoch: int = 0, linear_bias: bool = False,
          seed: int = 0) -> torch.nn.Module:
    """A checkpoint of `run` after `epoch` (a seeded, untrained network); returns the network."""
    rc = run.config
    torch.manual_seed(seed)
    model = build_model(rc.channels, rc.net, rc.neuron, "torch", rc.tau, linear_bias)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_run_checkpoint(path, model, rc, fingerprint, epoch=epoch)
    return model


# ----------------------------------------------------------------------------- _previous_run

def test_a_fresh_run_has_no_previous_run(store, tmp_path):
    rc = _run(_cfg(store, tmp_path)).config
    assert engine._previous_run(rc, tmp_path / "runs" / "r") is None       # a folder not there yet
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "metrics.jsonl").write_text("")            # no checkpoint: not a run
    assert engine._previous_run(rc, tmp_path / "runs" / "r") is None
    root = tmp_path / "DATA"                                              # a DATA_ROOT: its T=3 store
    root.mkdir()
    (root / f"frames_T{T}_number.zarr").symlink_to(store, target_is_directory=True)
    assert engine._previous_run(_run(_cfg(root, tmp_path)).config, tmp_path / "runs" / "r") is None


def test_a_folder_holding_a_run_needs_resume_or_force(store, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / LATEST).write_bytes(b"x")
    with pytest.raises(TrainError) as err:
        engine._previous_run(_run(_cfg(store, tmp_path)).config, run_dir)
    assert str(err.value) == (f"{run_dir} already holds a run; continue it with --resume {run_dir / LATEST}, "
                              "start over with --force, or pick --run-name")
    assert engine._previous_run(_run(_cfg(store, tmp_path, force=True)).config, run_dir) is None
    assert (run_dir / LATEST).read_bytes() == b"x"                       # only looked at


def test_a_mistyped_data_path_is_said_before_the_folders_run(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / LATEST).write_bytes(b"x")
    with pytest.raises(MissingFileError, match=r"no such frame store"):
        engine._previous_run(_run(_cfg(tmp_path / "typo.zarr", tmp_path)).config, run_dir)


def test_the_run_folder_is_never_inside_the_store_nor_holding_the_init_weights(store, tmp_path):
    rc = _run(_cfg(store, tmp_path)).config
    with pytest.raises(InputOutputClashError) as err:
        engine._previous_run(rc, store / "runs")
    assert str(err.value) == (f"{store / 'runs'}: lies inside the input {store}; the training run would be "
                              "written into its own input")
    init = tmp_path / "w" / "init.pt"
    _save(init, _run(_cfg(store, tmp_path)), "ab" * 32)
    with pytest.raises(InputOutputClashError) as err:
        engine._previous_run(_run(_cfg(store, tmp_path, init=str(init))).config, tmp_path / "w")
    assert str(err.value) == f"{tmp_path / 'w'}: holds the input {init}; replacing it would destroy the input"
    assert engine._previous_run(_run(_cfg(store, tmp_path, init=str(init))).config, tmp_path / "v") is None


def test_resume_returns_the_checkpoint_checked_against_this_run(store, tmp_path):
    run = _run(_cfg(store, tmp_path))
    ckpt = tmp_path / "runs" / "r" / LATEST
    _save(ckpt, run, "ab" * 32, epoch=1)
    resumed = dataclasses.replace(run.config, resume=str(ckpt))
    got = engine._previous_run(resumed, ckpt.parent)
    want = load_checkpoint(ckpt)
    assert got["epoch"] == 1 and got["run"] == want["run"] and got["config"] == want["config"]
    assert got["model"].keys() == want["model"].keys()
    with pytest.raises(ConfigMismatchError, match=rf"^{re.escape(str(ckpt))}: checkpoint was trained with another "
                                                  r"configuration \(checkpoint vs this run: channels 4 vs 8\)$"):
        engine._previous_run(dataclasses.replace(resumed, channels=8), ckpt.parent)
    # resuming, the --init weights are not an input: a run folder holding them is fine
    assert engine._previous_run(dataclasses.replace(resumed, init=str(ckpt)), ckpt.parent)["epoch"] == 1


# ----------------------------------------------------------------------------- _load_data

def test_load_data_hands_the_configs_values_on_and_seeds_the_run(store, fp, tmp_path, monkeypatch):
    calls = spy(monkeypatch, engine, "load_run_data")
    run = _run(_cfg(store, tmp_path, seed=5, val_fraction=0.25, preload="cpu", data_fingerprint=fp[:12]))
    torch.manual_seed(99)
    data, gen = engine._load_data(run, None)
    assert calls == [((run.config.data,), {
        "T": T, "batch_size": 2, "device": CPU, "preload": "cpu", "val_fraction": 0.25, "seed": 5, "workers": 0,
        "generator": gen, "rank": 0, "world_size": 1, "local_world_size": 1, "expected_fingerprint": fp[:12]})]
    assert gen.initial_seed() == 5 and torch.initial_seed() == 5
    assert data.fingerprint == fp and data.test.n_samples == N_TEST
    # 23 train samples: 2 or 3 of each class; round(0.25 * 2) = 0 and round(0.25 * 3) = 1, at least one
    # of a class of two or more: 1 of each of the 11 classes
    assert (data.train.n_samples, data.val.n_samples) == (12, 11)


def test_load_data_logs_the_split_sizes(store, fp, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    run = _run(_cfg(store, tmp_path))
    engine._load_data(run, None)
    engine._load_data(_run(_cfg(store, tmp_path, val_fraction=0.25)), None)
    data_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data ")]
    assert data_lines == [f"data {run.config.data} (fingerprint {fp}): {N_TRAIN} train, 0 val, {N_TEST} test samples",
                          f"data {run.config.data} (fingerprint {fp}): 12 train, 11 val, {N_TEST} test samples"]


def test_a_store_that_changes_between_verify_and_open_is_refused(store, fp, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "_verify_store", lambda config: "f" * 64)
    run = _run(_cfg(store, tmp_path))
    with pytest.raises(DataMismatchError) as err:
        engine._load_data(run, None)
    assert str(err.value) == (f"{run.config.data}: the store changed while it was opened "
                              f"(fingerprint {'f' * 16} became {fp[:16]})")


@pytest.mark.parametrize("prints,other,theirs,rank0", [
    ("ab", 1, "e", "f"),          # two stores: exactly one other
    ("aaed", 2, "e", "f"),        # the first rank that differs from rank 0 is named
    ("eaa", 1, "f", "e"),         # rank 0 is the odd one: rank 1 differs from it
])
def test_ranks_with_different_stores_are_refused_naming_the_first_other(store, fp, tmp_path, monkeypatch,
                                                                         prints, other, theirs, rank0):
    """The fingerprints gathered from the ranks (a stand-in for the collective): "a" is this
    store's, "e" and "d" others'; `theirs` / `rank0`: "f" for this store's in the message."""
    full = {"a": fp, "b": "e" * 64, "e": "e" * 64, "d": "d" * 64}
    monkeypatch.setattr(distributed, "all_gather_object", lambda env, obj: [full[c] for c in prints])
    run = _run(_cfg(store, tmp_path))
    with pytest.raises(DataMismatchError) as err:
        engine._load_data(run, None)
    short = {"e": "e" * 16, "f": fp[:16]}
    assert str(err.value) == (f"{run.config.data}: rank {other} has a store with fingerprint {short[theirs]}, rank 0 "
                              f"one with {short[rank0]}: every machine must hold the same store")
    assert getattr(err.value, distributed.FAILED_RANK_ATTR) == other


def test_ranks_with_one_store_agree(store, fp, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "all_gather_object", lambda env, obj: [obj, obj])
    assert engine._load_data(_run(_cfg(store, tmp_path)), None)[0].fingerprint == fp


def test_augmentation_needs_the_stores_T(store, tmp_path):
    assert engine._load_data(_run(_cfg(store, tmp_path, augment="crop=3")), None)[0].store_T == T
    with pytest.raises(ConfigError) as err:
        engine._load_data(_run(_cfg(store, tmp_path, augment="crop=4")), None)
    assert str(err.value) == "--augment: crop=4 needs at least 4 time steps; the store has T=3"


def test_a_resumed_run_needs_the_checkpoints_store(store, fp, tmp_path):
    run = _run(_cfg(store, tmp_path, resume=str(tmp_path / "c.pt")))
    assert engine._load_data(run, {"data_fingerprint": fp})[0].fingerprint == fp
    with pytest.raises(DataMismatchError) as err:
        engine._load_data(run, {"data_fingerprint": "c" * 64})
    assert str(err.value) == (f"{tmp_path / 'c.pt'}: checkpoint was trained on a store with fingerprint "
                              f"{'c' * 16}, but {run.config.data} has {fp[:16]}")


# ----------------------------------------------------------------------------- _build_training

def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_a_fresh_start(store, tmp_path):
    run = _run(_cfg(store, tmp_path, lr=0.01, epochs=4, neuron="plif"))
    gen = torch.Generator()
    state = engine._build_training(run, gen)
    assert _layout(state.model) == _layout(build_model(4, "multistep", "plif", "torch", 2.0, False))
    assert all(p.device == CPU for p in state.model.parameters())
    assert type(state.optimizer) is torch.optim.Adam and state.optimizer.defaults["lr"] == 0.01
    assert type(state.scheduler) is torch.optim.lr_scheduler.CosineAnnealingLR and state.scheduler.T_max == 4
    assert state.scaler is None and state.data_generator is gen
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in state.model.modules())


@pytest.mark.parametrize("amp_dtype,scaler", [("fp16", True), ("bf16", False), (None, False)])
def test_a_grad_scaler_only_for_fp16(store, tmp_path, amp_dtype, scaler):
    run = _run(_cfg(store, tmp_path, amp=amp_dtype is not None, amp_dtype=amp_dtype))
    state = engine._build_training(run, torch.Generator())
    assert (state.scaler is not None) == scaler
    if scaler:
        assert type(state.scaler) is torch.amp.GradScaler and state.scaler._device == "cpu"


def test_linear_biases_follow_the_checkpoint_or_the_init_weights(store, tmp_path):
    run = _run(_cfg(store, tmp_path, opt="sgd", lr=0.5, momentum=0.25, neuron="plif"))
    biased = build_model(4, "multistep", "plif", "torch", 2.0, True).state_dict()
    state = engine._build_training(run, torch.Generator(), ckpt={"model": biased})
    assert _layout(state.model) == [(k, tuple(v.shape)) for k, v in biased.items()]
    assert type(state.optimizer) is torch.optim.SGD and state.optimizer.defaults["momentum"] == 0.25
    plain = build_model(4, "multistep", "plif", "torch", 2.0, False).state_dict()
    assert _layout(engine._build_training(run, torch.Generator(), ckpt={"model": plain}).model) == [
        (k, tuple(v.shape)) for k, v in plain.items()]


def test_init_weights_are_loaded_and_said(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    src = tmp_path / "w" / "init.pt"
    model = _save(src, _run(_cfg(store, tmp_path)), "ab" * 32, seed=11)
    init = read_weights(src)
    run = _run(_cfg(store, tmp_path, init=str(src)))
    state = engine._build_training(run, torch.Generator(), init=init)
    want = model.state_dict()
    got = state.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [r.getMessage() for r in caplog.records] == [
        f"starting from the weights of {src} (dvsg-train checkpoint)"]


def test_sync_batchnorm_only_when_asked_and_under_ddp(store, tmp_path, monkeypatch):
    converted = []
    monkeypatch.setattr(distributed, "convert_sync_batchnorm",
                        lambda model, device: converted.append(device) or model)
    ddp = DistEnv(CPU, rank=0, world_size=2, local_world_size=2)
    cases = [(_cfg(store, tmp_path, sync_bn=True), DistEnv(CPU)), (_cfg(store, tmp_path), ddp),
             (_cfg(store, tmp_path, sync_bn=True), ddp)]
    for config, env in cases:
        engine._build_training(engine.ResolvedRun(config, env, "torch", "r"), torch.Generator())
    assert converted == [CPU]


def test_a_machines_other_ranks_open_the_store_without_verifying_it_again(store, fp, tmp_path, monkeypatch):
    """Local rank 1 of a 2-process run (the collectives stand-ins: each rank's own call): local
    rank 0 verifies the store once per machine, the others open it and have nothing to compare."""
    monkeypatch.setattr(distributed, "agree", lambda env, fn: fn())
    monkeypatch.setattr(distributed, "all_gather_object", lambda env, obj: [fp, obj])
    monkeypatch.setattr(engine, "_verify_store", lambda config: pytest.fail("verified on local rank 1"))
    env = DistEnv(CPU, rank=1, world_size=2, local_rank=1, local_world_size=2)
    data, gen = engine._load_data(_run(_cfg(store, tmp_path, seed=3), env), None)
    assert data.fingerprint == fp and gen.initial_seed() == 3
    assert data.test.n_samples == N_TEST


def test_spikingjelly_init_weights_bring_their_linear_biases(store, tmp_path, caplog):
    """DVSGestureNet's Linear layers have biases: a run started from them has them too, loaded."""
    from dvsg_train.export.writer import export_checkpoint

    caplog.set_level(logging.INFO, logger="dvsg_train.engine")
    ours, sj = tmp_path / "w" / "c.pt", tmp_path / "net.pth"
    _save(ours, _run(_cfg(store, tmp_path, channels=128)), "ab" * 32, seed=5)
    export_checkpoint(ours, sj, "spikingjelly")
    init = read_weights(sj)
    assert init.linear_bias is True
    state = engine._build_training(_run(_cfg(store, tmp_path, channels=128, init=str(sj))), torch.Generator(),
                                   init=init)
    got = state.model.state_dict()
    assert has_linear_bias(got) and got.keys() == init.state.keys()
    assert all(torch.equal(got[k], init.state[k]) for k in init.state)
    assert [r.getMessage() for r in caplog.records] == [
        f"starting from the weights of {sj} (spikingjelly checkpoint)"]
