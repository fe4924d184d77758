"""The whole MultiStepNet with ``--cupy`` neurons equals the torch reference backend.

Same weights, same input, same dropout masks; LIF and PLIF; fp32, fp16 autocast and bf16
autocast; contiguous and channels_last. On CPU the cupy backend runs the real wrapper over the
kernel source built for the host (tests/cupy_host.py); under the ``cuda`` marker it runs the
real CuPy kernels on the GPU against the torch backend on the GPU.

What must agree, and how closely:
- outputs: exactly. Both backends compute h[t] op by op in fp32 with round-to-nearest and store
  spikes (0/1, exact in every dtype); every other layer is the same torch op on the same input.
- gradients: the two neuron backwards compute the same fp32 formula in a different operation
  order (the kernel: sg = (alpha/2) / (1 + z^2), then * decay; torch: decay*alpha/2 / (1 + c z^2)),
  so dL/dx of one neuron layer differs by a few fp32 ulps, and by one ulp of the storage dtype
  where the two fp32 values round to neighbouring fp16/bf16 numbers. Every layer below passes
  that difference on linearly (conv/linear/BN backward, the next neuron's dL/dx), and a weight
  gradient sums many such terms. So a parameter's gradient agrees to
  ``max|g_cupy - g_torch| <= K * eps(dtype) * max|g_torch|`` with eps = 2**-23 (fp32), 2**-10
  (fp16), 2**-7 (bf16) and K = 64: up to 7 neuron layers times a few ulps each, with a factor
  for summation. The PLIF w gradients are single sums over a layer's neurons; the kernel adds
  in double, the torch backend in fp32, so they agree to 2**-15 relative in fp32 (an fp32 sum
  of ~10^5 terms), and as above in fp16/bf16. A wrong surrogate constant, threshold or decay
  moves gradients by percent: far outside these bounds.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from dvsg_train import cupy_lif
from dvsg_train.model import MultiStepNet, build_model

from cupy_host import HostLauncher
from test_train_model import excite

EPS = {None: 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}
AMP = {"fp16": torch.float16, "bf16": torch.bfloat16}
K = 64
PLIF_W_RTOL_FP32 = 2.0 ** -15
T, N, CHANNELS = 5, 2, 4     # T % 4 != 0: the kernels' unrolled loop and its tail both run


def _input(device, channels_last: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = ((torch.rand(T, N, 2, 128, 128, generator=g) < 0.3).float()
         * torch.randint(1, 4, (T, N, 2, 128, 128), generator=g)).to(device)
    if channels_last:
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (T, N))
    return x


def _models(neuron: str, device, channels_last: bool) -> tuple[MultiStepNet, MultiStepNet]:
    torch.manual_seed(0)
    ref = build_model(CHANNELS, "multistep", neuron, backend="torch")
    excite(ref, 4.0)
    if neuron == "plif":
        with torch.no_grad():
            for i, m in enumerate(m for m in ref.modules() if hasattr(m, "w")):
                m.w.fill_(-0.4 + 0.25 * i)    # a different decay per layer
    ref.to(device)
    if channels_last:
        ref.to(memory_format=torch.channels_last)
    kern = copy.deepcopy(ref)
    kern.set_backend("cupy")
    return ref, kern


def _forward_backward(model: nn.Module, x: torch.Tensor, amp: str | None, launcher_ctx):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)                      # the same dropout masks for both backends
    spikes = []
    hooks = [m.register_forward_hook(lambda m, i, o: spikes.append(float(o.detach().float().mean())))
             for m in model.modules() if hasattr(m, "v_threshold")]
    autocast = (torch.autocast(x.device.type, dtype=AMP[amp]) if amp else contextlib.nullcontext())
    with launcher_ctx, autocast:
        out = model(x)
        # 2**10: gradients of this size survive fp16 (what GradScaler's scale is for)
        loss = (out.float() * torch.linspace(-1, 1, 11, device=x.device)).sum() * 1024
    loss.backward()      # the backward runs through the launcher its forward saved
    for h in hooks:
        h.remove()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.detach(), grads, spikes


def _check(device, launcher_ctx, neuron: str, amp: str | None, channels_last: bool):
    ref, kern = _models(neuron, device, channels_last)
    x = _input(device, channels_last)
    out_r, g_r, fired_r = _forward_backward(ref, x, amp, contextlib.nullcontext())
    out_k, g_k, fired_k = _forward_backward(kern, x, amp, launcher_ctx)
    assert len(fired_r) == 7 and min(fired_r[:-1]) > 0      # every hidden layer spikes
    assert fired_k == fired_r
    assert out_k.dtype == out_r.dtype and torch.equal(out_k, out_r)
    assert g_k.keys() == g_r.keys() and len(g_r) == len(list(ref.parameters()))
    worst = {}
    for name, gr in g_r.items():
        gk = g_k[name]
        scale = float(gr.abs().max())
        assert scale > 0, name
        err = float((gk - gr).abs().max())
        if name.endswith(".w") and amp is None:
            tol = PLIF_W_RTOL_FP32 * scale
        else:
            tol = K * EPS[amp] * scale
        worst[name] = err / scale
        assert err <= tol, (name, err, tol, gk, gr)
    return worst


CASES = [(neuron, amp, cl) for neuron in ("lif", "plif") for amp in (None, "fp16", "bf16")
         for cl in (False, True)]


@pytest.mark.parametrize("neuron,amp,channels_last", CASES)
def test_network_host_cupy_equals_torch(neuron, amp, channels_last):
    launcher = HostLauncher(sm_count=4)
    _check(torch.device("cpu"), cupy_lif.use_launcher(launcher), neuron, amp, channels_last)
    # every neuron layer ran the kernels, in the dtype autocast gave it
    dtype = {None: "float", "fp16": "half", "bf16": "bfloat16"}[amp]
    names = {name for name, _, _ in launcher.launches}
    assert f"lif_forward_{dtype}" in names
    assert f"{'plif' if neuron == 'plif' else 'lif'}_backward_{dtype}" in names
    assert len(launcher.launches) == 14      # 7 neuron layers, forward and backward


@pytest.mark.cuda
@pytest.mark.parametrize("neuron,amp,channels_last", CASES)
def test_cuda_network_cupy_equals_torch(neuron, amp, channels_last, monkeypatch):
    # cuDNN may pick nondeterministic backward algorithms; both backends must see the same ops
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _check(torch.device("cuda"), contextlib.nullcontext(), neuron, amp, channels_last)
