"""dvsg-export to NIR, checked by an independent simulator: SpikingJelly 2.0's from_nir.

A network trained here is exported, read back by SpikingJelly and run on every test sample of the
synthetic small release plus an all-zero and a saturated sample; predictions, outputs and the
spikes of every neuron layer must be identical to our model's in eval mode (fp32, CPU).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dvsg_train.checkpoint import load_checkpoint, save_checkpoint
from dvsg_train.cli import export_main
from dvsg_train.config import TrainConfig
from dvsg_train.engine import main as train
from dvsg_train.export import load_network
from dvsg_train.export.nir_graph import POOL_THRESHOLD, fold_batchnorm, vote_factors
from dvsg_train.model import Voting
from dvsprep.frames.store import open_frame_store

from export_fixtures import make_active, our_run, sj_run, synthetic_release_store
from previous_output import lay_previous, tree
from train_fixtures import make_learnable_store

T = 2


@pytest.fixture(scope="module")
def from_nir():
    pytest.importorskip("nir")
    pytest.importorskip("nirtorch", reason="SpikingJelly's from_nir needs nirtorch (dev extra)")
    from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir

    return import_from_nir


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> torch.Tensor:
    """Every test sample of the synthetic small release, then an all-zero and a saturated one:
    [T, 122, 2, 128, 128] float32."""
    store = open_frame_store(synthetic_release_store(tmp_path_factory.mktemp("release"), T))
    frames = torch.from_numpy(store.split("test").load_all())
    assert frames.shape[0] == 120
    edge = torch.stack([torch.zeros_like(frames[0]), torch.full_like(frames[0], 255)])
    return torch.cat([frames, edge]).float().transpose(0, 1).contiguous()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LIF network (channels 4) trained for one epoch on a tiny store: its checkpoint."""
    root = tmp_path_factory.mktemp("train")
    make_learnable_store(root / "tiny.zarr", T=T, n_train=12, n_test=4)
    summary = train(TrainConfig(data=str(root / "tiny.zarr"), out_dir=str(root / "runs"), T=T, batch_size=4,
                                epochs=1, channels=4, device="cpu", workers=0, preload="cpu"))
    return Path(summary["run_dir"]) / "checkpoint_latest.pt"


def export(ckpt: Path, out: Path, *args: str) -> Path:
    res = CliRunner().invoke(export_main, [str(ckpt), "-o", str(out), *args])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {out}: NIR graph")
    return out


def variant(ckpt: Path, out: Path, model: torch.nn.Module, **config) -> Path:
    """``ckpt`` with ``model``'s weights (and config changes) as a checkpoint at ``out``."""
    payload = load_checkpoint(ckpt)
    payload["model"] = model.state_dict()
    payload["config"].update(config)
    save_checkpoint(out, {k: v for k, v in payload.items() if k not in ("format", "version")})
    return out


def assert_identical(model: torch.nn.Module, path: Path, x: torch.Tensor, step_mode: str = "m") -> list[torch.Tensor]:
    out, ours = our_run(model, x)
    sj_out, theirs = sj_run(path, x, step_mode)
    assert len(ours) == len(theirs) == 7
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, k
        assert torch.equal(a, b), f"neuron layer {k}: {int((a != b).sum())} of {a.numel()} spikes differ"
    # output spike counts per sample and output neuron, predictions, and the outputs themselves
    assert torch.equal(ours[-1].sum(0), theirs[-1].sum(0))
    assert torch.equal(out.argmax(1), sj_out.argmax(1))
    assert torch.equal(out, sj_out)
    return ours


def test_trained_network_runs_identically_in_spikingjelly(from_nir, trained, samples, tmp_path):
    path = export(trained, tmp_path / "model.nir")
    net = load_network(trained)
    assert net.weights.T == T and net.config["channels"] == 4
    ours = assert_identical(net.model, path, samples)
    assert ours[0].sum() > 0            # the first layer fires (deeper ones may not after one epoch)


def test_active_network_runs_identically_step_by_step_and_multi_step(from_nir, trained, samples, tmp_path):
    """The trained network with BatchNorm statistics and Linear weights set so that every layer
    fires: every spike of every layer agrees, in both of SpikingJelly's step modes."""
    net = load_network(trained)
    make_active(net.model, samples[:, :16])
    path = export(variant(trained, tmp_path / "active.pt", net.model), tmp_path / "active.nir")
    model = load_network(tmp_path / "active.pt").model
    ours = assert_identical(model, path, samples)
    rates = [float(s[:, :120].mean()) for s in ours]
    assert all(0.01 < r < 0.9 for r in rates), rates
    assert len(set(ours[-1][:, :120].sum((0, 2)).tolist())) > 5     # output spike counts vary by sample
    assert_identical(model, path, samples[:, ::10], step_mode="s")


def _floats_near(x: np.float32, ulps: int = 3) -> list[np.float32]:
    """x and the float32 values up to `ulps` steps either side of it."""
    out = [np.float32(x)]
    for direction in (np.float32(0), np.float32(np.inf)):
        c = np.float32(x)
        for _ in range(ulps):
            c = np.nextafter(c, direction)
            out.append(c)
    return out


