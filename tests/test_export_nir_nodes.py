"""nir_graph's node builders one at a time, on hand-made layers: which layouts each refuses (one
condition at a time, the message word for word), the arrays it puts in the NIR nodes (values,
shapes and float32/float64 dtypes, which the written file keeps), and the shapes it hands on,
on non-square inputs so that height and width cannot be swapped unnoticed. Expected values are
worked out by hand in the comments; nothing is trained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dvsg_train.errors import ExportError
from dvsg_train.export.nir_graph import (_conv_nodes, _lif_nodes, _maxpool_nodes, _vote_nodes, fold_batchnorm,
                                         sj_tau, vote_factors)
from dvsg_train.model import Voting
from dvsg_train.neuron import MultiStepLIF, PLIF

DT = 1e-4


@pytest.fixture(scope="module")
def nir():
    return pytest.importorskip("nir")


def _f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def _assert_array(got, want: np.ndarray) -> None:
    """Same dtype, shape and values (bit for bit)."""
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- convolution

CONV_REFUSAL = "conv_fc.5: only plain stride-1 convolutions are exported"


@pytest.mark.parametrize("kwargs", [dict(groups=3), dict(stride=2), dict(stride=(1, 2)), dict(dilation=2),
                                    dict(dilation=(2, 1)), dict(padding_mode="reflect"),
                                    dict(padding_mode="circular"), dict(padding="same"),
                                    dict(kernel_size=(3, 5)), dict(kernel_size=(5, 3))],
                         ids=["groups", "stride", "stride_w", "dilation", "dilation_h", "reflect", "circular",
                              "same", "kernel_3x5", "kernel_5x3"])
def test_conv_refuses_each_non_plain_layout_alone(nir, kwargs):
    kwargs = {"kernel_size": 3, "padding": 1, **kwargs}
    conv = nn.Conv2d(3, 6, bias=False, **kwargs)
    with pytest.raises(ExportError) as err:
        _conv_nodes(nir, 5, conv, None, (3, 10, 12))
    assert str(err.value) == CONV_REFUSAL


def _conv(bias: bool) -> nn.Conv2d:
    """3 -> 5 channels (C_in != C_out), kernel 3, padding (1, 0), weights 0.25 * (0..134)."""
    conv = nn.Conv2d(3, 5, 3, padding=(1, 0), bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(5 * 3 * 3 * 3, dtype=torch.float32).view(5, 3, 3, 3) * 0.25)
        if bias:
            conv.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, -3.5]))
    return conv


@pytest.mark.parametrize("bias", [False, True])
def test_conv_without_batchnorm_keeps_weight_and_bias(nir, bias):
    """A convolution with no BatchNorm after it: its own weight, its bias or float32 zeros (one
    per output channel), the spatial input shape, and the output shape from each side's padding:
    [3, 10, 12] -> H 10 + 2*1 - 3 + 1 = 10, W 12 + 2*0 - 3 + 1 = 10."""
    conv = _conv(bias)
    nodes, shape = _conv_nodes(nir, 4, conv, None, (3, 10, 12))
    assert list(nodes) == ["conv4"] and shape == (5, 10, 10)
    node = nodes["conv4"]
    _assert_array(node.weight, (np.arange(135, dtype=np.float32) * np.float32(0.25)).reshape(5, 3, 3, 3))
    _assert_array(node.bias, _f32(0.5, -1.0, 2.0, 0.0, -3.5) if bias else np.zeros(5, np.float32))
    assert tuple(node.input_shape) == (10, 12)
    assert tuple(node.padding) == (1, 0) and tuple(node.stride) == (1, 1) and tuple(node.dilation) == (1, 1)
    assert node.groups == 1
    # NIR's own types agree with the shape handed on
    assert node.input_type["input"].tolist() == [3, 10, 12]
    assert node.output_type["output"].tolist() == [5, 10, 10]


def test_conv_with_batchnorm_takes_the_folded_weight_and_bias(nir):
    conv, bn = _fold_layers(conv_bias=False)
    nodes, shape = _conv_nodes(nir, 0, conv, bn, (1, 6, 4))
    assert shape == (3, 6, 4)                       # 1x1 kernel, no padding
    _assert_array(nodes["conv0"].weight, _f32(2.0, 3.0, 0.5).reshape(3, 1, 1, 1))
    _assert_array(nodes["conv0"].bias, _f32(-0.5, -5.0, -2.5))


# ----------------------------------------------------------------------------- batch norm folding

def _fold_layers(conv_bias: bool, eps: float = 0.25) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Dyadic values, so every step is exact in float32 and the fold is known by hand:
    var + eps = 4, 1, 16 -> rsqrt 0.5, 1, 0.25; gamma 2, -3, 4 -> scale 1, -3, 1."""
    conv = nn.Conv2d(1, 3, 1, bias=conv_bias)
    bn = nn.BatchNorm2d(3, eps=eps).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.0, 0.5]).view(3, 1, 1, 1))
        if conv_bias:
            conv.bias.copy_(torch.tensor([1.5, -1.0, 2.0]))
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([3.75, 0.75, 15.75]))
        bn.weight.copy_(torch.tensor([2.0, -3.0, 4.0]))
        bn.bias.copy_(torch.tensor([0.5, 1.0, -2.0]))
    return conv, bn


