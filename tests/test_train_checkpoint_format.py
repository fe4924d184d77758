"""The checkpoint format both ways: `make_payload` builds what `validate_checkpoint` accepts, and a
checkpoint written the way dvsg-train wrote them before the builder moved into
dvsg_train.checkpoint (spelled out here by hand, independent of the package's writer) still
resumes."""
from __future__ import annotations

import hashlib
import io
import uuid

import pytest
import torch
from click.testing import CliRunner

from dvsg_train.checkpoint import (
    FORMAT,
    REQUIRED_KEYS,
    TrainingState,
    load_checkpoint,
    make_payload,
    restore_state,
    save_checkpoint,
    validate_checkpoint,
)
from dvsg_train.cli import train_main
from dvsg_train.config import TrainConfig
from dvsg_train.errors import CheckpointError
from dvsg_train.model import build_model

from train_fixtures import make_learnable_store

# the payload keys and the container keys of format 2, as the files on users' disks have them
PAYLOAD_KEYS = {"format", "version", "epoch", "model", "optimizer", "scheduler", "scaler", "rng", "config",
                "data_fingerprint", "history", "run"}
CONTAINER_KEYS = {"format", "sha256", "payload"}
RECORD = {"epoch": 0, "lr": 0.001, "train_loss": 0.09, "train_acc": 0.125, "val_loss": None, "val_acc": None,
          "test_loss": 0.0909, "test_acc": 0.0909, "max_test_acc": 0.0909, "epoch_seconds": 0.4,
          "train_samples_per_s": 70.0}


def legacy_write(path, payload: dict) -> None:
    """The format-2 writer, by hand: torch.save of the payload, its sha256, a byte-tensor container."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    torch.save({"format": "dvsg-train-checkpoint/2", "sha256": hashlib.sha256(data).hexdigest(),
                "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, path)


def legacy_payload(store: str, fingerprint: str, run_dir) -> dict:
    """Epoch 0 of a 1-epoch run (channels 4, T 4, -b 6, Adam, CosALR), keyed as the trainer wrote it."""
    model = build_model(4, "multistep", "lif", "torch", 2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1)
    optimizer.step()
    scheduler.step()
    config = {"data": store, "out_dir": str(run_dir.parent), "T": 4, "batch_size": 6, "epochs": 1, "workers": 0,
              "channels": 4, "net": "multistep", "neuron": "lif", "tau": 2.0, "cupy": False, "amp": False,
              "amp_dtype": None, "opt": "adam", "lr": 0.001, "momentum": 0.9, "lr_scheduler": "cosalr",
              "step_size": 32, "gamma": 0.1, "T_max": 1, "device": "cpu", "seed": 0, "preload": "auto",
              "val_fraction": 0.0, "resume": None, "init": None, "run_name": None, "force": False,
              "progress": False, "sync_bn": False, "data_fingerprint": None, "world_size": 1, "threads": 1,
              "preset": None}
    return {"format": "dvsg-train-checkpoint/2", "version": "0.1.0", "epoch": 0, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": None,
            "rng": {"torch": torch.get_rng_state(), "cuda": [],
                    "data": torch.Generator().manual_seed(0).get_state()},
            "config": config, "data_fingerprint": fingerprint, "history": [dict(RECORD)],
            "run": {"id": uuid.uuid4().hex, "name": run_dir.name, "dir": str(run_dir)}}


def test_a_checkpoint_written_before_the_move_resumes(tmp_path):
    store = tmp_path / "frames_T4_number.zarr"
    fingerprint = make_learnable_store(store, T=4, n_train=12, n_test=11)
    run_dir = tmp_path / "runs" / "old"
    run_dir.mkdir(parents=True)
    legacy_write(run_dir / "checkpoint_latest.pt", legacy_payload(str(store), fingerprint, run_dir))
    res = CliRunner().invoke(train_main, ["--resume", str(run_dir / "checkpoint_latest.pt"), "--epochs", "2",
                                          "-j", "0", "-q"])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(run_dir / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 1 and ckpt["history"][0] == RECORD and ckpt["data_fingerprint"] == fingerprint
    # what the package writes now is the same format: same container, same payload keys
    assert set(torch.load(run_dir / "checkpoint_latest.pt", weights_only=True)) == CONTAINER_KEYS
    assert set(ckpt) == PAYLOAD_KEYS and ckpt["format"] == FORMAT
    # config fields added since (augment) take their defaults: the legacy run had no augmentation
    assert set(ckpt["config"]) == set(legacy_payload(str(store), fingerprint, run_dir)["config"]) | {"augment"}
    assert ckpt["config"]["augment"] == ""


def _state() -> TrainingState:
    model = build_model(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return TrainingState(model, optimizer, scheduler, None, torch.Generator().manual_seed(3))


def test_make_payload_builds_what_validation_accepts_and_restore_reads(tmp_path):
    state = _state()
    config = TrainConfig(data=str(tmp_path), channels=4, opt="sgd", lr=0.1, lr_scheduler="steplr", epochs=3)
    payload = make_payload(state, epoch=0, config=config, data_fingerprint="ab" * 32, history=[dict(RECORD)],
                           run_id=uuid.uuid4().hex, run_dir=tmp_path / "R")
    assert set(payload) | {"format", "version"} == PAYLOAD_KEYS and set(REQUIRED_KEYS) <= PAYLOAD_KEYS
    save_checkpoint(tmp_path / "c.pt", payload)
    ckpt = load_checkpoint(tmp_path / "c.pt")                 # validate_checkpoint inside
    validate_checkpoint(ckpt, tmp_path / "c.pt")
    assert ckpt["run"] == {"id": payload["run"]["id"], "name": "R", "dir": str(tmp_path / "R")}
    other = _state()
    history, start = restore_state(ckpt, tmp_path / "c.pt", other)
    assert (history, start) == ([RECORD], 1)
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(),
                                                 other.model.state_dict().values()))
    assert torch.equal(other.data_generator.get_state(), state.data_generator.get_state())
    with pytest.raises(CheckpointError, match="optimizer/scheduler/RNG state does not fit"):
        restore_state({**ckpt, "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "c.pt", _state())