def _best_tau_hits(tau: np.float32, decay: torch.Tensor) -> int:
    """The specification, independent of sj_tau: on how many of 200001 float32 inputs in [-4, 4]
    SpikingJelly's x / tau equals our decay * x bit for bit (what the exported tau maximises)."""
    xs = torch.linspace(-4.0, 4.0, 200_001, dtype=torch.float64).float()
    return int((xs / torch.tensor(tau) == xs * decay.float()).sum())


def test_plif_time_constants(from_nir, trained, samples, tmp_path):
    """PLIF: SpikingJelly divides by a float32 tau where we multiply by decay; the export picks the
    tau that agrees best. Predictions and output spikes are identical here; hidden spikes may
    differ where a membrane lands within float32 rounding of the threshold (measured, bounded)."""
    lif = load_network(trained).model
    from dvsg_train.model import build_model

    model = build_model(4, "multistep", "plif")
    state = dict(lif.state_dict())
    decays = [0.37, 0.44, 0.52, 0.58, 0.63, 0.41, 0.55]
    for i, d in zip((2, 6, 10, 14, 18, 23, 26), decays):
        state[f"conv_fc.{i}.w"] = torch.tensor(math.log(d / (1 - d)), dtype=torch.float32)
    model.load_state_dict(state)
    make_active(model, samples[:, :16])
    path = export(variant(trained, tmp_path / "plif.pt", model, neuron="plif"), tmp_path / "plif.nir")
    gm = from_nir(str(path))
    for i in (2, 6, 10, 14, 18, 23, 26):
        d = model.conv_fc[i].w.detach().sigmoid()
        tau = np.float32(gm.get_submodule(f"lif{i}").module.tau)
        assert _best_tau_hits(tau, d) == max(_best_tau_hits(c, d) for c in _floats_near(np.float32(1) / d.numpy()))
    out, ours = our_run(model, samples)
    sj_out, theirs = sj_run(path, samples, "m")
    differ = [int((a != b).sum()) for a, b in zip(ours, theirs)]
    total = sum(int(a.sum()) for a in ours)
    assert sum(differ) <= total * 1e-4, (differ, total)
    assert torch.equal(ours[-1].sum(0), theirs[-1].sum(0))
    assert torch.equal(out.argmax(1), sj_out.argmax(1))


def test_spikingjelly_builds_the_documented_nodes(from_nir, trained, tmp_path):
    path = export(trained, tmp_path / "model.nir")
    gm = from_nir(str(path))
    names = {n for n, _ in gm.named_children()}
    assert {"conv0", "lif2", "pool3_avg", "pool3_if", "flatten20", "fc22", "lif23", "fc25", "lif26",
            "vote27_sum", "vote27_mean"} <= names
    assert not any(n.startswith(("bn", "drop")) for n in names)
    for i in (2, 6, 10, 14, 18, 23, 26):
        lif = gm.get_submodule(f"lif{i}").module
        assert type(lif).__name__ == "LIFNode" and lif.tau == 2.0 and lif.decay_input
        assert (lif.v_threshold, lif.v_reset) == (1.0, 0.0)
    for i in (3, 7, 11, 15, 19):
        node = gm.get_submodule(f"pool{i}_if").module
        assert type(node).__name__ == "IFNode" and (node.v_threshold, node.v_reset) == (POOL_THRESHOLD, 0.0)
    # another dt is carried in the time constants: from_nir needs the same dt
    path = export(trained, tmp_path / "dt.nir", "--dt", "0.001")
    assert from_nir(str(path), dt=1e-3).get_submodule("lif2").module.tau == 2.0
    with pytest.raises(ValueError, match="/ dt"):
        from_nir(str(path))


def test_maxpool_on_spikes_is_exact_as_avgpool_and_if(from_nir, trained, tmp_path):
    """Every 2x2 spike pattern after every other one (all 256 transitions), then random binary
    sequences: AvgPool2d + IF as SpikingJelly builds them equals max pooling at every step, so
    the IF neuron keeps nothing from one step to the next."""
    gm = from_nir(str(export(trained, tmp_path / "model.nir")), step_mode="m")
    avg, spike = gm.get_submodule("pool3_avg"), gm.get_submodule("pool3_if")
    patterns = torch.tensor([[(p >> b) & 1 for b in range(4)] for p in range(16)], dtype=torch.float32).view(16, 2, 2)
    x = torch.zeros(3, 1, 4, 32, 32)            # window (p, q): pattern p, then q, then p again
    for p in range(16):
        for q in range(16):
            for t, pat in enumerate((p, q, p)):
                x[t, 0, :, 2 * p:2 * p + 2, 2 * q:2 * q + 2] = patterns[pat]
    g = torch.Generator().manual_seed(0)
    rand = (torch.rand(24, 2, 4, 16, 16, generator=g) < torch.rand(24, 1, 1, 1, 1, generator=g)).float()
    for seq in (x, rand, torch.ones(3, 1, 4, 8, 8)):
        with torch.no_grad():
            got, _ = spike(avg(seq))
        want = F.max_pool2d(seq.flatten(0, 1), 2, 2).unflatten(0, seq.shape[:2])
        assert torch.equal(got, want)
    # why: the nonzero averages are k/4 (exact in float), all above the threshold, which lies
    # strictly between 0 and 1/4 (so NIR's ">" and SpikingJelly's ">=" agree)
    assert 0 < POOL_THRESHOLD < 0.25


