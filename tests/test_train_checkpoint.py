"""dvsg_train.checkpoint: safe loading, clear errors, resume checks."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from dvsg_train.checkpoint import (
    FORMAT,
    atomic_write,
    check_resume,
    load_checkpoint,
    save_checkpoint,
)
from dvsg_train.config import TrainConfig
from dvsg_train.engine import main
from dvsg_train.errors import CheckpointError, ConfigMismatchError, DataMismatchError

from train_fixtures import make_store


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 1-epoch run: (store, out_dir, checkpoint path)."""
    root = tmp_path_factory.mktemp("ckpt")
    store = root / "frames_T4_number.zarr"
    make_store(store, T=4, n_train=12, n_test=11)
    cfg = TrainConfig(data=str(store), out_dir=str(root / "runs"), T=4, batch_size=6, epochs=1,
                      channels=4, device="cpu", workers=0)
    summary = main(cfg)
    return store, root, f"{summary['run_dir']}/checkpoint_latest.pt"


def resume_cfg(store, root, ckpt, **kw) -> TrainConfig:
    base = dict(data=str(store), out_dir=str(root / "resumed"), T=4, batch_size=6, epochs=2,
                T_max=1, channels=4, device="cpu", workers=0, resume=ckpt)
    base.update(kw)
    return TrainConfig(**base)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_and_corrupt_checkpoints(tmp_path, run):
    with pytest.raises(CheckpointError, match="no such checkpoint") as e:
        load_checkpoint(tmp_path / "absent.pt")
    one_line(e)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(2000))
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
        load_checkpoint(garbage)
    assert str(garbage) in one_line(e)
    truncated = tmp_path / "truncated.pt"
    data = open(run[2], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
        load_checkpoint(truncated)
    one_line(e)


def test_pickled_objects_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "args": argparse.Namespace(lr=0.1)}, evil)   # a pickled object
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
        load_checkpoint(evil)
    one_line(e)
    foreign = tmp_path / "foreign.pt"
    torch.save({"net": {}, "epoch": 3}, foreign)                  # e.g. the seed's checkpoint
    with pytest.raises(CheckpointError, match="not a dvsg-train checkpoint"):
        load_checkpoint(foreign)
    partial = tmp_path / "partial.pt"
    save_checkpoint(partial, {"epoch": 0, "model": {}})
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        load_checkpoint(partial)


def test_checkpoint_from_another_config(run):
    store, root, ckpt = run
    with pytest.raises(ConfigMismatchError, match=r"channels 4 vs 8") as e:
        main(resume_cfg(store, root, ckpt, channels=8))
    one_line(e)
    with pytest.raises(ConfigMismatchError, match=r"T_max 1 vs 2"):
        main(resume_cfg(store, root, ckpt, T_max=None))             # CosALR period follows --epochs
    with pytest.raises(ConfigMismatchError, match=r"neuron 'lif' vs 'plif'"):
        check_resume(load_checkpoint(ckpt), ckpt, TrainConfig(**{**load_checkpoint(ckpt)["config"], "neuron": "plif"}))


def test_checkpoint_from_other_data(run, tmp_path):
    store, root, ckpt = run
    other = tmp_path / "frames_T4_number.zarr"
    make_store(other, T=4, n_train=12, n_test=11, seed=9)
    with pytest.raises(DataMismatchError, match="fingerprint") as e:
        main(resume_cfg(other, root, ckpt))
    one_line(e)


def test_resume_continues_and_extends(run):
    store, root, ckpt = run
    summary = main(resume_cfg(store, root, ckpt))
    assert summary["epochs"] == 2 and summary["final_epoch"] == 1


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.pt"

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []
