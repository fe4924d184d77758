"""network_to_nir's graph on hand-built layer stacks (node names, chain of edges, shapes, metadata,
refusals), and nir_tau / sj_tau at their edges. Nothing trained, no SpikingJelly: each expected
value is written here (see tests/test_export_nir.py for the simulator-checked runs)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from dvsg_train import __version__
from dvsg_train.errors import ExportError
from dvsg_train.export import nir_graph
from dvsg_train.export.nir_graph import network_to_nir, nir_tau, sj_tau
from dvsg_train.model import SequenceDropout, Voting
from dvsg_train.neuron import MultiStepLIF

pytest.importorskip("nir")              # network_to_nir builds nir nodes

OUTPUT_NOTE = "vote per time step; the network's output is its mean over the time steps"


class Net(nn.Module):
    """What network_to_nir reads of our networks: ``conv_fc``, in eval mode."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.conv_fc = nn.Sequential(*layers)
        self.eval()


def chain(names: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(names[:-1], names[1:])]


def shape_of(types: dict, key: str) -> list[int]:
    return [int(n) for n in np.asarray(types[key]).reshape(-1)]


@pytest.fixture
def folds(monkeypatch) -> list[int]:
    """Counts fold_batchnorm's calls and stops a second fold of the same layer (a loop that does
    not move past a Conv2d + BatchNorm2d pair would otherwise never end)."""
    calls: list[int] = []
    real = nir_graph.fold_batchnorm

    def once(conv, bn):
        calls.append(1)
        assert len(calls) == 1, "BatchNorm2d folded twice"
        return real(conv, bn)

    monkeypatch.setattr(nir_graph, "fold_batchnorm", once)
    return calls


def test_every_layer_kind_in_one_chain(folds):
    """conv+BN, LIF, max-pool, a conv without BN (followed by a LIF), flatten, dropout, linear,
    voting: one node (or two) per layer, named after its index, chained in order."""
    torch.manual_seed(0)
    conv_plain = nn.Conv2d(3, 2, 5, bias=True)
    layers = [nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), MultiStepLIF(),
              nn.MaxPool2d(2, 2), conv_plain, MultiStepLIF(), nn.Flatten(), SequenceDropout(),
              nn.Linear(2 * 60 * 60, 20, bias=False), MultiStepLIF(), Voting(10)]
    graph = network_to_nir(Net(*layers), dt=1e-3)
    names = ["input", "conv0", "lif2", "pool3_avg", "pool3_if", "conv4", "lif5", "flatten6", "fc8", "lif9",
             "vote10_sum", "vote10_mean", "output"]
    assert list(graph.nodes) == names
    assert graph.edges == chain(names)
    assert len(folds) == 1
    n = graph.nodes
    assert shape_of(n["input"].input_type, "input") == [2, 128, 128]
    # the conv without BatchNorm keeps its own weight and bias (nothing folded into it)
    assert np.array_equal(n["conv4"].weight, conv_plain.weight.detach().numpy())
    assert np.array_equal(n["conv4"].bias, conv_plain.bias.detach().numpy())
    # 64x64 after the pool, 60x60 after the 5x5 conv without padding
    assert n["lif5"].tau.shape == (2, 60, 60)
    assert shape_of(n["flatten6"].input_type, "input") == [2, 60, 60]
    assert shape_of(n["flatten6"].output_type, "output") == [7200]
    assert (n["flatten6"].start_dim, n["flatten6"].end_dim) == (0, -1)
    # the output's type is ours, an array as NIR's types are (the vote Linear before it reports a
    # tuple, which nir.write would store differently)
    for types, key in ((n["output"].input_type, "input"), (n["output"].output_type, "output")):
        assert isinstance(types[key], np.ndarray) and types[key].tolist() == [2]


@pytest.mark.parametrize("layers, names, out", [
    # a BatchNorm2d as the very last layer is still folded into the conv before it
    ((nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)), ["input", "conv0", "output"], [3, 128, 128]),
    # a conv as the last layer: there is no next layer to look at
    ((nn.Conv2d(2, 1, 128, bias=False),), ["input", "conv0", "output"], [1, 1, 1]),
    ((nn.Conv2d(2, 1, 3, padding=1), nn.Flatten()), ["input", "conv0", "flatten1", "output"], [128 * 128]),
], ids=["bn-last", "conv-last", "flatten-last"])
def test_the_last_layer_sets_the_output(folds, layers, names, out):
    graph = network_to_nir(Net(*layers))
    assert list(graph.nodes) == names
    assert graph.edges == chain(names)
    assert len(folds) == sum(isinstance(m, nn.BatchNorm2d) for m in layers)
    assert shape_of(graph.nodes["output"].output_type, "output") == out


