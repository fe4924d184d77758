"""The trained network (eval mode) as a NIR graph that SpikingJelly's ``from_nir`` runs exactly.

NIR describes continuous-time neurons; a simulator discretises them with its time step ``dt``.
SpikingJelly 2.0's ``import_from_nir(graph, dt)`` builds ``LIFNode(tau=tau_nir/dt,
decay_input=True)`` from ``nir.LIF(tau_nir, r=1, v_leak=v_reset)`` and ``IFNode`` from
``nir.IF(r=1/dt)``; its LIF charges ``h = v + (x - (v - v_reset)) / tau`` in float32, ours
``h = v + decay * (x - (v - v_reset))``. Layer by layer (see the README's table):

- Conv2d + BatchNorm2d -> ``nir.Conv2d`` with the BatchNorm folded into weight and bias;
- LIF / PLIF -> ``nir.LIF`` with ``tau = tau_sj * dt``, where ``tau_sj`` is the float32 divisor
  closest in effect to our ``decay`` (exactly ``1/decay`` when that is a power of two, as for
  the seed's tau 2), ``r = 1``, ``v_leak = v_reset = 0``, ``v_threshold = 1``;
- MaxPool2d(2) on binary spikes -> ``nir.AvgPool2d(2)`` + ``nir.IF(v_threshold=1/8, v_reset=0)``:
  the average of four spikes is 0, 1/4, 1/2, 3/4 or 1 (exact in float), so the IF neuron fires
  exactly when some input spiked, whether the simulator compares with ``>`` (NIR's definition)
  or ``>=`` (SpikingJelly); it resets to 0 on every spike and otherwise integrates 0, so its
  membrane is 0 at the start of every step and it carries nothing between steps;
- Flatten -> ``nir.Flatten``; Dropout -> nothing (eval mode); Linear -> ``nir.Linear``
  (``nir.Affine`` for networks with biases, from SpikingJelly checkpoints);
- voting (mean of groups of 10) -> ``nir.Linear`` (group sums times VOTE_SCALE, integers,
  exact in any summation order) -> ``nir.Linear`` (diagonal 1 / (10 * VOTE_SCALE) in float32).
  Their product is the mean; split this way it rounds like our average pooling (n/10 for n
  spikes), which no single float32 weight does (9 * fl(0.1) rounds to 0.90000004, fl(0.9) is
  0.89999998).

The graph's output is the vote per time step [11]; the network's output is its mean over T.
"""
from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dvsprep.constants import N_POLARITIES, SENSOR_H, SENSOR_W

from .. import __version__
from ..config import check_dt
from ..errors import ExportError
from ..model import SequenceDropout, Voting
from ..neuron import LIF, PLIF, MultiStepLIF, MultiStepPLIF

NIR_INSTALL_HINT = "pip install 'dvsgesture-kit[nir]'"
DT = 1e-4                  # seconds per time step: from_nir's default, so it needs no argument
POOL_THRESHOLD = 0.125     # half the smallest nonzero average of 2x2 binary spikes


