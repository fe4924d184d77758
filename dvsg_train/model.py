"""The PLIF-paper network for DVS128 Gesture, in a step-by-step and a multi-step form.

``{c128k3s1-BN-LIF-MPk2s2}*5 - DP - FC512 - LIF - DP - FC110 - LIF - APk10s10``, with
``channels`` in place of 128 (FC512 is channels*4). Both forms hold their layers in
``self.conv_fc`` at the same indices as SpikingJelly 2.0's ``DVSGestureNet``, so state_dicts are
interchangeable between our two forms and map 1:1 onto SpikingJelly's (whose Linear layers have
biases; ours have none unless ``linear_bias``, which networks from SpikingJelly checkpoints need).

Input [T, N, 2, 128, 128] float; output [N, 11], the firing rate of the voting layer averaged
over T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvsprep.constants import N_CLASSES, N_POLARITIES, SENSOR_H, SENSOR_W

from .config import NETS, NEURONS
from .errors import ConfigError
from .neuron import LIF, PLIF, MultiStepLIF, MultiStepPLIF

N_BLOCKS = 5
VOTE = 10
DROPOUT_P = 0.5


class SequenceDropout(nn.Module):
    """Dropout with one mask per sample shared by all time steps (SpikingJelly's layer.Dropout).

    Multi-step: x [T, N, ...]. The mask is drawn as ``F.dropout(ones_like(x[0]))``, the same
    RNG call SpikingJelly makes, so equal seeds give equal masks.
    """

    def __init__(self, p: float = DROPOUT_P):
        super().__init__()
        self.p = p

    def forward(self, x_seq: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x_seq
        return x_seq * F.dropout(torch.ones_like(x_seq[0]), self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class StepDropout(SequenceDropout):
    """Single-step form: the mask drawn at the first step is kept until ``reset()``."""

    def __init__(self, p: float = DROPOUT_P):
        super().__init__(p)
        self.mask: Tensor | None = None

    def reset(self) -> None:
        self.mask = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mask is None:
            self.mask = F.dropout(torch.ones_like(x), self.p, training=True)
        return x * self.mask


class Voting(nn.Module):
    """[..., 110] -> [..., 11]: mean of consecutive groups of 10 (SpikingJelly's VotingLayer)."""

    def __init__(self, voting_size: int = VOTE):
        super().__init__()
        self.voting_size = voting_size

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool1d(x.unsqueeze(1), self.voting_size, self.voting_size).squeeze(1)


def _layers(channels: int, neuron_factory, dropout_factory, linear_bias: bool = False) -> list[nn.Module]:
    if channels < 1:
        raise ConfigError(f"--channels must be >= 1, got {channels}")
    layers: list[nn.Module] = []
    for i in range(N_BLOCKS):
        layers += [nn.Conv2d(N_POLARITIES if i == 0 else channels, channels, kernel_size=3,
                             padding=1, bias=False),
                   nn.BatchNorm2d(channels),
                   neuron_factory(),
                   nn.MaxPool2d(2, 2)]
    side_h, side_w = SENSOR_H >> N_BLOCKS, SENSOR_W >> N_BLOCKS
    hidden = channels * 4
    layers += [nn.Flatten(),
               dropout_factory(),
               nn.Linear(channels * side_h * side_w, hidden, bias=linear_bias),
               neuron_factory(),
               dropout_factory(),
               nn.Linear(hidden, N_CLASSES * VOTE, bias=linear_bias),
               neuron_factory(),
               Voting(VOTE)]
    return layers


class MultiStepNet(nn.Module):
    """Stateless layers run on the folded [T*N, ...] batch; neurons and dropout see [T, N, ...]."""

    def __init__(self, channels: int = 128, neuron: str = "lif", tau: float = 2.0,
                 backend: str = "torch", linear_bias: bool = False):
        super().__init__()
        neuron_cls = _neuron_class(neuron, MultiStepLIF, MultiStepPLIF)
        self.conv_fc = nn.Sequential(*_layers(
            channels, lambda: neuron_cls(tau, detach_reset=True, backend=backend), SequenceDropout,
            linear_bias))
        # Indices of the layers that need the time axis; all others run on [T*N, ...].
        self._sequence_layers = frozenset(
            i for i, m in enumerate(self.conv_fc)
            if isinstance(m, (MultiStepLIF, MultiStepPLIF, SequenceDropout)))

    def set_backend(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, (MultiStepLIF, MultiStepPLIF)):
                m.backend = backend

    def forward(self, x_seq: Tensor) -> Tensor:
        """x_seq [T, N, 2, 128, 128] -> firing rates [N, 11]."""
        T, N = x_seq.shape[:2]
        y = x_seq.flatten(0, 1)
        for i, m in enumerate(self.conv_fc):
            if i in self._sequence_layers:
                y = m(y.unflatten(0, (T, N))).flatten(0, 1)
            else:
                y = m(y)
        return y.unflatten(0, (T, N)).mean(0)


class StepwiseNet(nn.Module):
    """Single-step layers called once per time step in a Python loop (the tutorial's PythonNet)."""

    def __init__(self, channels: int = 128, neuron: str = "lif", tau: float = 2.0,
                 linear_bias: bool = False):
        super().__init__()
        neuron_cls = _neuron_class(neuron, LIF, PLIF)
        self.conv_fc = nn.Sequential(*_layers(
            channels, lambda: neuron_cls(tau, detach_reset=True), StepDropout, linear_bias))

    def reset(self) -> None:
        for m in self.modules():
            if isinstance(m, (LIF, PLIF, StepDropout)):
                m.reset()

    def forward(self, x_seq: Tensor) -> Tensor:
        """x_seq [T, N, 2, 128, 128] -> firing rates [N, 11]. Neuron state is reset first."""
        self.reset()
        out = torch.stack([self.conv_fc(x_seq[t]) for t in range(x_seq.shape[0])])
        self.reset()
        return out.mean(0)


def _neuron_class(neuron: str, lif_cls, plif_cls):
    if neuron == "lif":
        return lif_cls
    if neuron == "plif":
        return plif_cls
    raise ConfigError(f"unknown neuron {neuron!r}; choose one of {', '.join(NEURONS)}")


def build_model(channels: int = 128, net: str = "multistep", neuron: str = "lif",
                backend: str = "torch", tau: float = 2.0, linear_bias: bool = False) -> nn.Module:
    """The network as configured. ``backend`` ("torch"/"cupy") applies to the multi-step form;
    ``linear_bias`` gives both Linear layers a bias (as SpikingJelly's DVSGestureNet has)."""
    if net == "multistep":
        return MultiStepNet(channels, neuron, tau, backend, linear_bias)
    if net == "stepwise":
        if backend != "torch":
            raise ConfigError(f"the {backend} backend is for --net multistep; the stepwise net "
                              "runs single-step neurons in torch")
        return StepwiseNet(channels, neuron, tau, linear_bias)
    raise ConfigError(f"unknown net {net!r}; choose one of {', '.join(NETS)}")
