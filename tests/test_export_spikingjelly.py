"""SpikingJelly state dicts both ways: dvsg-export --format spikingjelly into DVSGestureNet, and the
seed tutorial's checkpoints (classify_dvsg: {'net': state_dict, ...}) into dvsg-eval and
dvsg-train --init. Networks at channels 128 (DVSGestureNet's fixed hidden 512 = 128*4), random
weights with BatchNorm statistics set from data, on two samples of T=2."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dvsg_train.checkpoint import load_checkpoint, rng_state, save_checkpoint
from dvsg_train.cli import eval_main, export_main, train_main
from dvsg_train.config import TrainConfig
from dvsg_train.engine import main as train
from dvsg_train.export import load_network
from dvsg_train.model import build_model
from dvsprep.frames.store import open_frame_store

from export_fixtures import our_run
from previous_output import lay_previous, tree
from train_fixtures import make_learnable_store, synthetic_frames

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: E402
from spikingjelly.activation_based.model.parametric_lif_net import DVSGestureNet  # noqa: E402

T = 2
NEURON_INDICES = (2, 6, 10, 14, 18, 23, 26)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    frames, _ = synthetic_frames(2, T, seed=3)
    return torch.from_numpy(frames).float().transpose(0, 1).contiguous()     # [T, 2, 2, 128, 128]


@torch.no_grad()
def set_statistics(model: torch.nn.Module, x: torch.Tensor, fc_gain: float = 6.0) -> None:
    """BatchNorm running statistics from one pass over x (momentum 1), affine parameters and
    Linear gains that make every layer fire."""
    g = torch.Generator().manual_seed(1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 1.0)
        bn.bias.copy_(torch.rand(bn.num_features, generator=g) * 0.5 + 0.5)
    model.train()
    model(x)
    for bn in bns:
        bn.momentum = 0.1
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.mul_(fc_gain)
    model.eval()


def our_checkpoint(path: Path, model: torch.nn.Module, **config) -> Path:
    cfg = TrainConfig(data="unused", T=T, **config)
    record = {"epoch": 0, "train_loss": 0.1, "train_acc": 0.5, "test_loss": 0.1, "test_acc": 0.5}
    save_checkpoint(path, {"epoch": 0, "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                           "scheduler": None, "scaler": None,
                           "rng": rng_state(torch.Generator().manual_seed(0)), "config": cfg.to_dict(),
                           "data_fingerprint": "0" * 64, "history": [record],
                           "run": {"id": "0" * 32, "name": path.parent.name, "dir": str(path.parent)}})
    return path


def sj_net(neuron_cls=neuron.LIFNode) -> DVSGestureNet:
    """The tutorial's network: DVSGestureNet(channels=128, ..., ATan, detach_reset=True)."""
    return DVSGestureNet(channels=128, spiking_neuron=neuron_cls, surrogate_function=surrogate.ATan(),
                         detach_reset=True)