def import_nir():
    """The ``nir`` module, or ExportError with the install line when it is missing."""
    try:
        return importlib.import_module("nir")
    except ImportError as exc:
        raise ExportError(f"exporting to NIR needs the nir package: {NIR_INSTALL_HINT}") from exc


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm (eval: running statistics) folded into the convolution before it.

    Returns weight [C_out, C_in, k, k] and bias [C_out] in float32. bn(y) = y * scale + shift
    with scale = gamma / sqrt(var + eps), shift = beta - mean * scale; torch computes scale as
    rsqrt(var + eps) * gamma in float32, and so do we (weight = W * scale, rounded once). The bias
    is the shift exactly as torch's batch_norm adds it: its output for y = 0 (so regions without
    input, most of a DVS frame, get bit-identical values)."""
    with torch.no_grad():
        var, mean = bn.running_var.detach().float(), bn.running_mean.detach().float()
        gamma, beta = bn.weight.detach().float(), bn.bias.detach().float()
        scale = torch.rsqrt(var + bn.eps) * gamma
        zero = torch.zeros(1, bn.num_features, 1, 1)
        shift = F.batch_norm(zero, mean, var, gamma, beta, training=False, eps=bn.eps)[0, :, 0, 0]
        if conv.bias is not None:
            # bn(y + b) = y * scale + bn(b)
            shift = F.batch_norm(conv.bias.detach().float().view(1, -1, 1, 1), mean, var, gamma, beta,
                                 training=False, eps=bn.eps)[0, :, 0, 0]
        weight = conv.weight.detach().float() * scale.view(-1, 1, 1, 1)
    return weight.numpy(), shift.numpy()


def sj_tau(decay: float) -> float:
    """The time constant whose float32 value SpikingJelly divides by (``x / tau``) to best
    reproduce our float32 ``decay * x``.

    1/decay exactly when that is a float32 power of two (LIF tau 2: x/2 == 0.5*x for every x);
    otherwise the float32 next to 1/decay that agrees with ``decay * x`` on the most of a fixed
    sample of x (a PLIF's trained decay: they differ in the last bit for some x, see README).
    Ties go to the smallest candidate."""
    d = np.float32(decay)
    inv = np.float32(1.0) / d
    if np.float32(1.0) / inv == d and math.frexp(float(inv))[0] == 0.5:
        return float(inv)
    xs = torch.linspace(-4.0, 4.0, 200_001, dtype=torch.float64).float()
    want = xs * torch.tensor(d)
    best, best_hits = float(inv), -1
    cand = inv
    for _ in range(3):
        cand = np.nextafter(cand, np.float32(0.0))
    for _ in range(7):
        hits = int((xs / torch.tensor(cand) == want).sum())
        if hits > best_hits:
            best, best_hits = float(cand), hits
        cand = np.nextafter(cand, np.float32(np.inf))
    return best


def nir_tau(tau: float, dt: float) -> float:
    """tau_nir with float32(tau_nir / dt) == float32(tau): what from_nir divides it back into."""
    target = np.float32(tau)
    t = tau * dt
    for _ in range(64):
        got = np.float32(t / dt)
        if got == target:
            return t
        t = np.nextafter(t, np.inf if got < target else -np.inf)
    raise ExportError(f"no NIR time constant maps onto tau {tau} with dt {dt}")


def vote_factors(voting_size: int) -> tuple[int, float]:
    """(k, w): k * n is exact, and float32(k * n * w) == float32(n / voting_size) for every
    spike count n in 0..voting_size, the rounding of our average pooling."""
    for k in range(1, 1000):
        w = np.float32(1.0 / (voting_size * k))
        if all(np.float32(float(k * n) * float(w)) == np.float32(n) / np.float32(voting_size)
               for n in range(voting_size + 1)):
            return k, float(w)
    raise ExportError(f"no exact float32 factorisation of a {voting_size}-way mean")


def _neuron_params(m: nn.Module) -> tuple[float, float, float]:
    """(decay, v_threshold, v_reset) of one of our LIF/PLIF modules, as float32 values."""
    decay = float(m.decay(torch.device("cpu")).detach().float())
    return decay, m.v_threshold, m.v_reset


def _full(shape: tuple[int, ...], value: float, dtype=np.float32) -> np.ndarray:
    return np.full(shape, value, dtype=dtype)


Shape = tuple[int, ...]
Nodes = dict[str, Any]


def _conv_nodes(nir, i: int, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, shape: Shape) -> tuple[Nodes, Shape]:
    # zero padding only (NIR has no other mode; "same" is a string), and square kernels: nir
    # infers a convolution's output size from the kernel's height for both dimensions
    if (conv.groups != 1 or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str) or conv.kernel_size[0] != conv.kernel_size[1]):
        raise ExportError(f"conv_fc.{i}: only plain stride-1 convolutions are exported")
    if bn is not None:
        weight, bias = fold_batchnorm(conv, bn)
    else:
        weight = conv.weight.detach().float().numpy()
        bias = (conv.bias.detach().float().numpy() if conv.bias is not None
                else np.zeros(weight.shape[0], np.float32))
    node = nir.Conv2d(input_shape=shape[1:], weight=weight, stride=(1, 1), padding=tuple(conv.padding),
                      dilation=(1, 1), groups=1, bias=bias)
    (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
    return {f"conv{i}": node}, (weight.shape[0], shape[1] + 2 * ph - kh + 1, shape[2] + 2 * pw - kw + 1)


def _lif_nodes(nir, i: int, m: nn.Module, shape: Shape, dt: float) -> tuple[Nodes, Shape]:
    decay, v_th, v_reset = _neuron_params(m)
    tau = nir_tau(sj_tau(decay), dt)
    node = nir.LIF(tau=_full(shape, tau, np.float64), r=_full(shape, 1.0), v_leak=_full(shape, v_reset),
                   v_threshold=_full(shape, v_th), v_reset=_full(shape, v_reset))
    return {f"lif{i}": node}, shape


def _maxpool_nodes(nir, i: int, m: nn.MaxPool2d, shape: Shape, dt: float) -> tuple[Nodes, Shape]:
    if (m.kernel_size not in (2, (2, 2)) or m.stride not in (2, (2, 2)) or m.padding not in (0, (0, 0))
            or m.dilation not in (1, (1, 1)) or m.ceil_mode):   # else not the 2x2 average the IF layer gives
        raise ExportError(f"conv_fc.{i}: only 2x2 max-pooling with stride 2 is exported")
    out = (shape[0], shape[1] // 2, shape[2] // 2)
    return {f"pool{i}_avg": nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                          padding=np.array([0, 0])),
            f"pool{i}_if": nir.IF(r=_full(out, 1.0 / dt), v_threshold=_full(out, POOL_THRESHOLD),
                                  v_reset=_full(out, 0.0))}, out


def _linear_nodes(nir, i: int, m: nn.Linear) -> tuple[Nodes, Shape]:
    weight = m.weight.detach().float().numpy()
    if m.bias is not None:
        node = nir.Affine(weight=weight, bias=m.bias.detach().float().numpy())
    else:
        node = nir.Linear(weight=weight)
    return {f"fc{i}": node}, (weight.shape[0],)


def _vote_nodes(nir, i: int, m: Voting, shape: Shape) -> tuple[Nodes, Shape]:
    v = m.voting_size
    groups = shape[0] // v
    k, w = vote_factors(v)
    summed = np.zeros((groups, shape[0]), np.float32)
    for g in range(groups):
        summed[g, g * v:(g + 1) * v] = k
    return {f"vote{i}_sum": nir.Linear(weight=summed),
            f"vote{i}_mean": nir.Linear(weight=np.diag(np.full(groups, w, np.float32)))}, (groups,)


def network_to_nir(model: nn.Module, *, dt: float = DT, metadata: dict[str, Any] | None = None):
    """``model`` (our MultiStepNet or StepwiseNet) as a ``nir.NIRGraph``: one chain of nodes
    named after the layers they come from (``conv0``, ``lif2``, ``pool3_avg``, ``pool3_if``, ...)
    from ``input`` [2, 128, 128] to ``output`` [11]."""
    nir = import_nir()
    check_dt(dt)
    layers = list(model.conv_fc)
    shape: Shape = (N_POLARITIES, SENSOR_H, SENSOR_W)
    nodes: Nodes = {"input": nir.Input(input_type={"input": np.array(shape)})}
    i = 0
    while i < len(layers):
        m, step = layers[i], 1
        if isinstance(m, nn.Conv2d):
            bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d) else None
            new, shape = _conv_nodes(nir, i, m, bn, shape)
            step += bn is not None
        elif isinstance(m, (MultiStepLIF, MultiStepPLIF, LIF, PLIF)):
            new, shape = _lif_nodes(nir, i, m, shape, dt)
        elif isinstance(m, nn.MaxPool2d):
            new, shape = _maxpool_nodes(nir, i, m, shape, dt)
        elif isinstance(m, nn.Flatten):
            new = {f"flatten{i}": nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1)}
            shape = (int(np.prod(shape)),)
        elif isinstance(m, (SequenceDropout, nn.Dropout)):
            new = {}                               # identity in eval mode
        elif isinstance(m, nn.Linear):
            new, shape = _linear_nodes(nir, i, m)
        elif isinstance(m, Voting):
            new, shape = _vote_nodes(nir, i, m, shape)
        else:
            raise ExportError(f"conv_fc.{i}: no NIR form for {type(m).__name__}")
        nodes.update(new)
        i += step
    nodes["output"] = nir.Output(output_type={"output": np.array(shape)})
    names = list(nodes)
    meta = {"producer": f"dvsgesture-kit {__version__}", "dt": float(dt),
            "output": "vote per time step; the network's output is its mean over the time steps"}
    meta.update(metadata or {})
    return nir.NIRGraph(nodes=nodes, edges=list(zip(names[:-1], names[1:])), metadata=meta)