def test_fold_batchnorm_by_hand_with_its_own_eps():
    """weight = W * scale = 2*1, -1*-3, 0.5*1; shift = beta - mean * scale = 0.5 - 1, 1 - 6,
    -2 - 0.5. eps is the layer's 0.25 (torch's default 1e-5 would move every value)."""
    weight, bias = fold_batchnorm(*_fold_layers(conv_bias=False))
    _assert_array(weight, _f32(2.0, 3.0, 0.5).reshape(3, 1, 1, 1))
    _assert_array(bias, _f32(-0.5, -5.0, -2.5))


def test_fold_batchnorm_with_a_conv_bias():
    """bn(y + b) = y * scale + bn(b), bn(b) = (b - mean) * scale + beta = 0.5*1 + 0.5,
    1*-3 + 1, 1.5*1 - 2; the weight is folded as without a bias."""
    conv, bn = _fold_layers(conv_bias=True)
    weight, bias = fold_batchnorm(conv, bn)
    _assert_array(weight, _f32(2.0, 3.0, 0.5).reshape(3, 1, 1, 1))
    _assert_array(bias, _f32(1.0, -2.0, -0.5))
    # the same as the two layers give on an input of zeros (torch as a second oracle)
    with torch.no_grad():
        want = bn(conv(torch.zeros(1, 1, 1, 1)))[0, :, 0, 0].numpy()
    _assert_array(bias, want)
    assert conv.bias.tolist() == [1.5, -1.0, 2.0]          # the layers are left as they were
    assert bn.running_mean.tolist() == [1.0, -2.0, 0.5] and bn.running_var.tolist() == [3.75, 0.75, 15.75]


# ----------------------------------------------------------------------------- max pooling

POOL_REFUSAL = "conv_fc.7: only 2x2 max-pooling with stride 2 is exported"


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d((2, 2)), nn.MaxPool2d(2, stride=(2, 2)),
                                  nn.MaxPool2d((2, 2), stride=(2, 2), padding=(0, 0)), nn.MaxPool2d(2, padding=(0, 0))],
                         ids=["int", "kernel_tuple", "stride_tuple", "all_tuples", "padding_tuple"])
def test_maxpool_accepted_forms(nir, pool):
    """2x2 / stride 2 / no padding, as ints or as pairs. [4, 10, 6] -> [4, 5, 3] (height first)."""
    nodes, shape = _maxpool_nodes(nir, 7, pool, (4, 10, 6), DT)
    assert shape == (4, 5, 3)
    assert list(nodes) == ["pool7_avg", "pool7_if"]
    avg, spike = nodes["pool7_avg"], nodes["pool7_if"]
    assert avg.kernel_size.tolist() == [2, 2] and avg.stride.tolist() == [2, 2] and avg.padding.tolist() == [0, 0]
    _assert_array(spike.r, np.full((4, 5, 3), np.float32(1e4)))            # 1 / dt
    _assert_array(spike.v_threshold, np.full((4, 5, 3), np.float32(0.125)))
    _assert_array(spike.v_reset, np.zeros((4, 5, 3), np.float32))
    assert spike.input_type["input"].tolist() == [4, 5, 3]


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, stride=2), nn.MaxPool2d((2, 3), stride=2),
                                  nn.MaxPool2d((3, 2), stride=2), nn.MaxPool2d(2, stride=1),
                                  nn.MaxPool2d(2, stride=(2, 3)), nn.MaxPool2d(2, stride=(3, 2)),
                                  nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, padding=(1, 0)),
                                  nn.MaxPool2d(2, padding=(0, 1)), nn.MaxPool2d(2, dilation=2),
                                  nn.MaxPool2d(2, dilation=(1, 2)), nn.MaxPool2d(2, ceil_mode=True)],
                         ids=["kernel3", "kernel_2x3", "kernel_3x2", "stride1", "stride_2x3", "stride_3x2",
                              "padding1", "padding_1x0", "padding_0x1", "dilation2", "dilation_1x2", "ceil_mode"])
