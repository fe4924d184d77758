"""dvsg_train.neuron: design check values, hand-written backward vs autograd, SpikingJelly."""
from __future__ import annotations

import math

import pytest
import torch

from dvsg_train.errors import BackendUnavailableError, ConfigError
from dvsg_train.neuron import (
    LIF,
    PLIF,
    MultiStepLIF,
    MultiStepPLIF,
    lif_multistep,
    lif_multistep_torch,
)

DESIGN_X = [[1.5, 0.3, 2.5], [0.9, 0.8, -1.0], [2.2, 1.9, 0.0], [0.1, 3.0, 1.2]]
DESIGN_SPIKES = [[0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 0]]


class _Spike(torch.autograd.Function):
    """Heaviside forward, ATan surrogate backward: the only non-autograd piece of the reference."""

    @staticmethod
    def forward(ctx, hm, alpha):
        ctx.save_for_backward(hm)
        ctx.alpha = alpha
        return (hm >= 0).to(hm.dtype)

    @staticmethod
    def backward(ctx, g):
        (hm,) = ctx.saved_tensors
        a = ctx.alpha
        return g * (a / 2) / (1 + (math.pi / 2 * a * hm) ** 2), None


def loop_reference(x, decay, v_th=1.0, v_reset=0.0, alpha=2.0, detach_reset=True):
    """The design's equations as a plain loop; autograd does the backward."""
    v = torch.full_like(x[0], v_reset)
    out = []
    for t in range(x.shape[0]):
        h = v + decay * (x[t] - (v - v_reset))
        s = _Spike.apply(h - v_th, alpha)
        sr = s.detach() if detach_reset else s
        v = h * (1 - sr) + v_reset * sr
        out.append(s)
    return torch.stack(out)


def test_design_check_values_all_forms():
    x = torch.tensor(DESIGN_X)
    want = torch.tensor(DESIGN_SPIKES, dtype=torch.float32)
    assert torch.equal(lif_multistep_torch(x, torch.tensor(0.5), 1.0, 0.0, 2.0, True), want)
    assert torch.equal(MultiStepLIF(tau=2.0)(x), want)
    assert torch.equal(MultiStepPLIF(tau=2.0)(x), want)      # sigmoid(-log(1)) = 0.5
    single = LIF(tau=2.0)
    assert torch.equal(torch.stack([single(x[t]) for t in range(4)]), want)
    single.reset()
    assert torch.equal(single(x[0]), want[0])                 # state really restarts


@pytest.mark.parametrize("detach_reset", [True, False])
@pytest.mark.parametrize("learn_decay", [False, True])
def test_backward_matches_autograd_loop_float64(detach_reset, learn_decay):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(7, 4, 5, generator=g, dtype=torch.float64) * 1.5 + 0.6
    w = torch.randn(7, 4, 5, generator=g, dtype=torch.float64)
    d0 = torch.tensor(0.37, dtype=torch.float64)
    grads = []
    for fn in (lambda x, d: lif_multistep_torch(x, d, 1.0, 0.0, 2.0, detach_reset),
               lambda x, d: loop_reference(x, d, detach_reset=detach_reset)):
        x = x0.clone().requires_grad_()
        d = d0.clone().requires_grad_(learn_decay)
        s = fn(x, d)
        (s * w).sum().backward()
        grads.append((s.detach(), x.grad, d.grad))
    (s1, gx1, gd1), (s2, gx2, gd2) = grads
    assert torch.equal(s1, s2)
    assert s1.sum() > 10 and (1 - s1).sum() > 10             # both branches exercised
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-14)
    if learn_decay:
        torch.testing.assert_close(gd1, gd2, rtol=1e-12, atol=1e-14)
    else:
        assert gd1 is None and gd2 is None


def test_nonzero_reset_and_threshold_match_loop():
    x0 = torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    out = []
    for fn in (lambda x, d: lif_multistep_torch(x, d, 0.7, -0.2, 3.0, False),
               lambda x, d: loop_reference(x, d, 0.7, -0.2, 3.0, False)):
        x = x0.clone().requires_grad_()
        d = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        s = fn(x, d)
        (s * torch.arange(10.0, dtype=torch.float64)).sum().backward()
        out.append((s.detach(), x.grad, d.grad))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-14)


def test_state_is_fp32_and_output_keeps_input_dtype():
    x = (torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 2).to(torch.bfloat16)
    d = torch.tensor(0.5)
    s = lif_multistep_torch(x, d, 1.0, 0.0, 2.0, True)
    assert s.dtype == torch.bfloat16
    assert torch.equal(s.float(), lif_multistep_torch(x.float(), d, 1.0, 0.0, 2.0, True))
    xr = x.clone().requires_grad_()
    lif_multistep_torch(xr, d, 1.0, 0.0, 2.0, True).sum().backward()
    assert xr.grad.dtype == torch.bfloat16


