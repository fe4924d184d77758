"""dvsg_train.model: the two forms agree, and agree with SpikingJelly 2.0's DVSGestureNet."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dvsg_train.errors import ConfigError
from dvsg_train.model import MultiStepNet, StepwiseNet, build_model


def excite(model: nn.Module, linear_gain: float) -> None:
    """Random BN affine/statistics and larger Linear weights, so every layer spikes."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0, generator=g)
                m.bias.uniform_(0.0, 1.2, generator=g)
                m.running_var.uniform_(0.2, 1.0, generator=g)
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
            if isinstance(m, nn.Linear):
                m.weight.mul_(linear_gain)


def frames(T: int, N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(T, N, 2, 128, 128, generator=g) * 3).floor()


@pytest.mark.parametrize("neuron", ["lif", "plif"])
def test_stepwise_equals_multistep(neuron):
    torch.manual_seed(0)     # the weights, whatever tests ran before
    ms = build_model(4, "multistep", neuron)
    excite(ms, 8.0)
    sw = build_model(4, "stepwise", neuron)
    assert list(sw.state_dict()) == list(ms.state_dict())
    sw.load_state_dict(ms.state_dict())
    ms.eval(), sw.eval()
    x = frames(4, 3)
    results = []
    for m in (ms, sw):
        xr = x.clone().requires_grad_()
        out = m(xr)
        (out * torch.arange(11.0)).sum().backward()
        results.append((out.detach(), xr.grad, [p.grad for p in m.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = results
    assert o1.shape == (3, 11)
    assert torch.equal(o1, o2)
    assert o1.count_nonzero() > 0 and o1.unique().numel() > 2
    torch.testing.assert_close(o1 * 40, (o1 * 40).round())  # rates are k / (10 * T)
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-6)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_dropout_mask_shared_over_time_and_reset_per_forward():
    ms = build_model(4, "multistep")
    excite(ms, 8.0)
    ms.train()
    x = frames(3, 2).repeat(1, 1, 1, 1, 1)
    x[1], x[2] = x[0], x[0]                                  # constant input over time
    dp = ms.conv_fc[21]
    seen = []
    dp.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    torch.manual_seed(0)
    ms(x)
    inp, out = seen[0]
    kept = (out != 0) | (inp == 0)
    assert inp.shape[:2] == (3, 2)
    zeroed = (out == 0) & (inp != 0)
    assert zeroed.any()
    # a feature dropped at one step is dropped at every step, and kept ones are scaled by 2
    assert torch.equal(zeroed.any(0) & (inp != 0), zeroed)
    torch.testing.assert_close(out[kept & (inp != 0)], 2 * inp[kept & (inp != 0)])


def _spikingjelly_net(neuron: str):
    from spikingjelly.activation_based import functional, neuron as sjn, surrogate
    from spikingjelly.activation_based.model.parametric_lif_net import DVSGestureNet

    if neuron == "lif":
        net = DVSGestureNet(channels=128, spiking_neuron=sjn.LIFNode, tau=2.0,
                            surrogate_function=surrogate.ATan(), detach_reset=True)
    else:
        net = DVSGestureNet(channels=128, spiking_neuron=sjn.ParametricLIFNode, init_tau=2.0,
                            surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(net, "m")
    return net, functional


@pytest.mark.parametrize("neuron", ["lif", "plif"])
def test_matches_spikingjelly_dvsgesturenet(neuron):
    """channels=128 (SpikingJelly's FC is fixed at 512 = 4 * 128); T=2, N=1 to stay fast."""
    ours = MultiStepNet(128, neuron)
    excite(ours, 10.0)
    sj, functional = _spikingjelly_net(neuron)
    missing, unexpected = sj.load_state_dict(ours.state_dict(), strict=False)
    assert sorted(missing) == ["conv_fc.22.bias", "conv_fc.25.bias"] and not unexpected
    with torch.no_grad():
        sj.conv_fc[22].bias.zero_()
        sj.conv_fc[25].bias.zero_()
    x = frames(2, 1, seed=3)
    for training in (False, True):
        ours.train(training), sj.train(training)
        torch.manual_seed(11)                               # same dropout masks in train mode
        a = ours(x)
        torch.manual_seed(11)
        b = sj(x).mean(0)
        functional.reset_net(sj)
        assert torch.equal(a, b), (training, a, b)
        assert a.count_nonzero() > 0
    a.sum().backward()
    b.sum().backward()
    for name in ("conv_fc.0.weight", "conv_fc.22.weight", "conv_fc.25.weight"):
        torch.testing.assert_close(ours.get_parameter(name).grad, sj.get_parameter(name).grad,
                                   rtol=1e-4, atol=1e-7)


def test_build_model_errors():
    with pytest.raises(ConfigError, match="stepwise"):
        build_model(4, "stepwise", "lif", backend="cupy")
    with pytest.raises(ConfigError, match="unknown neuron"):
        build_model(4, "multistep", "izhikevich")
    with pytest.raises(ConfigError, match="unknown net"):
        build_model(4, "recurrent")
    assert isinstance(build_model(4, "stepwise"), StepwiseNet)
    assert build_model(6).conv_fc[22].in_features == 6 * 16
    assert build_model(6).conv_fc[22].out_features == 6 * 4
