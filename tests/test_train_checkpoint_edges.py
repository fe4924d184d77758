"""dvsg_train.checkpoint at its edges (issue 20, the checkpoint cluster's mutation survivors):
`restore_state` putting back every state (scheduler, GradScaler, each RNG, data_only), the
builder's None / present states, the exact one-line refusals of `load_model_state`,
`restore_state`, the run record's checks, `check_resume`, `check_data` and a locked checkpoint,
`_size`'s units at their boundaries (through `check_tensor_sizes`), and the CUDA RNG states on a
stand-in torch.cuda (this suite must run without a GPU)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import uuid

import pytest
import torch

from dvsprep.atomic import output_lock
from dvsprep.errors import OutputLockedError
from dvsg_train.checkpoint import (
    FORMAT,
    REQUIRED_KEYS,
    TrainingState,
    check_data,
    check_resume,
    checkpoint_config,
    checkpoint_from,
    check_tensor_sizes,
    load_checkpoint,
    load_model_state,
    make_payload,
    network_state,
    restore_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_mismatch,
    validate_checkpoint,
)
from dvsg_train.config import TrainConfig
from dvsg_train.errors import CheckpointError, ConfigError, ConfigMismatchError, DataMismatchError
from dvsg_train.model import build_model

from previous_output import lay_previous, tree

RECORD = {"epoch": 0, "lr": 0.1, "train_loss": 0.5, "train_acc": 0.25, "val_loss": None, "val_acc": None,
          "test_loss": 0.75, "test_acc": 0.125, "max_test_acc": 0.125, "epoch_seconds": 0.4,
          "train_samples_per_s": 70.0}
NETWORK_4 = "{'channels': 4, 'net': 'multistep', 'neuron': 'lif', 'tau': 2.0}"
NOT_FIT = "optimizer/scheduler/RNG state does not fit this run"


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """These tests set torch's global CPU RNG on purpose; the tests after them get it back."""
    with torch.random.fork_rng(devices=[]):
        yield


def _state(*, scheduler: bool = True, scaler: bool = False, seed: int = 3) -> TrainingState:
    model = build_model(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if scheduler else None
    scl = torch.amp.GradScaler("cpu") if scaler else None
    return TrainingState(model, optimizer, sched, scl, torch.Generator().manual_seed(seed))


def _config(tmp_path) -> TrainConfig:
    return TrainConfig(data=str(tmp_path), channels=4, opt="sgd", lr=0.1, lr_scheduler="steplr", step_size=1,
                       gamma=0.5, epochs=3)


def _saved(tmp_path, state: TrainingState) -> dict:
    """``state`` through make_payload, save_checkpoint and load_checkpoint (validated)."""
    payload = make_payload(state, epoch=0, config=_config(tmp_path), data_fingerprint="ab" * 32,
                           history=[dict(RECORD)], run_id=uuid.uuid4().hex, run_dir=tmp_path / "R")
    save_checkpoint(tmp_path / "c.pt", payload)
    return load_checkpoint(tmp_path / "c.pt")


def _trained(seed: int = 3) -> TrainingState:
    """A state one SGD step and one StepLR step on: momentum buffers, lr 0.1 * 0.5, a GradScaler of
    scale 64 with its own growth interval."""
    state = _state(scaler=True, seed=seed)
    state.scaler = torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=7)
    for p in state.model.parameters():
        p.grad = torch.ones_like(p)
    state.optimizer.step()
    state.scheduler.step()
    return state


# ----------------------------------------------------------------------------- restore_state