def test_voting_is_exact(from_nir, trained, tmp_path):
    """The two voting nodes give our average pooling's float32 result for every spike pattern of a
    group, in SpikingJelly's Linear layers (any summation order)."""
    gm = from_nir(str(export(trained, tmp_path / "model.nir")))
    vote = torch.nn.Sequential(gm.get_submodule("vote27_sum"), gm.get_submodule("vote27_mean"))
    patterns = torch.tensor([[(p >> b) & 1 for b in range(10)] for p in range(1024)], dtype=torch.float32)
    for spikes in (patterns.repeat(1, 11), patterns.roll(1, 0).repeat(1, 11)[:, :110].roll(37, 1)):
        with torch.no_grad():
            assert torch.equal(vote(spikes), Voting(10)(spikes))
    k, w = vote_factors(10)
    assert (k, np.float32(w)) == (7, np.float32(1 / 70))
    # one float32 weight cannot: 9 * fl(0.1) rounds away from fl(0.9)
    assert np.float32(9 * float(np.float32(0.1))) != np.float32(9) / np.float32(10)


def test_batchnorm_folding():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 8, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.05, 3)
        bn.weight.normal_(1, 0.5)
        bn.bias.normal_(0.3, 0.5)
    weight, bias = fold_batchnorm(conv, bn)
    x = (torch.rand(4, 2, 32, 32) < 0.1) * torch.randint(1, 20, (4, 2, 32, 32))
    x = x.float()
    with torch.no_grad():
        want = bn(conv(x))
        got = F.conv2d(x, torch.from_numpy(weight), torch.from_numpy(bias), padding=1)
        # no input: bit-identical (the bias is what torch's batch norm adds)
        zero = torch.zeros(1, 2, 8, 8)
        assert torch.equal(F.conv2d(zero, torch.from_numpy(weight), torch.from_numpy(bias), padding=1), bn(conv(zero)))
    assert (got - want).abs().max() <= 4e-7 * want.abs().max()
    # folding without the statistics would be far off
    assert (F.conv2d(x, conv.weight, bn.bias, padding=1) - want).abs().max() > 0.1


# --- command line ------------------------------------------------------------------------------

def one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.parametrize("previous", [False, True])
def test_without_nir_export_says_how_to_get_it(trained, tmp_path, monkeypatch, previous):
    """Nothing written; an export that --force would replace stays byte for byte."""
    monkeypatch.setitem(sys.modules, "nir", None)
    before = lay_previous(tmp_path / "m.nir") if previous else {}
    msg = one_line_error(CliRunner().invoke(export_main, [str(trained), "-o", str(tmp_path / "m.nir"),
                                                          *(["--force"] if previous else [])]))
    assert "pip install 'dvsgesture-kit[nir]'" in msg
    assert tree(tmp_path) == before


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    run = CliRunner().invoke
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    assert "not a checkpoint" in one_line_error(run(export_main, [str(junk), "-o", str(tmp_path / "a.nir")]))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(trained.read_bytes()[: trained.stat().st_size // 2])
    assert "not a checkpoint" in one_line_error(run(export_main, [str(cut), "-o", str(tmp_path / "b.nir")]))
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else/1", "model": {}}, other)
    assert "not a dvsg-train checkpoint" in one_line_error(run(export_main, [str(other), "-o", str(tmp_path / "c.nir")]))
    bad_shape = tmp_path / "shape.pt"
    payload = load_checkpoint(trained)
    payload["model"]["conv_fc.0.weight"] = torch.zeros(5, 2, 3, 3)
    save_checkpoint(bad_shape, {k: v for k, v in payload.items() if k not in ("format", "version")})
    assert "do not fit" in one_line_error(run(export_main, [str(bad_shape), "-o", str(tmp_path / "d.nir")]))
    missing = tmp_path / "nope" / "m.nir"
    assert "output directory does not exist" in one_line_error(run(export_main, [str(trained), "-o", str(missing)]))
    assert "no such checkpoint" in one_line_error(run(export_main, [str(tmp_path / "none.pt"), "-o", str(tmp_path / "e.nir")]))
    before = trained.read_bytes()
    assert "is the input" in one_line_error(run(export_main, [str(trained), "-o", str(trained)]))
    assert trained.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.pt", "junk.pt", "other.pt", "shape.pt"]
    assert run(export_main, [str(trained), "-o", str(tmp_path / "f.nir"), "--format", "onnx"]).exit_code == 2