def _sj_node(cls, **kw):
    from spikingjelly.activation_based import surrogate

    return cls(surrogate_function=surrogate.ATan(), detach_reset=True, step_mode="m", **kw)


def test_lif_and_plif_match_spikingjelly():
    from spikingjelly.activation_based import neuron as sjn

    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(8, 2, 3, 5, 5, generator=g) * 1.5 + 0.7
    w = torch.randn(x0.shape, generator=g)
    for ours, theirs in ((MultiStepLIF(tau=2.0), _sj_node(sjn.LIFNode, tau=2.0)),
                         (MultiStepPLIF(tau=2.0), _sj_node(sjn.ParametricLIFNode, init_tau=2.0))):
        results = []
        for m in (ours, theirs):
            x = x0.clone().requires_grad_()
            s = m(x)
            (s * w).sum().backward()
            results.append((s.detach(), x.grad, getattr(m, "w", None)))
        (s1, g1, w1), (s2, g2, w2) = results
        assert torch.equal(s1, s2)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
        if w1 is not None:
            torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_single_step_gradients_equal_multistep():
    x0 = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(2)) + 0.8
    grads = []
    for multi in (True, False):
        m = MultiStepPLIF() if multi else PLIF()
        x = x0.clone().requires_grad_()
        s = m(x) if multi else torch.stack([m(x[t]) for t in range(6)])
        (s * torch.linspace(-1, 1, 8)).sum().backward()
        grads.append((s.detach(), x.grad, m.w.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_backend_errors(monkeypatch):
    x = torch.zeros(4, 3)
    with pytest.raises(ConfigError, match="unknown neuron backend"):
        lif_multistep(x, torch.tensor(0.5), backend="numba")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError) as info:
        lif_multistep(x, torch.tensor(0.5), backend="cupy")
    msg = str(info.value)
    assert "\n" not in msg and "pip install 'dvsgesture-kit[cuda]'" in msg
    with pytest.raises(ConfigError, match="tau must be > 1"):
        MultiStepLIF(tau=1.0)


@pytest.mark.parametrize("cls", [PLIF, MultiStepPLIF])
@pytest.mark.parametrize("tau0,w,decay", [(3.0, -math.log(2.0), 1 / 3), (5.0, -math.log(4.0), 0.2),
                                          (1.25, math.log(4.0), 0.8)])
def test_plif_init_away_from_tau0_2(cls, tau0, w, decay):
    """w = -log(tau0 - 1), so decay = sigmoid(w) = 1/tau0 (by hand: tau0 3 -> w -log 2, decay 1/3;
    5 -> -log 4, 0.2; 1.25 -> log 4, 0.8): tau0 = 2 alone (w 0) cannot tell -log(tau0 - 1) from
    log(tau0 - 1) or 1/tau0 from 1 - 1/tau0. w is the float32 of -log(tau0 - 1) exactly; decay
    within 2 float32 ulps of 1/tau0 (w rounded once, its sigmoid once)."""
    m = cls(tau=tau0)
    assert m.w.dtype == torch.float32 and float(m.w.detach()) == float(torch.tensor(w, dtype=torch.float32))
    assert abs(float(m.decay(torch.device("cpu")).detach()) - decay) <= 2 * float(torch.finfo(torch.float32).eps) * decay
    # one step from rest with x = 3 charges v to decay * 3 (< threshold 1 for decay 0.2, >= for 1/3)
    x = torch.tensor([[3.0]])
    s = m(x if cls is PLIF else x[None])
    assert float(s.detach().flatten()[0]) == float(3.0 * decay >= 1.0 - 1e-6)


@pytest.mark.parametrize("cls", [LIF, MultiStepLIF, PLIF, MultiStepPLIF])
def test_tau_boundary_one_is_refused_just_above_accepted(cls):
    """tau must be > 1: exactly 1 is refused (LIF decay 1, PLIF w = -log 0), the next float above
    is accepted."""
    with pytest.raises(ConfigError, match="tau must be > 1, got 1.0"):
        cls(tau=1.0)
    cls(tau=math.nextafter(1.0, 2.0))


def test_load_cupy_backend_each_way_it_can_fail(monkeypatch):
    import importlib
    import types

    from dvsg_train import neuron

    hint = "pip install 'dvsgesture-kit[cuda]'"
    real_find = importlib.util.find_spec

    def find(missing):
        return lambda name, *a: None if name in missing else (object() if name == "cupy" else real_find(name, *a))

    def refused(message):
        with pytest.raises(BackendUnavailableError) as e:
            neuron.load_cupy_backend()
        assert str(e.value) == message

    monkeypatch.setattr(importlib.util, "find_spec", find({"dvsg_train.cupy_lif"}))
    refused("the cupy neuron backend is not part of this installation (dvsg_train.cupy_lif is missing); "
            f"reinstall dvsgesture-kit with its CUDA extra: {hint}")
    monkeypatch.setattr(importlib.util, "find_spec", find(set()))

    def broken(name):
        raise ImportError("libcuda.so.1: cannot open")
    monkeypatch.setattr(importlib, "import_module", broken)
    refused(f"the cupy neuron backend failed to import (libcuda.so.1: cannot open); {hint}")
    module = types.SimpleNamespace(cupy_available=lambda: (False, "no GPU here"), lif_multistep_cupy="kernel")
    imported = []
    monkeypatch.setattr(importlib, "import_module", lambda name: imported.append(name) or module)
    refused("no GPU here")
    module.cupy_available = lambda: (True, "")
    assert neuron.load_cupy_backend() == "kernel" and set(imported) == {"dvsg_train.cupy_lif"}
    # a cupy_lif without cupy_available: CuPy importable and a CUDA device, both needed
    del module.cupy_available
    for cupy, cuda in ((True, False), (False, True)):
        monkeypatch.setattr(importlib.util, "find_spec", find(set() if cupy else {"cupy"}))
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        refused(f"--cupy needs CuPy and a CUDA device: {hint}")
    monkeypatch.setattr(importlib.util, "find_spec", find(set()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert neuron.load_cupy_backend() == "kernel"


@pytest.mark.parametrize("cls", [LIF, PLIF])
def test_single_step_reset_below_zero_with_the_reset_in_the_graph(cls):
    """v_reset -0.5 and detach_reset False against the loop reference (the same float32
    operations in the same order: spikes equal, gradients within 1 ulp of their own size)."""
    x0 = torch.tensor(DESIGN_X) * 1.3
    weights = torch.linspace(-1, 1, 3)
    got = []
    for run in ("ours", "reference"):
        x = x0.clone().requires_grad_()
        if run == "ours":
            m = cls(tau=2.0, v_reset=-0.5, detach_reset=False)
            s = torch.stack([m(x[t]) for t in range(4)])
        else:
            s = loop_reference(x, torch.tensor(0.5), v_reset=-0.5, detach_reset=False)
        (s * weights).sum().backward()
        got.append((s.detach(), x.grad))
    assert torch.equal(got[0][0], got[1][0]) and got[0][0].sum() > 0
    ulp = torch.finfo(torch.float32).eps * got[1][1].abs()
    assert torch.all((got[0][1] - got[1][1]).abs() <= ulp)
    assert not torch.equal(got[1][1], _grad_with_detached_reset(x0, weights))   # the case tells them apart


def _grad_with_detached_reset(x0, weights):
    x = x0.clone().requires_grad_()
    (loop_reference(x, torch.tensor(0.5), v_reset=-0.5, detach_reset=True) * weights).sum().backward()
    return x.grad


def test_single_step_state_dtype_follows_the_input():
    """float16 in: float32 state, float16 spikes; float64 in: float64 state and spikes."""
    m = LIF()
    s = m(torch.tensor([[1.5, 3.0]], dtype=torch.float16))
    assert s.dtype == torch.float16 and m.v.dtype == torch.float32 and s.tolist() == [[0.0, 1.0]]
    m.reset()
    s = m(torch.tensor([[1.5, 3.0]], dtype=torch.float64))
    assert s.dtype == torch.float64 and m.v.dtype == torch.float64 and m.v.tolist() == [[0.75, 0.0]]


def test_the_cupy_backend_gets_every_argument_and_defaults_are_the_seeds(monkeypatch):
    from dvsg_train import neuron

    calls = []
    monkeypatch.setattr(neuron, "load_cupy_backend", lambda: lambda *a: calls.append(a) or "spikes")
    x, d = torch.zeros(2, 3), torch.tensor(0.25)
    assert neuron.lif_multistep(x, d, 0.7, -0.2, 3.0, False, backend="cupy") == "spikes"
    assert neuron.lif_multistep(x, d, backend="cupy") == "spikes"
    (a, b) = calls
    assert a[0] is x and a[1] is d and a[2:] == (0.7, -0.2, 3.0, False)
    assert b[0] is x and b[1] is d and b[2:] == (1.0, 0.0, 2.0, True)   # threshold 1, reset 0, ATan 2, detached
    # the default backend is torch: the design check values without naming it
    assert torch.equal(neuron.lif_multistep(torch.tensor(DESIGN_X), torch.tensor(0.5)),
                       torch.tensor(DESIGN_SPIKES, dtype=torch.float32))
    with pytest.raises(ConfigError) as e:
        neuron.lif_multistep(x, d, backend="numba")
    assert str(e.value) == "unknown neuron backend 'numba'; choose one of torch, cupy"


def test_check_backend(monkeypatch):
    from dvsg_train import neuron

    loaded = []
    monkeypatch.setattr(neuron, "load_cupy_backend", lambda: loaded.append(1))
    neuron.check_backend("torch")
    assert loaded == []
    neuron.check_backend("cupy")
    assert loaded == [1]
    with pytest.raises(ConfigError) as e:
        neuron.check_backend("CUPY")
    assert str(e.value) == "unknown neuron backend 'CUPY'; choose one of torch, cupy"


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError) as e:
        lif_multistep_torch(torch.zeros(3), torch.tensor(0.5), 1.0, 0.0, 2.0, True)
    assert str(e.value) == "x_seq must be [T, ...] with at least 2 dims, got shape (3,)"
    with pytest.raises(ValueError) as e:
        lif_multistep_torch(torch.zeros(3, 2), torch.tensor([0.5]), 1.0, 0.0, 2.0, True)
    assert str(e.value) == "decay must be a 0-dim tensor, got shape (1,)"


def test_extra_repr_names_every_constant():
    assert LIF(tau=3.0).extra_repr() == "tau=3.0, v_threshold=1.0, v_reset=0.0, alpha=2.0, detach_reset=True"
    assert MultiStepLIF(tau=3.0, v_reset=-0.5, alpha=4.0, detach_reset=False).extra_repr() == \
        "tau=3.0, v_threshold=1.0, v_reset=-0.5, alpha=4.0, detach_reset=False, backend=torch"
    assert MultiStepPLIF(tau=3.0).extra_repr() == \
        "v_threshold=1.0, v_reset=0.0, alpha=2.0, detach_reset=True, backend=torch"


@pytest.mark.parametrize("cls", [MultiStepLIF, MultiStepPLIF])
def test_multistep_reset_below_zero_with_the_reset_in_the_graph(cls):
    x0 = torch.tensor(DESIGN_X) * 1.3
    weights = torch.linspace(-1, 1, 3)
    got = []
    for run in ("ours", "reference"):
        x = x0.clone().requires_grad_()
        s = (cls(tau=2.0, v_reset=-0.5, detach_reset=False)(x) if run == "ours"
             else loop_reference(x, torch.tensor(0.5), v_reset=-0.5, detach_reset=False))
        (s * weights).sum().backward()
        got.append((s.detach(), x.grad))
    assert torch.equal(got[0][0], got[1][0])
    # the hand-written backward sums the same terms in another order: a few float32 ulps of each
    assert torch.all((got[0][1] - got[1][1]).abs() <= 4 * torch.finfo(torch.float32).eps * got[1][1].abs() + 1e-7)
    assert not torch.equal(got[1][1], _grad_with_detached_reset(x0, weights))


@pytest.mark.parametrize("multi", [True, False])
def test_float16_input_keeps_a_float32_membrane(multi):
    """x = [2**-11, 2 - 2**-10] (exact in float16), decay 0.5. Float32 membrane: h0 = 2**-12,
    h1 = h0 + (x1 - h0) / 2 = 1 - 3 * 2**-13 < 1: no spike. A float16 membrane rounds x1 - h0 to
    2 - 2**-10, then h1 = 1 - 2**-12, halfway to 1.0, to 1.0 (even): a spike."""
    x = torch.tensor([[2.0 ** -11], [2 - 2.0 ** -10]], dtype=torch.float16)
    if multi:
        s = MultiStepLIF(tau=2.0)(x)
    else:
        m = LIF(tau=2.0)
        s = torch.stack([m(x[t]) for t in range(2)])
    assert s.dtype == torch.float16 and s.flatten().tolist() == [0.0, 0.0]
    assert loop_reference(x.float(), torch.tensor(0.5)).flatten().tolist() == [0.0, 0.0]


def test_multistep_modules_dispatch_to_their_backend(monkeypatch):
    from dvsg_train import neuron

    calls = []
    monkeypatch.setattr(neuron, "load_cupy_backend", lambda: lambda *a: calls.append(a[2:]) or "k")
    assert MultiStepLIF(tau=4.0, v_threshold=0.8, v_reset=-0.1, alpha=3.0, detach_reset=False,
                        backend="cupy")(torch.zeros(2, 1)) == "k"
    assert calls == [(0.8, -0.1, 3.0, False)]
    with pytest.raises(ConfigError) as e:
        MultiStepPLIF(backend="triton")
    assert str(e.value) == "unknown neuron backend 'triton'; choose one of torch, cupy"


def test_float64_input_starts_from_a_float64_reset():
    """v_reset -0.1 is not a float32 number: a float32 initial membrane would show in float64."""
    m = LIF(tau=2.0, v_reset=-0.1)
    m(torch.tensor([0.3], dtype=torch.float64))
    assert m.v.dtype == torch.float64 and m.v.item() == -0.1 + 0.5 * (0.3 - (-0.1 - -0.1))