def test_restore_state_puts_back_scheduler_scaler_and_every_rng(tmp_path):
    saved = _trained()
    torch.manual_seed(11)
    cpu_rng = torch.get_rng_state()             # what make_payload records as rng['torch']
    ckpt = _saved(tmp_path, saved)
    assert torch.equal(ckpt["rng"]["torch"], cpu_rng)
    other = _state(scaler=True, seed=5)
    torch.manual_seed(99)                        # the resuming process has drawn from another state
    history, start = restore_state(ckpt, tmp_path / "c.pt", other)
    assert (history, start) == ([RECORD], 1)
    assert torch.equal(torch.get_rng_state(), cpu_rng)                      # data_only_rng defaults to False
    assert torch.equal(other.data_generator.get_state(), torch.Generator().manual_seed(3).get_state())
    assert other.scheduler.last_epoch == 1 and other.scheduler.get_last_lr() == [0.05]
    assert other.optimizer.param_groups[0]["lr"] == 0.05
    # momentum buffers after one step of grad 1 from none: the gradient itself
    bufs = [other.optimizer.state[p]["momentum_buffer"] for p in other.model.parameters()]
    assert len(bufs) == len(list(saved.model.parameters())) and all(torch.equal(b, torch.ones_like(b)) for b in bufs)
    assert other.scaler.state_dict() == {"scale": 64.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                         "growth_interval": 7, "_growth_tracker": 0}


def test_restore_state_data_only_rng_leaves_the_global_rng(tmp_path):
    torch.manual_seed(11)
    ckpt = _saved(tmp_path, _state(seed=4))
    other = _state(seed=5)                       # (building a model draws from the global RNG)
    torch.manual_seed(99)
    now = torch.get_rng_state()
    restore_state(ckpt, tmp_path / "c.pt", other, data_only_rng=True)
    assert torch.equal(torch.get_rng_state(), now) and not torch.equal(now, ckpt["rng"]["torch"])
    assert torch.equal(other.data_generator.get_state(), torch.Generator().manual_seed(4).get_state())


def test_no_scheduler_no_scaler_both_ways(tmp_path):
    with_scaler = make_payload(_trained(), epoch=0, config=_config(tmp_path), data_fingerprint="ab" * 32,
                               history=[dict(RECORD)], run_id="0" * 32, run_dir=tmp_path / "R")
    assert with_scaler["scaler"] == {"scale": 64.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                     "growth_interval": 7, "_growth_tracker": 0}
    assert with_scaler["scheduler"]["last_epoch"] == 1
    bare = _state(scheduler=False)
    ckpt = _saved(tmp_path, bare)
    assert ckpt["scheduler"] is None and ckpt["scaler"] is None
    other = _state(scheduler=False)
    assert restore_state(ckpt, tmp_path / "c.pt", other) == ([RECORD], 1)


def test_restore_state_refusals_name_the_file_and_the_first_line(tmp_path):
    path = tmp_path / "c.pt"
    ckpt = _saved(tmp_path, _state())
    with pytest.raises(CheckpointError) as e:
        restore_state(ckpt, path, dataclasses.replace(_state(), model=build_model(8)))
    assert str(e.value) == (f"{path}: model weights do not fit the network {NETWORK_4} (size mismatch for "
                            f"conv_fc.0.weight: shape (4, 2, 3, 3) in the checkpoint, (8, 2, 3, 3) in the network)")

    # a real scheduler whose loaded state names a mode of 200 letters: torch's one-line ValueError,
    # "mode mmm... is unknown!", cut to its first 160 characters
    state = _state(scheduler=False)
    state.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(state.optimizer)
    bad = {**ckpt, "scheduler": {**state.scheduler.state_dict(), "mode": "m" * 200 + "\nsecond line"}}
    with pytest.raises(CheckpointError) as e:
        restore_state(bad, path, state)
    assert str(e.value) == f"{path}: {NOT_FIT} (mode {'m' * 155})"

    class Silent:                       # a state whose load raises with no message at all
        def load_state_dict(self, _):
            raise ValueError()

    state = _state(scheduler=False)
    state.scheduler = Silent()
    with pytest.raises(CheckpointError) as e:
        restore_state(ckpt, path, state)
    assert str(e.value) == f"{path}: {NOT_FIT} ()"


# ----------------------------------------------------------------------------- load_model_state