def test_maxpool_refuses_each_other_layout_alone(nir, pool):
    with pytest.raises(ExportError) as err:
        _maxpool_nodes(nir, 7, pool, (4, 10, 6), DT)
    assert str(err.value) == POOL_REFUSAL


# ----------------------------------------------------------------------------- LIF neurons

def test_lif_node_parameters(nir):
    """Every parameter the neuron has, one value per neuron: tau 2 -> tau_nir 2 * dt (float64,
    and what from_nir divides back into exactly 2), r 1, v_leak = v_reset = -0.5, v_threshold
    0.75, all but tau float32."""
    shape = (3, 2, 5)
    nodes, out = _lif_nodes(nir, 6, MultiStepLIF(2.0, v_threshold=0.75, v_reset=-0.5), shape, DT)
    assert list(nodes) == ["lif6"] and out == shape
    node = nodes["lif6"]
    assert node.tau.dtype == np.float64 and node.tau.shape == shape
    assert np.all(np.float32(node.tau / DT) == np.float32(2.0))
    assert np.allclose(node.tau, 2e-4, rtol=1e-12, atol=0)
    _assert_array(node.r, np.ones(shape, np.float32))
    _assert_array(node.v_leak, np.full(shape, np.float32(-0.5)))
    _assert_array(node.v_threshold, np.full(shape, np.float32(0.75)))
    _assert_array(node.v_reset, np.full(shape, np.float32(-0.5)))


def test_plif_tau_survives_the_round_trip_only_in_float64(nir):
    """A PLIF decay (0.31638941) whose tau_nir, stored as float32, would no longer divide back
    into SpikingJelly's tau: the node keeps tau_nir in float64."""
    decay = 0.31638941168785095
    neuron = PLIF()
    with torch.no_grad():
        neuron.w.copy_(torch.tensor(np.log(decay / (1 - decay)), dtype=torch.float32))
    d = float(neuron.w.detach().sigmoid())
    nodes, _ = _lif_nodes(nir, 2, neuron, (4,), DT)
    tau = nodes["lif2"].tau
    target = np.float32(sj_tau(d))
    assert tau.dtype == np.float64 and np.all(np.float32(tau / DT) == target)
    assert np.float32(np.float32(tau[0]) / DT) != target       # why float64: float32 would not do


# ----------------------------------------------------------------------------- voting

def test_vote_nodes_weights_and_dtypes(nir):
    """110 outputs in groups of 10: a sum with weight 7 over each group, then 1/70 in float32 on
    the diagonal (vote_factors(10) = (7, fl32(1/70))), both float32."""
    nodes, shape = _vote_nodes(nir, 27, Voting(10), (110,))
    assert list(nodes) == ["vote27_sum", "vote27_mean"] and shape == (11,)
    want = np.zeros((11, 110), np.float32)
    for g in range(11):
        want[g, 10 * g:10 * g + 10] = 7
    _assert_array(nodes["vote27_sum"].weight, want)
    _assert_array(nodes["vote27_mean"].weight, np.diag(np.full(11, np.float32(1 / 70))))


def test_vote_nodes_of_another_size(nir):
    """Groups of 4 (vote_factors(4) = (1, 0.25)) over 12 outputs -> 3 votes."""
    nodes, shape = _vote_nodes(nir, 3, Voting(4), (12,))
    assert shape == (3,)
    _assert_array(nodes["vote3_sum"].weight, np.kron(np.eye(3, dtype=np.float32), np.ones((1, 4), np.float32)))
    _assert_array(nodes["vote3_mean"].weight, np.diag(_f32(0.25, 0.25, 0.25)))


def _exact(v: int, k: int, w: float) -> bool:
    """The specification: float32(k * n * w) is our float32 mean n / v for every n in 0..v."""
    return all(np.float32(float(k * n) * w) == np.float32(n) / np.float32(v) for n in range(v + 1))


@pytest.mark.parametrize("v, k, w", [(1, 1, 1.0), (2, 1, 0.5), (3, 1, float(np.float32(1 / 3))), (4, 1, 0.25),
                                     (10, 7, float(np.float32(1 / 70)))])
def test_vote_factors_smallest_k(v, k, w):
    """The smallest integer factor k (k = 1 where one float32 weight is already exact)."""
    assert vote_factors(v) == (k, w)
    assert _exact(v, k, w)
    assert not any(_exact(v, j, float(np.float32(1 / (v * j)))) for j in range(1, k))


def test_vote_factors_without_an_exact_split():
    """158: no k below 1000 splits the mean exactly (checked here against the specification)."""
    assert not any(_exact(158, k, float(np.float32(1 / (158 * k)))) for k in range(1, 1000))
    with pytest.raises(ExportError) as err:
        vote_factors(158)
    assert str(err.value) == "no exact float32 factorisation of a 158-way mean"