def sj_run(net: DVSGestureNet, x: torch.Tensor, step_mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output [N, 11] (firing rate over T) and the spikes [T, N, ...] of every neuron layer."""
    net.eval()
    functional.set_step_mode(net, step_mode)
    functional.reset_net(net)
    spikes: dict[int, list[torch.Tensor]] = {}
    for i in NEURON_INDICES:
        net.conv_fc[i].register_forward_hook(lambda m, inp, out, i=i: spikes.setdefault(i, []).append(out))
    with torch.no_grad():
        if step_mode == "m":
            out = net(x).mean(0)
        else:
            out = torch.stack([net(x[t]) for t in range(x.shape[0])]).mean(0)
    functional.reset_net(net)
    return out, [s[0] if step_mode == "m" else torch.stack(s) for s in (spikes[i] for i in NEURON_INDICES)]


def assert_same(ours: tuple, theirs: tuple) -> None:
    (out, spikes), (sj_out, sj_spikes) = ours, theirs
    for k, (a, b) in enumerate(zip(spikes, sj_spikes)):
        assert torch.equal(a, b), f"neuron layer {k}: {int((a != b).sum())} spikes differ"
    assert torch.equal(out, sj_out)


@pytest.mark.parametrize("kind", ["lif", "plif"])
def test_exported_state_dict_runs_identically_in_dvsgesturenet(kind, x, tmp_path):
    torch.manual_seed(0)
    model = build_model(128, "multistep", kind)
    if kind == "plif":                      # trained-looking time constants, not the initial 2
        for i, d in zip(NEURON_INDICES, (0.37, 0.44, 0.52, 0.58, 0.63, 0.41, 0.55)):
            model.conv_fc[i].w.data.fill_(math.log(d / (1 - d)))
    set_statistics(model, x)
    ckpt = our_checkpoint(tmp_path / "ours.pt", model, channels=128, neuron=kind)
    res = CliRunner().invoke(export_main, [str(ckpt), "--format", "spikingjelly", "-o", str(tmp_path / "net.pth")])
    assert res.exit_code == 0, res.output
    assert "DVSGestureNet(channels=128" in res.output
    state = torch.load(tmp_path / "net.pth", weights_only=True)
    assert torch.equal(state["conv_fc.22.bias"], torch.zeros(512)) and torch.equal(state["conv_fc.25.bias"], torch.zeros(110))
    net = sj_net(neuron.ParametricLIFNode if kind == "plif" else neuron.LIFNode)
    net.load_state_dict(state, strict=True)
    ours = our_run(load_network(ckpt).model, x)
    rates = [float(s.mean()) for s in ours[1]]
    assert all(0.005 < r < 0.9 for r in rates), rates
    assert_same(ours, sj_run(net, x, "m"))
    if kind == "lif":                       # step by step too (the same numbers, slower)
        assert_same(ours, sj_run(net, x, "s"))
        # and the written state dict is itself a checkpoint dvsg-eval / --init read (zero biases kept)
        back = load_network(tmp_path / "net.pth")
        assert back.weights.source == "spikingjelly" and back.config["linear_bias"]
        assert_same(ours, our_run(back.model, x))


@pytest.mark.parametrize("previous", [False, True])
def test_export_refuses_channels_without_a_dvsgesturenet(tmp_path, previous):
    """Nothing written; an export that --force would replace stays byte for byte."""
    ckpt = our_checkpoint(tmp_path / "c4.pt", build_model(4), channels=4)
    if previous:
        lay_previous(tmp_path / "net.pth")
    before = tree(tmp_path)
    res = CliRunner().invoke(export_main, [str(ckpt), "--format", "spikingjelly", "-o", str(tmp_path / "net.pth"),
                                           *(["--force"] if previous else [])])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "only channels 128" in lines[0], res.output
    assert tree(tmp_path) == before


@pytest.fixture(scope="module")
def tutorial(x, tmp_path_factory) -> tuple[Path, DVSGestureNet]:
    """A checkpoint as classify_dvsg saves it, from a multi-step network whose Linear layers keep
    their (nonzero) default biases."""
    torch.manual_seed(1)
    net = sj_net()
    functional.set_step_mode(net, "m")
    set_statistics(net, x, fc_gain=4.0)
    functional.reset_net(net)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 64)
    path = tmp_path_factory.mktemp("tutorial") / "checkpoint_max.pth"
    torch.save({"net": net.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 7, "max_test_acc": 0.5}, path)
    return path, net


def test_tutorial_checkpoint_runs_identically_as_our_network(tutorial, x):
    path, net = tutorial
    loaded = load_network(path)
    assert loaded.weights.source == "spikingjelly" and loaded.weights.epoch == 7
    assert loaded.config == {"channels": 128, "net": "multistep", "neuron": "lif", "tau": 2.0,
                             "linear_bias": True, "T": None}
    assert loaded.model.conv_fc[22].bias.abs().sum() > 0
    ours = our_run(loaded.model, x)
    assert all(float(s.mean()) > 0.005 for s in ours[1])
    assert_same(ours, sj_run(net, x, "m"))
    # a step-by-step network saves the same keys
    step = sj_net()
    functional.set_step_mode(step, "s")
    assert list(step.state_dict()) == list(net.state_dict())


def test_dvsg_eval_accepts_the_tutorial_checkpoint(tutorial, tmp_path):
    path, net = tutorial
    make_learnable_store(tmp_path / "frames_T2_number.zarr", T=T, n_train=2, n_test=2)
    # a DATA_ROOT: the T of its one store (the tutorial's checkpoint does not record T)
    res = CliRunner().invoke(eval_main, ["--checkpoint", str(path), "--data", str(tmp_path),
                                         "--device", "cpu", "--png", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    split = open_frame_store(tmp_path / "frames_T2_number.zarr").split("test")
    frames = torch.from_numpy(split.load_all()).float().transpose(0, 1)
    predicted = sj_run(net, frames, "m")[0].argmax(1)
    correct = int((predicted == torch.from_numpy(split.labels)).sum())
    assert f"{path} (epoch 7) on test of " in res.output
    assert f"({correct}/2)" in res.output


def test_tutorial_checkpoint_exports_to_nir_and_back_to_spikingjelly(tutorial, tmp_path):
    nir = pytest.importorskip("nir")
    path, net = tutorial
    run = CliRunner().invoke
    res = run(export_main, [str(path), "-o", str(tmp_path / "t.nir")])
    assert res.exit_code == 0, res.output
    graph = nir.read(tmp_path / "t.nir")
    for fc in (22, 25):                     # Linear layers with biases become Affine nodes
        assert isinstance(graph.nodes[f"fc{fc}"], nir.Affine)
        assert (graph.nodes[f"fc{fc}"].bias == net.conv_fc[fc].bias.detach().numpy()).all()
    res = run(export_main, [str(path), "--format", "spikingjelly", "-o", str(tmp_path / "t.pth")])
    assert res.exit_code == 0, res.output
    back = torch.load(tmp_path / "t.pth", weights_only=True)
    theirs = net.state_dict()
    assert list(back) == list(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_init_from_the_tutorial_checkpoint_fine_tunes_its_weights(tutorial, tmp_path):
    path, net = tutorial
    make_learnable_store(tmp_path / "s.zarr", T=T, n_train=2, n_test=1)
    summary = train(TrainConfig(data=str(tmp_path / "s.zarr"), out_dir=str(tmp_path / "runs"), T=T, batch_size=2,
                                epochs=1, channels=128, lr=1e-12, device="cpu", workers=0, init=str(path)))
    ckpt = load_checkpoint(Path(summary["run_dir"]) / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 0 and ckpt["config"]["init"] == str(path)
    assert all(s["step"] == 1 for s in ckpt["optimizer"]["state"].values())     # a fresh optimizer
    theirs = net.state_dict()
    for key in ("conv_fc.0.weight", "conv_fc.16.weight", "conv_fc.22.weight", "conv_fc.22.bias", "conv_fc.25.bias"):
        assert torch.allclose(ckpt["model"][key], theirs[key], rtol=0, atol=1e-8), key


def test_init_refuses_weights_that_do_not_fit(tutorial, tmp_path):
    path, _ = tutorial
    make_learnable_store(tmp_path / "s.zarr", T=T, n_train=2, n_test=1)
    own = our_checkpoint(tmp_path / "c4.pt", build_model(4), channels=4)
    common = ["--data", str(tmp_path / "s.zarr"), "--out-dir", str(tmp_path / "runs"), "-T", "2", "--device", "cpu", "-q"]
    run = CliRunner().invoke
    for args, expect in (([*common, "--channels", "4", "--init", str(path)], "size mismatch"),
                         ([*common, "--channels", "4", "--neuron", "plif", "--init", str(own)], "conv_fc.2.w"),
                         ([*common, "--channels", "8", "--init", str(own)], "size mismatch")):
        res = run(train_main, args)
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and "do not fit the network" in lines[0] and expect in lines[0], res.output
    assert not (tmp_path / "runs").exists()
    # over a run that --force would start over: the same refusal, the run byte for byte
    for name in ("checkpoint_latest.pt", "checkpoint_max.pt", "metrics.jsonl", "config.json"):
        lay_previous(tmp_path / "runs" / "r" / name)
    before = tree(tmp_path / "runs")
    res = run(train_main, [*common, "--channels", "4", "--init", str(path), "--run-name", "r", "--force"])
    assert res.exit_code == 1 and "do not fit the network" in res.output, res.output
    assert tree(tmp_path / "runs") == before
    res = run(train_main, [*common, "--init", str(own), "--resume", str(own)])
    assert res.exit_code == 2 and "--init" in res.output
    # a tutorial network with channels 4 still has DVSGestureNet's hidden 512: no network of ours
    small = DVSGestureNet(channels=4, spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.ATan())
    torch.save({"net": small.state_dict(), "epoch": 0}, tmp_path / "small.pth")
    res = run(eval_main, ["--checkpoint", str(tmp_path / "small.pth"), "--data", str(tmp_path / "s.zarr")])
    assert res.exit_code == 1 and "only channels 128" in res.output and len(res.output.strip().splitlines()) == 1


def test_init_from_our_own_checkpoint(tmp_path):
    torch.manual_seed(2)
    start = build_model(4)
    own = our_checkpoint(tmp_path / "c4.pt", start, channels=4)
    make_learnable_store(tmp_path / "s.zarr", T=T, n_train=4, n_test=2)
    summary = train(TrainConfig(data=str(tmp_path / "s.zarr"), out_dir=str(tmp_path / "runs"), T=T, batch_size=2,
                                epochs=1, channels=4, lr=1e-12, device="cpu", workers=0, init=str(own)))
    ckpt = load_checkpoint(Path(summary["run_dir"]) / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 0 and "conv_fc.22.bias" not in ckpt["model"]
    # seed 2's weights, not those the run (seed 0) would have drawn
    assert torch.allclose(ckpt["model"]["conv_fc.4.weight"], start.conv_fc[4].weight, rtol=0, atol=1e-8)


def test_tutorial_plif_checkpoint_and_wrapper_prefixes(tmp_path):
    net = sj_net(neuron.ParametricLIFNode)
    for i, d in zip(NEURON_INDICES, (0.3, 0.4, 0.5, 0.6, 0.7, 0.45, 0.55)):
        net.conv_fc[i].w.data.fill_(math.log(d / (1 - d)))
    # saved from a DDP-wrapped network: keys start with "module."
    torch.save({"net": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 1}, tmp_path / "plif.pth")
    loaded = load_network(tmp_path / "plif.pth")
    assert loaded.config["neuron"] == "plif"
    for i in NEURON_INDICES:
        assert torch.equal(loaded.model.conv_fc[i].w, net.conv_fc[i].w)