def test_load_model_state_says_the_line_of_torch_that_names_the_layer(tmp_path):
    ckpt = _saved(tmp_path, _state())
    model = build_model(4)
    sparse = {**ckpt, "model": {**ckpt["model"], "conv_fc.0.weight": ckpt["model"]["conv_fc.0.weight"].to_sparse()}}
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, sparse, "c.pt")
    # torch: "Error(s) in loading state_dict for MultiStepNet:\n\tWhile copying ...": its 2nd line, 200 chars
    second = ('While copying the parameter named "conv_fc.0.weight", whose dimensions in the model are '
              'torch.Size([4, 2, 3, 3]) and whose dimensions in the checkpoint are torch.Size([4, 2, 3, 3]), '
              'an exception occurred : (\'copy_() between dense and sparse Tensors is not implemented! Found '
              'self type')
    assert len(second[:200]) == 200
    assert str(e.value) == f"c.pt: model weights do not fit the network {NETWORK_4} ({second[:200]})"


@pytest.mark.parametrize("exc, detail", [(RuntimeError("  the only line  "), "the only line"),
                                         (TypeError("first\n\n  second  \nthird"), "second"),
                                         (KeyError(), "KeyError")])
def test_load_model_state_detail_of_one_two_or_no_lines(tmp_path, monkeypatch, exc, detail):
    ckpt = _saved(tmp_path, _state())
    model = build_model(4)

    def refuse(state_dict):
        raise exc

    monkeypatch.setattr(model, "load_state_dict", refuse)
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, ckpt, "c.pt")
    assert str(e.value) == f"c.pt: model weights do not fit the network {NETWORK_4} ({detail})"


# ----------------------------------------------------------------------------- sizes in messages

@pytest.mark.parametrize("n, shown", [
    (9_999, "9999 bytes"), (10_000, "0.01 MB"),                    # bytes below 10 000
    (1_005_001, "1.01 MB"),                                         # 1.005001 MB, 3 significant digits
    (99_999_999_999, "1e+05 MB"), (100_000_000_000, "1e+11 bytes"),  # MB below 1e11 bytes
])
def test_sizes_in_refusals_switch_units_at_their_boundaries(n, shown):
    expanded = torch.zeros(1, dtype=torch.uint8).expand(n)      # n bytes declared from 1 stored
    with pytest.raises(CheckpointError) as e:
        check_tensor_sizes([("w", expanded)], "c.pt", 2 ** 63)
    assert str(e.value) == (f"c.pt: tensor w declares shape ({n},) ({shown}) from 1 bytes of data (an expanded "
                            f"or overlapping tensor): not a checkpoint of real weights")


# ----------------------------------------------------------------------------- CUDA RNG states

