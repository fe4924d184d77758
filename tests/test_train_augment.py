"""--augment in training: the loss takes the step's targets (exactly one-hot without it), training
accuracy counts the targets' argmax, every step draws from augment_generator(seed, epoch, rank,
step), evaluation never augments, and the switch is checked, recorded and kept on resume."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dvsg_train import engine
from dvsg_train.augment import AugmentSpec, augment_batch, augment_generator, parse_augment
from dvsg_train.checkpoint import load_checkpoint
from dvsg_train.cli import train_main
from dvsg_train.config import TrainConfig
from dvsg_train.data import Batches, to_network_input
from dvsg_train.distributed import DistEnv
from dvsg_train.engine import evaluate_checkpoint, train_one_epoch
from dvsg_train.errors import ConfigError
from dvsg_train.model import build_model

from train_fixtures import make_learnable_store, synthetic_frames

CPU = torch.device("cpu")
TINY = ["-T", "4", "-b", "6", "--channels", "4", "--device", "cpu", "-j", "0", "-q"]


def one_batch(n: int = 6, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor, Batches]:
    frames, labels = synthetic_frames(n, 4, seed)
    frames, labels = torch.from_numpy(frames), torch.from_numpy(labels).long()
    return frames, labels, Batches(labels, n, shuffle=False, drop_last=False, frames=frames)


def model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(4, "multistep", "lif", "torch", 2.0)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def expected_loss(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, dropout_seed: int):
    """The first step's loss and output, computed here on a copy (train mode, same dropout masks)."""
    twin = copy.deepcopy(model).train()
    torch.manual_seed(dropout_seed)
    out = twin(x)
    return F.mse_loss(out.float(), target).item(), out.detach()


@pytest.mark.parametrize("augment", [None, AugmentSpec()])
def test_without_augmentation_the_loss_is_mse_against_one_hot(augment):
    frames, labels, batches = one_batch()
    x, y = to_network_input(frames, labels, CPU)
    model, opt = model_and_opt()
    want, out = expected_loss(model, x, F.one_hot(y, 11).float(), dropout_seed=9)
    torch.manual_seed(9)
    got = train_one_epoch(model, batches, opt, CPU, augment=augment)
    assert got["loss"] == want
    assert got["acc"] == (out.argmax(1) == y).double().mean().item()
    # and the weights after the step are those of the plain call (bit for bit)
    plain, plain_opt = model_and_opt()
    torch.manual_seed(9)
    train_one_epoch(plain, batches, plain_opt, CPU)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_label_smoothing_reaches_the_loss():
    frames, labels, batches = one_batch()
    x, y = to_network_input(frames, labels, CPU)
    model, opt = model_and_opt()
    want, _ = expected_loss(model, x, F.one_hot(y, 11).float() * 0.9 + 0.1 / 11, dropout_seed=9)
    torch.manual_seed(9)
    got = train_one_epoch(model, batches, opt, CPU, augment=parse_augment("smooth=0.1"))
    assert got["loss"] == want


def test_train_accuracy_counts_the_targets_argmax_and_each_step_draws_its_own_generator(monkeypatch):
    """A fake augmentation that relabels y -> (y + 1) % 11: accuracy is counted against it; the
    generator of step k is augment_generator(seed, epoch, dist_env's rank, k)."""
    frames, labels = synthetic_frames(12, 4, 4)
    frames, labels = torch.from_numpy(frames), torch.from_numpy(labels).long()
    batches = Batches(labels, 6, shuffle=False, drop_last=False, frames=frames)
    calls, targets = [], []
    real_generator = engine.augment_generator

    def generator(seed, epoch, rank, step, device):
        calls.append((seed, epoch, rank, step, device))
        return real_generator(seed, epoch, rank, step, device)

    def relabel(spec, x, y, g):
        targets.append((y + 1) % 11)
        return x, F.one_hot(targets[-1], 11).float()

    monkeypatch.setattr(engine, "augment_generator", generator)
    monkeypatch.setattr(engine, "augment_batch", relabel)
    monkeypatch.setattr(engine.distributed, "all_reduce_sum", lambda env, v: v)   # one process plays rank 1
    model, opt = model_and_opt()
    outs = []
    hook = model.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    got = train_one_epoch(model, batches, opt, CPU, augment=parse_augment("mirror"), seed=7, epoch=3,
                          dist_env=DistEnv(device=CPU, rank=1, world_size=2))
    hook.remove()
    assert calls == [(7, 3, 1, 0, CPU), (7, 3, 1, 1, CPU)]
    correct = sum(int((o.argmax(1) == t).sum()) for o, t in zip(outs, targets))
    assert got["acc"] == correct / 12 and got["samples"] == 12
    # without dist_env: rank 0
    calls.clear()
    train_one_epoch(model, batches, opt, CPU, augment=parse_augment("mirror"), seed=7, epoch=3)
    assert [c[2] for c in calls] == [0, 0]


