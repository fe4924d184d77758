"""dvsg_train.checkpoint: safe loading, the digest, field checks, clear errors, resume checks."""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

from dvsprep.atomic import atomic_write
from dvsg_train.checkpoint import (
    FORMAT,
    check_resume,
    load_checkpoint,
    save_checkpoint,
)
from dvsg_train.config import TrainConfig
from dvsg_train.engine import main
from dvsg_train.errors import CheckpointError, ConfigMismatchError, DataMismatchError

from fuzz_settings import fuzz
from previous_output import lay_previous, tree
from train_fixtures import make_learnable_store


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One finished 1-epoch run: (store, out_dir, checkpoint path)."""
    root = tmp_path_factory.mktemp("ckpt")
    store = root / "frames_T4_number.zarr"
    make_learnable_store(store, T=4, n_train=12, n_test=11)
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
    with pytest.raises(CheckpointError, match="not a checkpoint") as e:
        load_checkpoint(garbage)
    assert str(garbage) in one_line(e)
    truncated = tmp_path / "truncated.pt"
    data = open(run[2], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a checkpoint") as e:
        load_checkpoint(truncated)
    one_line(e)


def test_pickled_objects_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "args": argparse.Namespace(lr=0.1)}, evil)   # a pickled object
    with pytest.raises(CheckpointError, match="not a checkpoint") as e:
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
    make_learnable_store(other, T=4, n_train=12, n_test=11, seed=9)
    with pytest.raises(DataMismatchError, match="fingerprint") as e:
        main(resume_cfg(other, root, ckpt))
    one_line(e)


def test_resume_continues_and_extends(run, tmp_path):
    store, root, ckpt = run
    copy = tmp_path / "copy"                    # a resumed run continues in its checkpoint's folder
    shutil.copytree(os.path.dirname(ckpt), copy)
    summary = main(resume_cfg(store, root, str(copy / "checkpoint_latest.pt")))
    assert summary["epochs"] == 2 and summary["final_epoch"] == 1 and summary["run_dir"] == str(copy)
    assert load_checkpoint(ckpt)["epoch"] == 0


def test_atomic_write_leaves_the_previous_checkpoint_on_failure(tmp_path):
    """Checkpoints are replaced by design: a failed write leaves the previous one byte for byte
    and no temporary (test_atomic covers the case with no previous file)."""
    target = tmp_path / "x.pt"
    before = lay_previous(target)

    def fail(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- digest and field checks

def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def payload_of(path) -> dict:
    """The stored payload, unvalidated (to tamper with it)."""
    outer = torch.load(path, weights_only=True)
    return torch.load(io.BytesIO(outer["payload"].numpy().tobytes()), weights_only=True)


def test_checkpoint_is_a_digest_container(run):
    outer = torch.load(run[2], weights_only=True)
    assert set(outer) == {"format", "sha256", "payload"} and outer["format"] == FORMAT
    assert outer["payload"].dtype == torch.uint8
    assert hashlib.sha256(outer["payload"].numpy().tobytes()).hexdigest() == outer["sha256"]


def test_one_flipped_payload_byte_is_refused(run, tmp_path):
    raw = bytearray(open(run[2], "rb").read())
    outer = torch.load(run[2], weights_only=True)
    # a byte inside the payload record (found by content, whatever the zip layout)
    data = outer["payload"].numpy().tobytes()
    at = bytes(raw).find(data[1000:1064])
    assert at > 0
    raw[at + 10] ^= 0x01
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checkpoint is corrupt: its payload has sha256") as e:
        load_checkpoint(bad)
    assert str(bad) in one_line(e)


def test_old_checkpoints_without_digest_are_refused(run, tmp_path):
    old = tmp_path / "old.pt"
    torch.save({**payload_of(run[2]), "format": "dvsg-train-checkpoint/1"}, old)
    with pytest.raises(CheckpointError, match="carries no digest") as e:
        load_checkpoint(old)
    one_line(e)


def _tampered(run, tmp_path, change) -> str:
    """A re-signed checkpoint (valid digest) whose payload was changed by ``change(payload)``."""
    p = payload_of(run[2])
    change(p)
    path = tmp_path / "tampered.pt"
    save_checkpoint(path, {k: v for k, v in p.items() if k not in ("format", "version")})
    return str(path)


BAD_FIELDS = {
    "epoch -100": (lambda p: p.update(epoch=-100), "epoch -100 is not an epoch of its run"),
    "epoch beyond epochs": (lambda p: p.update(epoch=5), "epoch 5 is not an epoch of its run (0 to 0)"),
    "epoch a string": (lambda p: p.update(epoch="0"), "epoch '0' is not an epoch"),
    "epoch a bool": (lambda p: p.update(epoch=False), "epoch False is not an epoch"),
    "history a string": (lambda p: p.update(history="x"), "history must list the 1 finished epochs, found str"),
    "history of lists": (lambda p: p.update(history=[[1, 2]]), "history[0] is not a dict"),
    "history value a string": (lambda p: p["history"][0].update(test_acc="1.0"), "history[0]['test_acc'] is str"),
    "history accuracy 7": (lambda p: p["history"][0].update(test_acc=7.0), "is not an accuracy in [0, 1]"),
    "history wrong epoch": (lambda p: p["history"][0].update(epoch=3), "history[0] is for epoch 3, expected 0"),
    "fingerprint an int": (lambda p: p.update(data_fingerprint=12), "data_fingerprint is not a sha256"),
    "fingerprint short": (lambda p: p.update(data_fingerprint="6d9c"), "data_fingerprint is not a sha256"),
    "config lr a string": (lambda p: p["config"].update(lr="0.1"), "invalid config (lr must be float"),
    "config channels 0": (lambda p: p["config"].update(channels=0), "invalid config (channels must be a positive"),
    "config channels a float": (lambda p: p["config"].update(channels=4.0), "invalid config (channels must be int"),
    "config lr nan": (lambda p: p["config"].update(lr=float("nan")), "invalid config (lr must be a finite"),
    "config a list": (lambda p: p.update(config=[1]), "checkpoint config is not a dict"),
    "rng float tensor": (lambda p: p["rng"].update(torch=torch.zeros(5056)), "rng torch state must be a uint8"),
    "rng short": (lambda p: p["rng"].update(data=torch.zeros(3, dtype=torch.uint8)), "rng data state must be"),
    "model of numbers": (lambda p: p.update(model={"w": 1}), "model is not a state dict"),
    "optimizer a list": (lambda p: p.update(optimizer=[]), "optimizer is not an optimizer state dict"),
    "scaler a string": (lambda p: p.update(scaler="x"), "scaler state is neither None nor a dict"),
    "run id": (lambda p: p["run"].update(id="../x"), "run id is not 32 hex digits"),
    "run name": (lambda p: p["run"].update(name="../B"), "run name '../B' is not a folder name"),
    "deep nesting": (lambda p: p.update(scheduler={"a": [[[[[[[[[[1]]]]]]]]]]}), "nested deeper than 8"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_every_field_is_checked_before_use(run, tmp_path, case):
    change, message = BAD_FIELDS[case]
    path = _tampered(run, tmp_path, change)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}: ") and message in msg, msg


@pytest.fixture(scope="module")
def small_checkpoint(run):
    raw = open(run[2], "rb").read()
    return raw, load_checkpoint(run[2])


@fuzz(60)
@given(data=st.data())
def test_random_byte_flips_are_refused_or_harmless(small_checkpoint, tmp_path_factory, data):
    raw, want = small_checkpoint
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=3))
    bad = bytearray(raw)
    for at, x in flips:
        bad[at] ^= x
    path = tmp_path_factory.mktemp("flip") / "c.pt"
    path.write_bytes(bytes(bad))
    try:
        got = load_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert same(got, want)          # only bytes that carry nothing (zip padding, timestamps) may change