class FakeCuda:
    """torch.cuda's RNG functions for ``count`` GPUs, as torch defines them (get_rng_state_all:
    one state per device; set_rng_state_all: enumerate the states), on tensors kept here.
    Unavailable: every getter and setter raises, as torch does without CUDA."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, available: bool = True):
        self.count, self.available = count, available
        self.states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count if available else 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.get(i) for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_all)

    def _index(self, device) -> int:
        if not self.available:
            raise AssertionError("Torch not compiled with CUDA enabled")
        if isinstance(device, int):
            return device
        if isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
            return device.index
        raise AttributeError(f"not a CUDA device: {device!r}")

    def get(self, device) -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_all(self, new_states) -> None:
        for i, s in enumerate(new_states):
            self.states[self._index(i)] = s


def test_rng_state_saves_no_cuda_state_without_cuda(monkeypatch):
    FakeCuda(monkeypatch, 2, available=False)
    assert rng_state(torch.Generator(), torch.device("cuda", 1))["cuda"] == []
    assert rng_state(torch.Generator())["cuda"] == []


def test_rng_state_saves_one_gpu_or_all(monkeypatch):
    FakeCuda(monkeypatch, 3)
    one = rng_state(torch.Generator(), torch.device("cuda", 1))["cuda"]
    assert len(one) == 1 and torch.equal(one[0], torch.full((16,), 2, dtype=torch.uint8))
    every = rng_state(torch.Generator())["cuda"]
    assert [int(t[0]) for t in every] == [1, 2, 3]


def test_make_payload_saves_the_given_gpu_only(tmp_path, monkeypatch):
    FakeCuda(monkeypatch, 2)
    payload = make_payload(_state(), epoch=0, config=_config(tmp_path), data_fingerprint="ab" * 32,
                           history=[dict(RECORD)], run_id="0" * 32, run_dir=tmp_path / "R",
                           cuda_device=torch.device("cuda", 1))
    assert [int(t[0]) for t in payload["rng"]["cuda"]] == [2]


def test_set_rng_state_restores_the_gpus_there_are(monkeypatch):
    cuda = FakeCuda(monkeypatch, 2)
    g = torch.Generator().manual_seed(7)
    saved = {"torch": torch.manual_seed(5).get_state(), "data": g.get_state(),
             "cuda": [torch.full((16,), v, dtype=torch.uint8) for v in (40, 50, 60)]}   # saved on 3 GPUs
    seed6 = torch.manual_seed(6).get_state()
    g.manual_seed(8)
    set_rng_state(saved, g, data_only=True)            # the data order only: CPU and GPUs left as they are
    assert torch.equal(g.get_state(), saved["data"]) and torch.equal(torch.get_rng_state(), seed6)
    assert [int(cuda.states[i][0]) for i in range(2)] == [1, 2]
    g.manual_seed(8)
    set_rng_state(saved, g)                            # all of them (the default): the first 2 GPUs' states
    assert torch.equal(g.get_state(), saved["data"]) and torch.equal(torch.get_rng_state(), saved["torch"])
    assert [int(cuda.states[i][0]) for i in range(2)] == [40, 50]


# ----------------------------------------------------------------------------- the run record

GOOD_ID = "0123456789abcdef" * 2
BAD_RUNS = {
    "extra key": ({"id": GOOD_ID, "name": "R", "dir": "/r", "x": 1}, "run must be a dict of id, name and dir"),
    "a list": (["id", "name", "dir"], "run must be a dict of id, name and dir"),
    "id of 31 digits": ({"id": GOOD_ID[:31], "name": "R", "dir": "/r"}, "run id is not 32 hex digits"),
    "id of 33 digits": ({"id": GOOD_ID + "0", "name": "R", "dir": "/r"}, "run id is not 32 hex digits"),
    "id upper case": ({"id": GOOD_ID.upper(), "name": "R", "dir": "/r"}, "run id is not 32 hex digits"),
    **{f"name {n!r}": ({"id": GOOD_ID, "name": n, "dir": "/r"}, f"run name {n!r} is not a folder name")
       for n in ("", ".", "..", "a/b", "a\\b", "a\0b", 5)},
    "dir an int": ({"id": GOOD_ID, "name": "R", "dir": 5}, "run dir is not a path"),
    "dir with a NUL": ({"id": GOOD_ID, "name": "R", "dir": "/r\0x"}, "run dir is not a path"),
}


@pytest.mark.parametrize("case", BAD_RUNS)
def test_run_record_refusals(tmp_path, case):
    run, what = BAD_RUNS[case]
    ckpt = _saved(tmp_path, _state())
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint({**ckpt, "run": run}, tmp_path / "c.pt")
    assert str(e.value) == f"{tmp_path / 'c.pt'}: checkpoint {what}"


@pytest.mark.parametrize("name", ["...", "a.b", "R"])
def test_run_names_next_to_the_refused_ones_pass(tmp_path, name):
    ckpt = _saved(tmp_path, _state())
    validate_checkpoint({**ckpt, "run": {"id": GOOD_ID, "name": name, "dir": ""}}, tmp_path / "c.pt")


# ----------------------------------------------------------------------------- resume and data checks

def test_check_resume_names_every_difference_and_the_epochs_done(tmp_path):
    saved = _config(tmp_path)
    ckpt = {"config": saved.to_dict(), "epoch": 2}
    with pytest.raises(ConfigMismatchError) as e:
        check_resume(ckpt, "c.pt", TrainConfig(**{**saved.to_dict(), "channels": 8, "lr": 0.2}))
    assert str(e.value) == ("c.pt: checkpoint was trained with another configuration "
                            "(checkpoint vs this run: channels 4 vs 8; lr 0.1 vs 0.2)")
    check_resume(ckpt, "c.pt", saved)                           # 3 epochs done of --epochs 3
    with pytest.raises(ConfigMismatchError) as e:
        check_resume(ckpt, "c.pt", TrainConfig(**{**saved.to_dict(), "epochs": 2}))
    assert str(e.value) == ("c.pt: the run has done 3 epochs; --epochs 2 would end it before that "
                            "(give --epochs 3 or more, or leave it out)")
    check_resume({"config": saved.to_dict()}, "c.pt", saved)    # no epoch recorded: none done
    with pytest.raises(CheckpointError) as e:
        check_resume({"config": {**saved.to_dict(), "channels": 0}, "epoch": 0}, "c.pt", saved)
    assert str(e.value) == "c.pt: checkpoint holds an invalid config (channels must be a positive integer, got 0)"


def test_check_data_shows_16_digits_of_each_fingerprint():
    with pytest.raises(DataMismatchError) as e:
        check_data({"data_fingerprint": "0123456789abcdef" * 4}, "c.pt", "fedcba9876543210" * 4, "d.zarr")
    assert str(e.value) == ("c.pt: checkpoint was trained on a store with fingerprint 0123456789abcdef, "
                            "but d.zarr has fedcba9876543210")


def test_a_checkpoint_being_written_is_refused_by_name(tmp_path):
    path = tmp_path / "c.pt"
    payload = make_payload(_state(), epoch=0, config=_config(tmp_path), data_fingerprint="ab" * 32,
                           history=[dict(RECORD)], run_id=GOOD_ID, run_dir=tmp_path)
    with output_lock(path, "trainer"):          # another writer of the same run holds it
        with pytest.raises(OutputLockedError) as e:
            save_checkpoint(path, payload)
    assert str(e.value) == (f"{path}: checkpoint is being written by another process (pid {os.getpid()}); "
                            f"wait for it to finish")
    assert not path.exists()
    before = lay_previous(path)       # checkpoints are replaced by design: the previous one stays whole
    with output_lock(path, "trainer"):
        with pytest.raises(OutputLockedError):
            save_checkpoint(path, payload)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- rng and history records

U8 = torch.zeros(16, dtype=torch.uint8)
BAD_RNGS = {
    "extra key": (lambda r: {**r, "x": U8}, "rng must be a dict of torch, cuda and data states"),
    "cuda a stacked tensor": (lambda r: {**r, "cuda": torch.zeros(2, 16, dtype=torch.uint8)},
                              "rng cuda states must be a list of uint8 tensors"),
    "cuda of float": (lambda r: {**r, "cuda": [U8, torch.zeros(16)]}, "rng cuda states must be a list of uint8 tensors"),
    "cuda of 2-d": (lambda r: {**r, "cuda": [U8.view(2, 8)]}, "rng cuda states must be a list of uint8 tensors"),
    "cuda of numbers": (lambda r: {**r, "cuda": [5]}, "rng cuda states must be a list of uint8 tensors"),
}


@pytest.mark.parametrize("case", BAD_RNGS)
def test_rng_record_refusals(tmp_path, case):
    change, what = BAD_RNGS[case]
    ckpt = _saved(tmp_path, _state())
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint({**ckpt, "rng": change(ckpt["rng"])}, tmp_path / "c.pt")
    assert str(e.value) == f"{tmp_path / 'c.pt'}: checkpoint {what}"


def test_cuda_states_of_a_gpu_run_pass(tmp_path):
    ckpt = _saved(tmp_path, _state())
    validate_checkpoint({**ckpt, "rng": {**ckpt["rng"], "cuda": [U8, U8.clone()]}}, tmp_path / "c.pt")


ABOVE_1, BELOW_0 = math.nextafter(1.0, 2.0), math.nextafter(0.0, -1.0)
BAD_HISTORY = {
    "2 records for 1 epoch": (lambda h: h + [{**h[0], "epoch": 1}], "history must list the 1 finished epochs, found 2"),
    "an int key": (lambda h: [{**h[0], 7: 0.5}], "history[0] is not a dict of named numbers"),
    "2 keys missing": (lambda h: [{k: v for k, v in h[0].items() if k not in ("train_loss", "test_acc")}],
                       "history[0] lacks train_loss, test_acc"),
    **{f"{k} above 1": (lambda h, k=k: [{**h[0], k: ABOVE_1}],
                        f"history[0][{k!r}] = {ABOVE_1!r} is not an accuracy in [0, 1]")
       for k in ("train_acc", "test_acc", "val_acc", "max_test_acc")},
    "test_acc 1.5": (lambda h: [{**h[0], "test_acc": 1.5}], "history[0]['test_acc'] = 1.5 is not an accuracy in [0, 1]"),
    "val_acc below 0": (lambda h: [{**h[0], "val_acc": BELOW_0}],
                        f"history[0]['val_acc'] = {BELOW_0!r} is not an accuracy in [0, 1]"),
    **{f"{k} None": (lambda h, k=k: [{**h[0], k: None}], f"history[0][{k!r}] is missing a value")
       for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
}


@pytest.mark.parametrize("case", BAD_HISTORY)
def test_history_record_refusals(tmp_path, case):
    change, what = BAD_HISTORY[case]
    ckpt = _saved(tmp_path, _state())
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint({**ckpt, "history": change(ckpt["history"])}, tmp_path / "c.pt")
    assert str(e.value) == f"{tmp_path / 'c.pt'}: checkpoint {what}"


@pytest.mark.parametrize("acc", [0.0, 1.0])
def test_accuracies_of_0_and_1_pass(tmp_path, acc):
    ckpt = _saved(tmp_path, _state())
    record = {**RECORD, "train_acc": acc, "test_acc": acc, "val_acc": acc, "max_test_acc": acc}
    validate_checkpoint({**ckpt, "history": [record]}, tmp_path / "c.pt")


# ----------------------------------------------------------------------------- weights against the network

def test_validation_itself_refuses_weights_of_another_shape(tmp_path):
    ckpt = _saved(tmp_path, _state())
    model = {**ckpt["model"], "conv_fc.4.weight": torch.zeros(4, 8, 3, 3)}
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint({**ckpt, "model": model}, tmp_path / "c.pt")
    assert str(e.value) == (f"{tmp_path / 'c.pt'}: model weights do not fit the network {NETWORK_4} (size mismatch "
                            f"for conv_fc.4.weight: shape (4, 8, 3, 3) in the checkpoint, (4, 4, 3, 3) in the network)")


def test_network_state_defaults_and_unknown_nets():
    names = list(network_state({"channels": 4, "neuron": "lif", "tau": 2.0}))     # no linear_bias: none
    assert [n for n in names if n.startswith(("conv_fc.22.", "conv_fc.25."))] == ["conv_fc.22.weight",
                                                                                  "conv_fc.25.weight"]
    with pytest.raises(ConfigError, match="unknown net 'bogus'"):
        network_state({"channels": 4, "net": "bogus", "neuron": "lif", "tau": 2.0})


Z = torch.zeros(1)
NET = {"a": Z, "b": Z, "c": Z, "d": Z}


@pytest.mark.parametrize("state, problem", [
    ({"d": Z}, "missing a, b, c"),                                       # 3 missing: all named
    ({}, "missing a, b, c ..."),                                         # 4: three and a mark
    ({**NET, "e": Z, "f": Z, "g": Z}, "unexpected e, f, g"),
    ({**NET, "e": Z, "f": Z, "g": Z, "h": Z}, "unexpected e, f, g ..."),
    ({**NET, "b": torch.zeros(1, dtype=torch.int64)}, "b holds torch.int64, the network torch.float32"),
    ({**NET, "c": torch.zeros(1, dtype=torch.complex64)}, "c holds torch.complex64, the network torch.float32"),
    ({**NET, "a": torch.zeros(1, dtype=torch.float16)}, None),           # another float width loads
])
def test_state_mismatch_phrases(state, problem):
    assert state_mismatch(state, NET) == problem


# ----------------------------------------------------------------------------- the payload's tree and fields

def _nest_lists(n: int):
    return 1 if n == 0 else [_nest_lists(n - 1)]


def _nest_dicts(n: int):
    return 1 if n == 0 else {"a": _nest_dicts(n - 1)}


BAD_PAYLOADS = {
    # the payload is depth 0, its scheduler 1: a value at depth 9 is one level too deep
    "lists 9 deep": (lambda c: {**c, "scheduler": {"x": _nest_lists(7)}},
                     "checkpoint payload['scheduler']['x']" + "[0]" * 7 + " is nested deeper than 8 levels"),
    "dicts 9 deep": (lambda c: {**c, "scheduler": _nest_dicts(8)},
                     "checkpoint payload['scheduler']" + "['a']" * 8 + " is nested deeper than 8 levels"),
    "a float key": (lambda c: {**c, "scheduler": {1.5: 1}}, "checkpoint payload['scheduler'] has a key of type float"),
    "bytes in a list": (lambda c: {**c, "scheduler": {"x": [1, b"ab"]}},
                        "checkpoint payload['scheduler']['x'][1] holds a bytes"),
    "an expanded tensor in a list": (lambda c: {**c, "scheduler": {"x": [torch.zeros(1).expand(100)]}},
                                     "tensor payload['scheduler']['x'][0] declares shape (100,) (400 bytes) from "
                                     "4 bytes of data (an expanded or overlapping tensor): not a checkpoint of real "
                                     "weights"),
    "another format": (lambda c: {**c, "format": "dvsg-train-checkpoint/1"},
                       "checkpoint payload is not a dvsg-train-checkpoint/2 dict"),
    "2 keys missing": (lambda c: {k: v for k, v in c.items() if k not in ("optimizer", "rng")},
                       "checkpoint lacks optimizer, rng"),
    "version a number": (lambda c: {**c, "version": 2}, "checkpoint version is not a string"),
    "epoch = epochs": (lambda c: {**c, "epoch": 3, "history": [{**RECORD, "epoch": i} for i in range(4)]},
                       "checkpoint epoch 3 is not an epoch of its run (0 to 2)"),
    "model empty": (lambda c: {**c, "model": {}}, "checkpoint model is not a state dict of named tensors"),
    "optimizer state a list": (lambda c: {**c, "optimizer": {"state": [], "param_groups": []}},
                               "checkpoint optimizer is not an optimizer state dict"),
    "optimizer groups of numbers": (lambda c: {**c, "optimizer": {"state": {}, "param_groups": [1]}},
                                    "checkpoint optimizer is not an optimizer state dict"),
    "config with an int key": (lambda c: {**c, "config": {**c["config"], 5: 1}}, "checkpoint config is not a dict"),
    "fingerprint upper case": (lambda c: {**c, "data_fingerprint": "AB" * 32},
                               "checkpoint data_fingerprint is not a sha256 hex string"),
}


@pytest.mark.parametrize("case", BAD_PAYLOADS)
def test_payload_refusals(tmp_path, case):
    change, what = BAD_PAYLOADS[case]
    ckpt = _saved(tmp_path, _state())
    with pytest.raises(CheckpointError) as e:
        validate_checkpoint(change(ckpt), tmp_path / "c.pt")
    assert str(e.value) == f"{tmp_path / 'c.pt'}: {what}"


@pytest.mark.parametrize("change", [
    lambda c: {**c, "scheduler": {"x": _nest_lists(6)}},            # depth 8: the deepest allowed
    lambda c: {**c, "scheduler": _nest_dicts(7)},
    lambda c: {**c, "epoch": 2, "history": [{**RECORD, "epoch": i} for i in range(3)]},   # the last epoch
], ids=["lists 8 deep", "dicts 8 deep", "epoch = epochs - 1"])
def test_payloads_next_to_the_refused_ones_pass(tmp_path, change):
    validate_checkpoint(change(_saved(tmp_path, _state())), tmp_path / "c.pt")


def _declared(value) -> int:
    """Bytes every tensor in ``value`` declares (numel x element size), walked here independently."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_declared(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_declared(v) for v in value)
    return 0