def test_a_bn_last_is_folded_with_its_statistics(folds):
    conv, bn = nn.Conv2d(2, 1, 1, bias=False), nn.BatchNorm2d(1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 2, 1, 1))
        bn.running_mean.fill_(1.0)
        bn.running_var.fill_(4.0 - bn.eps)           # scale 1/2 exactly
        bn.bias.fill_(0.25)
    node = network_to_nir(Net(conv, bn)).nodes["conv0"]
    # bn(y) = (y - 1) / 2 + 0.25: weight [1, -0.5], bias -0.25
    assert node.weight.reshape(-1).tolist() == [1.0, -0.5]
    assert node.bias.tolist() == [-0.25]


def test_a_layer_without_nir_form_is_named():
    with pytest.raises(ExportError) as err:
        network_to_nir(Net(nn.Conv2d(2, 1, 3, padding=1), nn.ReLU()))
    assert str(err.value) == "conv_fc.1: no NIR form for ReLU"


def test_metadata_is_ours_plus_the_callers():
    ours = {"producer": f"dvsgesture-kit {__version__}", "dt": 0.002, "output": OUTPUT_NOTE}
    model = Net(nn.Conv2d(2, 1, 3, padding=1))
    assert network_to_nir(model, dt=0.002).metadata == ours
    assert network_to_nir(model, dt=0.002, metadata=None).metadata == ours
    assert network_to_nir(model, dt=0.002, metadata={"checkpoint": "a.pt"}).metadata == {**ours, "checkpoint": "a.pt"}
    # dt is stored as a float whatever number it was given as
    meta = network_to_nir(model, dt=1).metadata
    assert meta["dt"] == 1.0 and type(meta["dt"]) is float


# --- nir_tau: float32(tau_nir / dt) == float32(tau) -----------------------------------------------
# A tau just off a float32 midpoint: tau * dt / dt lands on the other side of the midpoint, so the
# first guess tau * dt maps onto the wrong float32 and one float64 step fixes it (found by search).

UP = (math.nextafter(1.25 + 2**-24, math.inf), 1e-4)   # rounds to 1.25 + 2^-23; tau*dt/dt to 1.25
DOWN = (100 + 2**-18, 0.003)                            # the midpoint: ties to 100; tau*dt/dt above it


@pytest.mark.parametrize("tau, dt, direction", [(*UP, math.inf), (*DOWN, -math.inf)], ids=["up", "down"])
def test_nir_tau_steps_to_the_float32_of_tau(tau, dt, direction):
    first = tau * dt
    assert np.float32(first / dt) != np.float32(tau)     # the first guess is one off: a step is needed
    want = math.nextafter(first, direction)
    assert np.float32(want / dt) == np.float32(tau)
    assert nir_tau(tau, dt) == want


def test_a_huge_dt_steps_down_from_overflow():
    """dt = 2^1023 passes check_dt; 2 * dt overflows to inf, and one step down gives the largest
    float64, which divided by dt is 2 - 2^-52, float32 2.0: the tau of a LIF with tau 2."""
    graph = network_to_nir(Net(MultiStepLIF(tau=2.0)), dt=2.0**1023)
    tau = graph.nodes["lif0"].tau
    assert np.float32(sys.float_info.max / 2.0**1023) == 2.0
    assert tau.shape == (2, 128, 128) and (tau == sys.float_info.max).all()


def test_nir_tau_exact_at_once():
    assert nir_tau(2.0, 1e-4) == 2.0 * 1e-4


def test_nir_tau_without_solution_says_so():
    # dt the smallest subnormal: t / dt takes only whole values, never 1.5
    with pytest.raises(ExportError) as err:
        nir_tau(1.5, 5e-324)
    assert str(err.value) == "no NIR time constant maps onto tau 1.5 with dt 5e-324"


# --- sj_tau ---------------------------------------------------------------------------------------

def _f32_bits(bits: int) -> np.float32:
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def test_sj_tau_ties_go_to_the_smallest_candidate():
    """A LIF with a huge tau (any tau > 1 is a valid config) has a subnormal float32 decay:
    1/decay overflows float32 to inf, so the candidates are the three floats below inf, then inf.
    Each agrees with decay * x on one sample only (the x nearest 0, where both give 0). Equally
    good: the first, smallest, is taken."""
    decay = float(MultiStepLIF(tau=1e40).decay(torch.device("cpu")))
    assert 0 < decay < float(np.finfo(np.float32).tiny)
    with np.errstate(over="ignore"):
        assert np.float32(1) / np.float32(decay) == np.inf
    xs = torch.linspace(-4.0, 4.0, 200_001, dtype=torch.float64).float()
    want = xs * torch.tensor(np.float32(decay))
    below_inf = [_f32_bits(0x7F7FFFFD), _f32_bits(0x7F7FFFFE), _f32_bits(0x7F7FFFFF)]
    for c in [*below_inf, np.float32(np.inf)]:
        assert int((xs / torch.tensor(c) == want).sum()) == 1
    with np.errstate(over="ignore", divide="ignore"):
        got = sj_tau(decay)
    assert got == float(below_inf[0]) == 3.4028230607370965e38