def test_ranks_draw_different_augmentations():
    frames, labels = synthetic_frames(6, 4, 4)
    x, y = to_network_input(torch.from_numpy(frames), torch.from_numpy(labels).long(), CPU)
    spec = parse_augment("mirror,translate=8,drop=0.5,mixup=0.5")
    rank0 = augment_batch(spec, x, y, augment_generator(0, 1, 0, 2, CPU))
    rank1 = augment_batch(spec, x, y, augment_generator(0, 1, 1, 2, CPU))
    again = augment_batch(spec, x, y, augment_generator(0, 1, 1, 2, CPU))
    assert not torch.equal(rank0[0], rank1[0])
    assert torch.equal(rank1[0], again[0]) and torch.equal(rank1[1], again[1])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("augment") / "frames_T4_number.zarr"
    make_learnable_store(path, T=4, n_train=12, n_test=11, seed=3)
    return path


def test_evaluation_never_augments(store, tmp_path, monkeypatch):
    """An augmented run: augment_batch runs once per training batch and never in evaluation, and
    the recorded test numbers are those of the checkpoint evaluated without any augmentation."""
    seen = []
    real = engine.augment_batch
    monkeypatch.setattr(engine, "augment_batch", lambda *a: seen.append(a[1].shape[1]) or real(*a))
    cfg = TrainConfig(data=str(store), out_dir=str(tmp_path), T=4, batch_size=6, epochs=1, channels=4,
                      device="cpu", workers=0, augment="mirror,drop=0.5,smooth=0.1")
    summary = engine.main(cfg)
    assert seen == [6, 6]                                    # 12 train samples, -b 6; no test batch
    ckpt = f"{summary['run_dir']}/checkpoint_latest.pt"
    record = load_checkpoint(ckpt)["history"][0]
    plain = evaluate_checkpoint(ckpt, str(store), device="cpu")
    assert (record["test_loss"], record["test_acc"]) == (plain["loss"], plain["acc"])
    assert len(seen) == 2                                    # evaluate_checkpoint did not augment either


def test_augment_option_is_checked_recorded_and_kept_on_resume(store, tmp_path):
    res = CliRunner().invoke(train_main, ["--data", str(store), *TINY, "--augment", "mirror,rotate=999"])
    assert res.exit_code == 2 and "Invalid value for '--augment': rotate=999 is outside 0..180" in res.output
    res = CliRunner().invoke(train_main, ["--data", str(store), *TINY, "--augment", "crop=5"])
    assert res.exit_code == 1
    assert res.output.strip() == "error: --augment: crop=5 needs at least 5 time steps; the store has T=4"
    runs = tmp_path / "runs"
    res = CliRunner().invoke(train_main, ["--data", str(store), *TINY, "--epochs", "1", "--out-dir", str(runs),
                                          "--augment", " drop=0.25, Mirror,rotate=15.0"])
    assert res.exit_code == 0, res.output
    run = runs / "T4_b6_adam_lr0.001_c4_aug-mirror-rotate15-drop0.25"    # canonical order and spelling
    assert json.loads((run / "config.json").read_text())["augment"] == "mirror,rotate=15,drop=0.25"
    ckpt = run / "checkpoint_latest.pt"
    assert load_checkpoint(ckpt)["config"]["augment"] == "mirror,rotate=15,drop=0.25"
    # a resumed run keeps it; the same value in another spelling is accepted, another is refused
    res = CliRunner().invoke(train_main, ["--resume", str(ckpt), "--epochs", "2", "--augment", "mirror"])
    assert res.exit_code == 1
    assert "--augment gives augment 'mirror', the run has 'mirror,rotate=15,drop=0.25'" in res.output
    res = CliRunner().invoke(train_main, ["--resume", str(ckpt), "--epochs", "2", "-q",
                                          "--augment", "drop=0.25,rotate=15,mirror"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(ckpt)["config"]["augment"] == "mirror,rotate=15,drop=0.25"


def test_library_config_validates_augment():
    assert TrainConfig(data="d", augment="translate=3,mirror").augment == "mirror,translate=3"
    assert TrainConfig(data="d", augment="none").augment == ""
    with pytest.raises(ConfigError, match=r"^--augment: unknown augmentation 'flip'"):
        TrainConfig(data="d", augment="flip")
    with pytest.raises(ConfigError, match=r"^--augment: subsample=8 needs at least 8 time steps; the store has T=4"):
        TrainConfig(data="d", T=4, augment="subsample=8")