def test_tensors_must_fit_in_the_bytes_they_were_read_from(tmp_path):
    ckpt = _saved(tmp_path, _state())
    total = _declared(ckpt)
    validate_checkpoint(ckpt, tmp_path / "c.pt", total)
    with pytest.raises(CheckpointError, match=r": its tensors declare [0-9.]+ MB, more than the [0-9.]+ MB the "
                                              r"checkpoint holds \(tensors sharing their data\)"):
        validate_checkpoint(ckpt, tmp_path / "c.pt", total - 1)


def test_checkpoint_config_of_anything(tmp_path):
    with pytest.raises(CheckpointError) as e:
        checkpoint_config([1], "c.pt")
    assert str(e.value) == "c.pt: checkpoint config is not a dict"
    net = "x" * 300
    with pytest.raises(CheckpointError) as e:
        checkpoint_config({"config": {**_config(tmp_path).to_dict(), "net": net}}, "c.pt")
    first = f"net must be one of multistep, stepwise, got '{net}'"
    assert str(e.value) == f"c.pt: checkpoint holds an invalid config ({first[:200]})"


# ----------------------------------------------------------------------------- the container

def _container(data: bytes, **kw) -> dict:
    return {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
            "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8), **kw}


ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"     # sha256(b"abc"), FIPS 180-2
BAD_CONTAINERS = {
    "a long format": ({"format": "x" * 100}, f"not a dvsg-train checkpoint (format {'x' * 60!r}, expected {FORMAT!r})"),
    "8 keys": ({**_container(b"abc"), **{f"k{i}": 0 for i in range(5)}},
               "checkpoint container has keys ['format', 'k0', 'k1', 'k2', 'k3', 'k4'], "
               "expected ['format', 'payload', 'sha256']"),
    "digest upper case": ({**_container(b"abc"), "sha256": ABC.upper()}, "checkpoint digest is not a sha256 hex string"),
    "payload of floats": ({**_container(b"abc"), "payload": torch.zeros(3)}, "checkpoint payload is not a byte tensor"),
    "payload 2-d": ({**_container(b"abc"), "payload": torch.zeros(1, 3, dtype=torch.uint8)},
                    "checkpoint payload is not a byte tensor"),
    "payload expanded": ({**_container(b"abc"), "payload": torch.zeros(1, dtype=torch.uint8).expand(100)},
                         "tensor payload declares shape (100,) (100 bytes) from 1 bytes of data (an expanded or "
                         "overlapping tensor): not a checkpoint of real weights"),
    "another digest": ({**_container(b"abc"), "sha256": "0" * 64},
                       "checkpoint is corrupt: its payload has sha256 ba7816bf8f01cfea, but the checkpoint records "
                       "0000000000000000"),
}


@pytest.mark.parametrize("case", BAD_CONTAINERS)
def test_container_refusals(case):
    obj, what = BAD_CONTAINERS[case]
    with pytest.raises(CheckpointError) as e:
        checkpoint_from(obj, 10_000, "c.pt")
    assert str(e.value) == f"c.pt: {what}"


def test_payload_that_is_no_torch_file_and_tensors_sharing_data(tmp_path):
    with pytest.raises(CheckpointError) as e:
        checkpoint_from(_container(b"abc"), 10_000, "c.pt")
    assert str(e.value).startswith("c.pt: not a checkpoint (unreadable torch file: ")
    t = torch.zeros(1000)                       # stored once, declared twice: 8000 bytes from ~4 kB
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **{k: None for k in REQUIRED_KEYS if k != "format"}, "model": {"a": t, "b": t}}, buf)
    data = buf.getvalue()
    assert 4000 < len(data) < 8000
    with pytest.raises(CheckpointError, match=rf"^c\.pt: its tensors declare 8000 bytes, more than the {len(data)} "
                                              rf"bytes the checkpoint holds "):
        checkpoint_from(_container(data), 10 ** 6, "c.pt")


def test_sizes_up_to_the_bytes_read_pass():
    four = [("w", torch.zeros(4, dtype=torch.uint8))]
    check_tensor_sizes(four, "c.pt", 4)
    with pytest.raises(CheckpointError) as e:
        check_tensor_sizes(four, "c.pt", 3)
    assert str(e.value) == ("c.pt: its tensors declare 4 bytes, more than the 3 bytes the checkpoint holds (tensors "
                            "sharing their data): not a checkpoint of real weights")


def test_a_checkpoint_with_linear_biases_passes(tmp_path):
    state = _state()
    state.model = build_model(4, linear_bias=True)          # weights taken from SpikingJelly by --init
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=0.1, momentum=0.9)
    ckpt = _saved(tmp_path, state)
    assert "conv_fc.22.bias" in ckpt["model"] and "conv_fc.25.bias" in ckpt["model"]
