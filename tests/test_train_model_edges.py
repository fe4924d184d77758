"""dvsg_train.model against a written specification: the exact layer list the design gives
(``{c-k3s1-BN-LIF-MPk2s2}*5 - DP - FC(4c) - LIF - DP - FC110 - LIF - APk10s10``) for every
option that changes it (channels, neuron, tau, backend, Linear biases), the defaults, the
refusals word for word, and the dropout layers' mask scale and p = 0 / p = 1 edges.

The other model tests compare the two network forms with each other and with SpikingJelly at
the default settings; a setting that was dropped on its way to the layers (tau, linear_bias,
backend) gave the same network there.
"""
from __future__ import annotations

import math

import pytest
import torch

from dvsg_train.errors import ConfigError
from dvsg_train.model import MultiStepNet, SequenceDropout, StepDropout, StepwiseNet, Voting, build_model


def spec(c: int, neuron: str, backend: str | None, bias: bool, tau: float = 2.0) -> list[str]:
    """The design's layer list as torch prints it (multi-step neurons name their backend)."""
    cell = ("MultiStep" if backend else "") + ("LIF" if neuron == "lif" else "PLIF")
    args = (f"tau={tau}, " if neuron == "lif" else "") + "v_threshold=1.0, v_reset=0.0, alpha=2.0, detach_reset=True" \
        + (f", backend={backend}" if backend else "")
    n = f"{cell}({args})"
    drop = "SequenceDropout(p=0.5)" if backend else "StepDropout(p=0.5)"
    out = []
    for i in range(5):
        out += [f"Conv2d({2 if i == 0 else c}, {c}, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)",
                f"BatchNorm2d({c}, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)",
                n, "MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)"]
    out += ["Flatten(start_dim=1, end_dim=-1)", drop,
            f"Linear(in_features={c * 16}, out_features={c * 4}, bias={bias})", n, drop,
            f"Linear(in_features={c * 4}, out_features=110, bias={bias})", n, "Voting()"]
    return out


def layers(model) -> list[str]:
    return [repr(m) for m in model.conv_fc]


@pytest.mark.parametrize("net", ["multistep", "stepwise"])
@pytest.mark.parametrize("neuron", ["lif", "plif"])
@pytest.mark.parametrize("bias", [False, True])
def test_layers_follow_the_design(net, neuron, bias):
    backend = "torch" if net == "multistep" else None
    model = build_model(channels=3, net=net, neuron=neuron, linear_bias=bias)
    assert type(model) is (MultiStepNet if net == "multistep" else StepwiseNet)
    assert layers(model) == spec(3, neuron, backend, bias)
    for i in (22, 25):
        assert (model.conv_fc[i].bias is not None) is bias


def test_tau_and_backend_reach_every_neuron():
    assert layers(build_model(channels=2, tau=3.0, backend="cupy")) == spec(2, "lif", "cupy", False, tau=3.0)
    assert layers(build_model(channels=2, net="stepwise", tau=3.0)) == spec(2, "lif", None, False, tau=3.0)
    for net in ("multistep", "stepwise"):
        plif = build_model(channels=2, net=net, neuron="plif", tau=5.0)
        ws = [m.w.item() for m in plif.modules() if hasattr(m, "w")]
        assert len(ws) == 7 and all(w == pytest.approx(-math.log(4.0), abs=1e-7) for w in ws)   # w = -log(tau0 - 1)


def test_defaults_are_the_papers_network():
    """channels 128, multi-step LIF with tau 2 in torch, no Linear biases; the classes alike."""
    want = spec(128, "lif", "torch", False)
    assert layers(build_model()) == want
    assert layers(MultiStepNet()) == want
    assert layers(StepwiseNet()) == spec(128, "lif", None, False)


def test_one_channel_is_the_smallest_network():
    assert layers(build_model(channels=1)) == spec(1, "lif", "torch", False)
    for bad in (0, -1):
        with pytest.raises(ConfigError) as err:
            build_model(channels=bad)
        assert str(err.value) == f"--channels must be >= 1, got {bad}"


def test_refusals_word_for_word():
    with pytest.raises(ConfigError) as err:
        build_model(channels=2, neuron="izh")
    assert str(err.value) == "unknown neuron 'izh'; choose one of lif, plif"
    with pytest.raises(ConfigError) as err:
        build_model(channels=2, net="rnn")
    assert str(err.value) == "unknown net 'rnn'; choose one of multistep, stepwise"
    with pytest.raises(ConfigError) as err:
        build_model(channels=2, net="stepwise", backend="cupy")
    assert str(err.value) == ("the cupy backend is for --net multistep; the stepwise net runs "
                              "single-step neurons in torch")


@pytest.mark.parametrize("layer", [SequenceDropout, StepDropout])
def test_dropout_scales_kept_units_by_one_over_one_minus_p(layer):
    """p = 0.25: every unit is 0 or 4/3 of its input (F.dropout's inverted scaling by this p)."""
    torch.manual_seed(0)
    d = layer(0.25).train()
    x = torch.ones(3, 64, 100) if layer is SequenceDropout else torch.ones(64, 100)
    y = d(x)
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 4 / 3))
    assert 0 < (y == 0).sum() < y.numel()


def test_sequence_dropout_of_one_time_step():
    torch.manual_seed(0)
    y = SequenceDropout(0.5).train()(torch.ones(1, 4, 8))
    assert y.shape == (1, 4, 8) and set(y.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("layer", [SequenceDropout, StepDropout])
def test_dropout_edges_p0_keeps_everything_without_drawing_p1_drops_everything(layer):
    x = torch.rand(2, 3, 5) + 0.5
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert torch.equal(layer(0.0).train()(x), x)
    assert torch.equal(torch.get_rng_state(), state)        # no mask drawn at p = 0
    assert torch.equal(layer(1.0).train()(x), torch.zeros_like(x))


def test_voting_means_groups_of_ten():
    x = torch.arange(2 * 110, dtype=torch.float32).reshape(2, 110)
    want = torch.tensor([[10 * g + 4.5 for g in range(11)], [110 + 10 * g + 4.5 for g in range(11)]])
    assert torch.equal(Voting()(x), want)
