"""Tests of the cupy LIF/PLIF kernels (dvsg_train/cupy_lif.py).

Three layers, so that most of it runs without a GPU:
- CPU: the kernel source for every dtype, the unavailable-backend error, and the REAL autograd
  wrapper ``lif_multistep_cupy`` running the kernel source built for the host
  (``tests/cupy_host.py``: g++ against a small emulation of the CUDA built-ins, behind the same
  launcher interface as CuPy; arguments type-checked against the kernel signatures), compared
  with the torch reference ``dvsg_train.neuron.lif_multistep_torch``.
- nvcc: the exact source CuPy gets compiles to PTX for sm_80 and sm_90 (skipped without nvcc).
- CUDA (@pytest.mark.cuda): the real kernels through CuPy against the torch reference (small
  grids, T % 4 != 0, a delayed side stream; ``test_cuda_big_*``: n = 2**20 + 37 and
  T * n > 2**31), and a short ``--cupy --amp`` training run.

Tolerances (issue #20): no fitted rtol/atol. Every cupy-vs-torch comparison is element-wise,
within a bound derived from the float32 arithmetic of the two evaluations (``lif_violations``):
ulps of the compared element (np.spacing of it: the roundings whose result it is, and for
fp16/bf16 the one rounding to the dtype) plus U = 2**-24 times the magnitudes of the operands
that produced it, which cancellation can make far larger than the element: for the membrane
h the terms of h = v + d*(x - (v - v_reset)) and the error carried from v; for dL/dx the sum
of |terms| of the backward recurrence, each weighted by the roundings along its path; for
PLIF's dL/dw the sum of |terms| times the additions they pass through (T per neuron and the
depth of torch's float32 sum over neurons). Spikes are compared exactly, except where the
membrane is within its bound of the threshold (the decision may then flip; the neuron is left
out from there and such flips must be rare). The CPU tests ``test_bounds_*`` check that the
bounds hold between float32 and float64 evaluations and fail for a constant 1% off.
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess

import pytest
import torch

from dvsg_train import cupy_lif
from dvsg_train.errors import BackendUnavailableError
from dvsg_train.neuron import lif_multistep_torch

from cupy_host import HostLauncher, host_library

DTYPES = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
DESIGN_X = [[1.5, 0.3, 2.5], [0.9, 0.8, -1.0], [2.2, 1.9, 0.0], [0.1, 3.0, 1.2]]
DESIGN_SPIKES = [[0, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 0]]


# --------------------------------------------------------------------------- kernel source

@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_kernel_source_names_and_types(dtype):
    src = cupy_lif.kernel_source(dtype)
    for name in cupy_lif.kernel_names(dtype):
        assert f'extern "C" __global__ void {name}(' in src
    store = "float" if dtype == "float" else "unsigned short"
    assert f"const {store}* __restrict__ x" in src
    assert "#include" not in src          # nothing for NVRTC or nvcc to resolve
    for placeholder in ("DTYPE", "STORE", "BLOCK"):
        assert placeholder not in src
    assert f"partial[{cupy_lif.THREADS}]" in src


def test_kernel_source_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="float64"):
        cupy_lif.kernel_source("float64")


def test_unavailable_backend_is_one_line_with_install_hint(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = cupy_lif.cupy_available()
    assert not ok and "\n" not in reason and "pip install 'dvsgesture-kit[cuda]'" in reason
    x = torch.zeros(4, 3)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'dvsgesture-kit\[cuda\]'"):
        cupy_lif.lif_multistep_cupy(x, torch.tensor(0.5), 1.0, 0.0, 2.0, True)


def test_missing_cupy_reason_names_the_import_failure(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builtins, "__import__", no_cupy)
    ok, reason = cupy_lif.cupy_available()
    assert not ok
    assert reason == ("--cupy needs CuPy, which cannot be imported (No module named 'cupy'): "
                      "pip install 'dvsgesture-kit[cuda]'")


def test_resident_blocks_follow_register_count():
    assert cupy_lif.resident_blocks(32) == 8      # thread limit: 2048 / 256
    assert cupy_lif.resident_blocks(48) == 5      # 65536 // (48 * 256)
    assert cupy_lif.resident_blocks(70) == 3      # rounded up to 72 registers
    assert cupy_lif.resident_blocks(255) == 1


def test_dense_time_major_layouts():
    x = torch.zeros(4, 3, 8, 5, 5)
    assert cupy_lif.dense_time_major(x)
    cl = torch.zeros(12, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert cupy_lif.dense_time_major(cl.unflatten(0, (4, 3)))      # no copy for channels_last
    assert cupy_lif.dense_time_major(x.transpose(1, 2))            # permuted inside a step
    assert not cupy_lif.dense_time_major(x.transpose(0, 1))        # time not outermost
    assert not cupy_lif.dense_time_major(x[:, :, ::2])             # holes
    assert not cupy_lif.dense_time_major(torch.zeros(1, 3).expand(4, 3))
    assert cupy_lif.dense_time_major(torch.zeros(1, 7)[:, None].transpose(0, 1))


# --------------------------------------------------------------------------- nvcc -> PTX

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_source_compiles_to_ptx(arch, tmp_path):
    procs = []
    for dtype in sorted(DTYPES):
        src = tmp_path / f"lif_{dtype}.cu"
        src.write_text(cupy_lif.kernel_source(dtype))
        cmd = [NVCC, "-ptx", f"-arch={arch}", *cupy_lif.COMPILE_OPTIONS, "-Werror",
               "all-warnings", str(src), "-o", str(tmp_path / f"lif_{dtype}.ptx")]
        procs.append((dtype, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)))
    for dtype, proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"nvcc {arch} {dtype}:\n{out}"
        ptx = (tmp_path / f"lif_{dtype}.ptx").read_text()
        for name in cupy_lif.kernel_names(dtype):
            assert f".entry {name}(" in ptx


# --------------------------------------------------------------------------- host launcher

@pytest.fixture(scope="module")
def host_lib():
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    return host_library()


def _lif_params(v_threshold, v_reset, alpha, detach) -> dict:
    return dict(v_threshold=v_threshold, v_reset=v_reset, alpha=alpha, detach=detach)


def host_run(launcher, detach=True, v_threshold=1.0, v_reset=0.0, alpha=2.0):
    """The real lif_multistep_cupy through ``launcher``, as a (x, decay) -> spikes function."""
    def run(xi, decay):
        with cupy_lif.use_launcher(launcher):
            return cupy_lif.lif_multistep_cupy(xi, decay, v_threshold, v_reset, alpha, detach)
    run.lif = _lif_params(v_threshold, v_reset, alpha, detach)
    return run


def torch_run(detach=True, v_threshold=1.0, v_reset=0.0, alpha=2.0):
    def run(xi, decay):
        return lif_multistep_torch(xi, decay, v_threshold, v_reset, alpha, detach)
    run.lif = _lif_params(v_threshold, v_reset, alpha, detach)
    return run


def _random_case(T, shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((T, *shape), generator=g) * 0.8 + 0.6).to(dtype)
    grad = torch.randn((T, *shape), generator=g).to(dtype)
    return x.to(device), grad.to(device)


# --------------------------------------------------------------------------- error bounds
#
# Two float32 evaluations of the same LIF math (the kernel and the torch reference, or either
# and a float64 evaluation rounded) are compared element by element within a bound derived
# from their arithmetic: every rounding to nearest moves a value y by at most U*|y| (half an ulp
# of y), so each compared element gets (a) ulps of the element itself for the roundings whose
# result is the element, and (b) U times the magnitudes of the operands that produced it, for
# the roundings of intermediate values, which cancellation can make much larger than the
# element. Counts are first order in U; magnitudes come from a float64 replay of the recurrence
# on the reference's saved membrane h. Nothing here is a fitted tolerance.

U = 2.0 ** -24          # float32 unit roundoff
# The counts are first order in U: the terms they drop are below 16*U of the bound per step,
# compounding over T steps to < 16*T*U (< 2**-13 for T <= 64), which this factor covers.
SLACK = 1 + 2.0 ** -10
# Surrogate sg = alpha/2 / (1 + (pi/2*alpha*(h - v_th))**2), in either order, is within K_SG*U
# relatively. Kernel: h - v_th (1), the fp32 slope (1), the product (1): z within 3U; z*z 7U;
# 1 + z*z 8U (both terms >= 0); the fp32 alpha/2 (1) and the division (1): 10. Torch: h - v_th
# (1), c2 = slope**2 as fp32 (1), c2*z*z (2): 5U, + 1: 6U; k = decay*alpha/2 (2), k / (...) (1):
# 9 for decay*sg.
K_SG = 10
# Local term decay*sg*dL/ds of dL/dx[t]: sg and one product (kernel: sg*gs; the *decay at its
# store is an output rounding, counted there); torch: 9 + 1.
K_LOCAL = K_SG + 1
# Term carried from t+1, (1-decay)*m*dL/dx[t+1], m = dv/dh. detach_reset: m = 1 - s exactly;
# 1 - decay (1) and the product (1). Without it m = (1 - s) + (v_reset - h)*sg: kernel
# v_reset - h (1), *sg (10+1), + (1 - s) (1): m within 13U of |1-s| + |v_reset-h|*sg; then
# keep = 1 - decay (1), grad_h*keep (1), *m (1): 16. Torch: (v_reset - h)*g_t*((1-d)/d):
# 1 + 9 + 1 + 2 + 1 = 14, the += (1) and where's 1 - d (1): 15U of (1-d)*|m|; *g (1): 16.
K_CARRY = {True: 2, False: 16}


def _ulp(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """np.spacing(|a|) in dtype, elementwise, for float64 a (numpy has no bfloat16): eps *
    2**(e-1) for |a| in [2**(e-1), 2**e), and the subnormal step below dtype's smallest normal."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(a.abs())
    step = torch.ldexp(torch.full_like(a, fi.eps), e - 1)
    return torch.where(a == 0, fi.tiny * fi.eps, step.clamp(min=fi.tiny * fi.eps))


def _torch_sum_depth(n: int, cuda: bool) -> int:
    """Additions a value can pass through in torch's float32 sum of n values (the reference's
    dL/d(decay) over neurons); no order exceeds n - 1. CPU (SumKernel.cpp, cascade sum): <= 5
    runs of 2**max(4, ceil(log2 n)//4) serial adds over its 4 levels and the tail, 3 + 3 to
    merge levels and ILP partials, <= 32 for vector lanes and the scalar tail, one per
    parallel chunk of 32768. CUDA (Reduce.cuh): <= 256 values per thread, 4 accumulators,
    trees (<= 2 log2 n levels) and <= 2**16/512 serial partials of blocks: under 512 +
    2 log2 n."""
    if n <= 1:
        return 0
    log2n = math.ceil(math.log2(n))
    if cuda:
        depth = 512 + 2 * log2n
    else:
        depth = 5 * 2 ** max(4, log2n // 4) + 6 + 32 + -(-n // 32768)
    return min(n - 1, depth)


@dataclasses.dataclass
class LIFRun:
    """One evaluation of a multi-step LIF: spikes, the membrane h it saved for its backward,
    dL/dx and dL/dw (PLIF; None for LIF)."""
    spikes: torch.Tensor
    h: torch.Tensor
    gx: torch.Tensor
    gw: torch.Tensor | None


def lif_violations(x, grad, decay: float, k: LIFRun, r: LIFRun, v_threshold=1.0, v_reset=0.0,
                   alpha=2.0, detach=True, chunk=2 ** 22) -> dict:
    """Elements of run k outside the derived bounds around run r, both evaluations of the LIF
    on x [T, ...] with dL/ds = grad and the same float32 decay.

    Returns counts {"h", "spikes", "gx", "gw"} of violations, "flipped" (spike decisions that
    differ where the membrane is within its bound of the threshold: allowed, and the neuron is
    left out from there on, since its states then diverge), and "worst_<q>": the largest
    |k - r| / bound seen for q. Runs in float64 on x's device, over chunks of neurons and step
    by step (the big GPU case holds 2**31 elements)."""
    T = x.shape[0]
    n = x.numel() // T if T else 0
    # the thresholds the float32 runs compare with (float64 runs are given float32 values)
    thr = float(torch.tensor(v_threshold, dtype=torch.float32))
    vr = float(torch.tensor(v_reset, dtype=torch.float32))
    d = float(decay)
    slope, scale = math.pi / 2 * alpha, alpha / 2
    plif = r.gw is not None
    cols2 = lambda a: a.reshape(T, n)       # noqa: E731 - [T, neurons], logical order
    X, GS, HK, HR, SK, SR, GXK, GXR = map(cols2, (x, grad, k.h, r.h, k.spikes, r.spikes, k.gx, r.gx))
    out = dict(h=0, spikes=0, gx=0, gw=0, flipped=0, worst_h=0.0, worst_gx=0.0, worst_gw=0.0)
    sum_abs = sum_err = excluded = 0.0

    def worst(key, diff, bound, mask):
        if bool(mask.any()):
            out[key] = max(out[key], float((diff / bound.clamp(min=1e-300))[mask].max()))

    for lo in range(0, n, chunk):
        cols = slice(lo, min(n, lo + chunk))
        at = lambda a, t: a[t, cols].double()   # noqa: E731
        # Forward: h[t] = v + d*(x - (v - v_reset)) with a = v - v_reset, b = x - a, c = d*b:
        # four roundings, of a, b, c and h, and the error e_v of v carried as (1 - d)*e_v (v
        # enters as v - d*v). One evaluation is within e_h of exact; two within 2*e_h.
        v = torch.full((cols.stop - lo,), vr, dtype=torch.float64, device=x.device)
        e_v = torch.zeros_like(v)
        alive = torch.ones_like(v, dtype=torch.bool)
        for t in range(T):
            h = at(HR, t)
            a = v - vr
            b = at(X, t) - a
            e_h = (1 - d) * e_v + U * (d * a.abs() + 2 * d * b.abs() + h.abs())
            bound = SLACK * 2 * e_h
            dh = (at(HK, t) - h).abs()
            out["h"] += int((alive & (dh > bound)).sum())
            worst("worst_h", dh, bound, alive)
            differ = SK[t, cols] != SR[t, cols]
            near = (h - thr).abs() <= bound
            out["spikes"] += int((alive & differ & ~near).sum())
            out["flipped"] += int((alive & differ & near).sum())
            alive &= ~differ
            fired = SR[t, cols] != 0
            v = torch.where(fired, vr, h)
            e_v = torch.where(fired, 0.0, e_h)
        # Backward, from t = T-1 down, on G = dL/dx = decay * dL/dh:
        #   G[t] = d*sg*gs + (1-d)*m*G[t+1],  m = 1 - s (+ (v_reset - h)*sg without detach)
        # g is G replayed in float64; dev bounds |G_k - G_r| before the outputs' roundings:
        # both runs' roundings of the local term (K_LOCAL) and of the carried term (K_CARRY),
        # one more for their sum, the carried dev, and (sens) what differing saved h change.
        g = torch.zeros_like(v)
        dev = torch.zeros_like(v)
        for t in reversed(range(T)):
            h = at(HR, t)
            gs = at(GS, t)
            dh = (at(HK, t) - h).abs()
            through = (SR[t, cols] == 0).double()
            z = slope * (h - thr)
            q = 1 + z * z
            sg = scale / q
            m, m_abs = through, through
            if not detach:
                m = through + (vr - h) * sg
                m_abs = through + (vr - h).abs() * sg
            local = d * sg * gs.abs()
            carried = (1 - d) * m_abs * g.abs()
            # |sg(h + dh) - sg(h)| <= |sg'(h)|*dh + max|sg''|/2 * dh**2, max|sg''| = 2*scale*slope**2
            dsg = scale * 2 * slope * z.abs() / (q * q) * dh + scale * slope ** 2 * dh * dh
            sens = d * gs.abs() * dsg
            if not detach:
                sens = sens + (1 - d) * g.abs() * ((vr - h).abs() * dsg + sg * dh + dh * dsg)
            dev = (2 * U * ((K_LOCAL + 1) * local + (K_CARRY[detach] + 1) * carried) + sens
                   + (1 - d) * m_abs * dev)
            g = d * sg * gs + (1 - d) * m * g
            # Outputs: each run rounds its fp32 dL/dx at most once more in fp32 (kernel: the
            # *decay at the store; a float64 run: its cast) and once to the storage dtype:
            # half an ulp of the element each, per run.
            gxk, gxr = at(GXK, t), at(GXR, t)
            big = torch.maximum(gxk.abs(), gxr.abs())
            bound = SLACK * dev + _ulp(big, torch.float32)
            if x.dtype != torch.float32:
                bound = bound + _ulp(big, x.dtype)
            diff = (gxk - gxr).abs()
            out["gx"] += int((alive & (diff > bound)).sum())
            worst("worst_gx", diff, bound, alive)
            if plif:
                # dL/d(decay) = sum of dL/dh[t] * bracket, bracket = x[t] - (v[t-1] - v_reset).
                # Per term: bracket times dev/d, dL/dh times the brackets' roundings (torch:
                # x - (v - v_reset), 2; kernel: (h - v_prev)/d, which holds h's rounding of c
                # and of h: 2|b| + |v - v_reset| + |h|/d) and the saved v[t-1] differing.
                if t > 0:
                    fired_prev = SR[t - 1, cols] != 0
                    h_prev = at(HR, t - 1)
                    v_prev = torch.where(fired_prev, vr, h_prev)
                    dv = torch.where(fired_prev, 0.0, (at(HK, t - 1) - h_prev).abs())
                    vk_prev = torch.where(SK[t - 1, cols] != 0, vr, at(HK, t - 1))
                else:
                    v_prev = vk_prev = torch.full_like(h, vr)
                    dv = torch.zeros_like(h)
                br = at(X, t) - (v_prev - vr)
                gh = g / d
                term_err = (br.abs() * dev / d + gh.abs() * (
                    U * (3 * br.abs() + 2 * (v_prev - vr).abs() + h.abs() / d) + dv))
                sum_abs += float((gh * br).abs()[alive].sum())
                sum_err += float(term_err[alive].sum())
                # a neuron left out: its terms may differ by their whole size, in either run
                brk = at(X, t) - (vk_prev - vr)
                excluded += float(((gxk * brk).abs() + (gxr * br).abs())[~alive].sum()) / d
    if plif:
        # Sums of the terms: each run rounds a product (1), its total (kernel: double -> float;
        # torch: / decay) (1) and the sigmoid backward's 3 (dL/dw = dL/dd * d*(1-d)); torch adds
        # in float32 over T steps per neuron, then over n neurons; the kernel in double (2**-29
        # U), T * neurons per thread, a 256-wide tree and one atomic per block.
        depth = (2 + 2 + 6 + (T - 1) + _torch_sum_depth(n, x.is_cuda)
                 + (T * n + n // cupy_lif.THREADS + 9) * 2.0 ** -29)
        bound = d * (1 - d) * SLACK * (sum_err + U * depth * sum_abs + excluded)
        diff = abs(float(k.gw) - float(r.gw))
        out["gw"] = int(diff > bound)
        out["worst_gw"] = diff / bound if bound > 0 else float(diff > 0)
    return out


def assert_lif_agree(k: LIFRun, r: LIFRun, x, grad, decay: float, lif: dict) -> dict:
    """k and r within the bounds of `lif_violations`; spike decisions flip rarely."""
    out = lif_violations(x, grad, decay, k, r, **lif)
    assert out["h"] == out["spikes"] == out["gx"] == out["gw"] == 0, out
    # A decision may flip only where h is within ~1e-6 (its bound) of the threshold, and h's
    # density there is < 1 per unit: about 2e-6 of the elements can be that close.
    assert out["flipped"] <= 4 + x.numel() // 100_000, out
    return out


def _evaluate(run, x, grad, w0, plif, dtype=None) -> LIFRun:
    """run on x (cast to dtype, e.g. float64: then spikes and gradients come back rounded to
    x's dtype, h as it was used), backward with grad; decay = sigmoid(w0) in float32 (PLIF,
    dL/dw) or 0.5 (LIF)."""
    xi = x.to(dtype or x.dtype).clone().requires_grad_(True)
    w = torch.tensor(w0, requires_grad=plif, device=x.device)
    decay = w.sigmoid() if plif else torch.tensor(0.5, device=x.device)
    if dtype is not None:
        # the same float32 decay, differentiated directly: dL/dw = dL/dd * d * (1 - d)
        decay = decay.detach().to(dtype).requires_grad_(plif)
    s = run(xi, decay)
    h = s.grad_fn.saved_tensors[0]       # the membrane each saves for its backward
    s.backward(grad.to(xi.dtype))
    if dtype is None:
        return LIFRun(s.detach(), h, xi.grad, w.grad)
    d = decay.detach()
    gw = (decay.grad * d * (1 - d)).float() if plif else None
    return LIFRun(s.detach().to(x.dtype), h, xi.grad.to(x.dtype), gw)


def _decay(w0, plif, device) -> float:
    """The float32 decay both runs get (sigmoid on the runs' device)."""
    return float(torch.tensor(w0, device=device).sigmoid()) if plif else 0.5


def _compare(run_kernel, run_ref, x, grad, w0, dtype_name, plif):
    """Forward (membrane, spikes) and backward (dL/dx, PLIF's dL/dw) within the bounds of
    `lif_violations`."""
    assert run_kernel.lif == run_ref.lif
    assert x.dtype == DTYPES[dtype_name]
    k = _evaluate(run_kernel, x, grad, w0, plif)
    r = _evaluate(run_ref, x, grad, w0, plif)
    assert k.spikes.dtype == x.dtype and k.spikes.stride() == x.stride()
    assert (k.gw is not None and r.gw is not None) if plif else (k.gw is None and r.gw is None)
    return assert_lif_agree(k, r, x, grad, _decay(w0, plif, x.device), run_ref.lif)


def test_host_design_check_value(host_lib):
    x = torch.tensor(DESIGN_X)
    s = host_run(HostLauncher())(x, torch.tensor(0.5))
    assert s.tolist() == DESIGN_SPIKES


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
# grid: blocks launched, by hand: one per 256 neurons (rounded up), at most sm_count (one block
# per SM here): 257 -> 2 capped to 1; 999 -> 4 capped to 2; 35 -> 1 under the cap of 2;
# 1001 -> 4 capped to 2; 600 -> 3 at the cap of 3
@pytest.mark.parametrize("T,shape,sm_count,grid", [(1, (257,), 1, 1), (16, (3, 333), 2, 2), (5, (5, 7), 2, 1),
                                                   (19, (1001,), 2, 2), (7, (2, 300), 3, 3)])
@pytest.mark.parametrize("plif,detach", [(False, True), (True, True), (True, False)])
def test_host_wrapper_matches_torch_reference(host_lib, dtype_name, T, shape, sm_count, grid, plif,
                                             detach):
    x, grad = _random_case(T, shape, DTYPES[dtype_name], seed=T * 1000 + shape[-1])
    launcher = HostLauncher(sm_count=sm_count)   # a small grid: several neurons per thread
    _compare(host_run(launcher, detach), torch_run(detach), x, grad, 0.3 if plif else 0.0,
             dtype_name, plif)
    kinds = ["lif_forward", "plif_backward" if plif else "lif_backward"]
    assert launcher.launches == [(f"{k}_{dtype_name}", (grid,), (256,)) for k in kinds]


def test_host_plif_decay_gradient_without_cancellation(host_lib):
    """Positive dL/ds: the decay gradient's terms barely cancel, so its relative error shows."""
    x, _ = _random_case(64, (2000,), torch.float32, seed=11)
    grad = torch.rand(x.shape, generator=torch.Generator().manual_seed(12))
    _compare(host_run(HostLauncher(sm_count=3)), torch_run(), x, grad, 0.3, "float", True)


def test_host_nonzero_reset_threshold_and_alpha(host_lib):
    x, grad = _random_case(8, (300,), torch.float32, seed=5)
    for detach in (True, False):
        _compare(host_run(HostLauncher(), detach, 0.7, -0.2, 3.0),
                 torch_run(detach, 0.7, -0.2, 3.0), x, grad, -0.4, "float", True)


# --------------------------------------------------------------------------- the bounds, on CPU
# The bounds above are checked here against evaluations whose differences are known to be
# rounding only (they must hold) or a wrong constant (they must not).

def test_ulp_is_numpy_spacing():
    import numpy as np

    v = [0.0, 1e-45, 1.2e-38, 1e-30, 6e-8, 1e-5, 0.3, 1.0, 1.5, 2.0 - 2 ** -20, 2.0, 3e4, 3e38]
    for dtype, np_dtype, top in [(torch.float32, np.float32, 4e38), (torch.float16, np.float16, 6e4)]:
        vs = [x for x in v if x < top]
        want = np.spacing(np.array(vs, dtype=np_dtype)).astype(np.float64).tolist()
        assert _ulp(torch.tensor(vs, dtype=dtype).double(), dtype).tolist() == want
    # bfloat16 (8 bits, float32's exponents): by hand
    b = torch.tensor([0.0, 1e-40, 1.0, 1.5, 2.0, -3.0]).to(torch.bfloat16).double()
    assert _ulp(b, torch.bfloat16).tolist() == [2.0 ** -133, 2.0 ** -133, 2.0 ** -7, 2.0 ** -7,
                                                 2.0 ** -6, 2.0 ** -6]


def _f32(v: float) -> float:
    """v as the float32 value the fp32 runs use (a float64 run then sees the same constant)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _off(run, factor):
    """run with its decay scaled by factor (a wrong constant; PLIF's dL/dw carries it too)."""
    def wrong(xi, decay):
        return run(xi, decay * factor)
    wrong.lif = run.lif
    return wrong


# plif, detach, v_threshold, v_reset, alpha
BOUND_CASES = [(False, True, 1.0, 0.0, 2.0), (True, True, 1.0, 0.0, 2.0),
               (True, False, 1.0, 0.0, 2.0), (True, False, _f32(0.7), _f32(-0.2), 3.0)]


@pytest.mark.parametrize("side", ["torch", "host"])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("plif,detach,v_threshold,v_reset,alpha", BOUND_CASES)
def test_bounds_hold_between_float32_and_float64_evaluations(request, side, dtype_name, plif, detach,
                                                              v_threshold, v_reset, alpha):
    """The same math in float32 (the torch reference; or the kernel built for the host, whose
    backward runs in another order: on dL/dh, times decay at the store) and in float64 (the
    torch reference, rounded): every element within its bound, and the bound not vacuous."""
    lif = _lif_params(v_threshold, v_reset, alpha, detach)
    if side == "host":
        request.getfixturevalue("host_lib")
        run32 = host_run(HostLauncher(), **lif)
    else:
        run32 = torch_run(**lif)
    x, grad = _random_case(16, (1500,), DTYPES[dtype_name], seed=17)
    k = _evaluate(run32, x, grad, 0.3, plif)
    r = _evaluate(torch_run(**lif), x, grad, 0.3, plif, dtype=torch.float64)
    out = assert_lif_agree(k, r, x, grad, _decay(0.3, plif, "cpu"), lif)
    # float32 and float64 differ, by a part of the bound that shows it is not loose by orders
    # of magnitude (measured: h 0.2-0.4 of its bound, fp32 dL/dx 0.2-0.3, fp16 one ulp of 1).
    # bf16 keeps 8 bits: differences of ~2**-22 relative rarely straddle its rounding points.
    assert out["worst_h"] > 0.05, out
    if dtype_name != "bfloat16":
        assert out["worst_gx"] > 0.05, out


def test_bounds_excuse_the_decisions_float64_takes_otherwise_at_the_threshold():
    """Neurons driven to h[1] = 1 = v_threshold (decay 0.5, x[1] = 2 - x[0]/2 rounded to
    float32): float32 and float64 put h on different sides of it for 345 of 2000; each such
    decision is excused (within h's bound of the threshold) and those neurons left out; the
    rest agrees within bounds."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2000, generator=g) * 1.5
    x = torch.stack([x0, 2 - x0 / 2, torch.rand(2000, generator=g)])
    grad = torch.randn(x.shape, generator=g)
    k = _evaluate(torch_run(), x, grad, 0.0, False)
    r = _evaluate(torch_run(), x, grad, 0.0, False, dtype=torch.float64)
    flips = int((k.spikes != r.spikes).sum())
    out = lif_violations(x, grad, 0.5, k, r)
    assert flips == int((k.spikes[1] != r.spikes[1]).sum()) == 345
    assert (out["flipped"], out["h"], out["spikes"], out["gx"]) == (345, 0, 0, 0), out


@pytest.mark.parametrize("plif", [False, True])
def test_bounds_reject_decay_one_percent_off(host_lib, plif):
    """The kernel given decay * 1.01: the membranes leave their bounds at once."""
    x, grad = _random_case(16, (1500,), torch.float32, seed=17)
    k = _evaluate(_off(host_run(HostLauncher()), 1.01), x, grad, 0.3, plif)
    r = _evaluate(torch_run(), x, grad, 0.3, plif)
    out = lif_violations(x, grad, _decay(0.3, plif, "cpu"), k, r)
    assert out["h"] > x.numel() // 2 and out["spikes"] > 0, out


@pytest.mark.parametrize("detach", [True, False])
def test_bounds_reject_surrogate_alpha_one_percent_off(host_lib, detach):
    """The kernel given alpha * 1.01 (only its backward uses it): the forward agrees, most of
    dL/dx and dL/dw do not."""
    x, grad = _random_case(16, (1500,), torch.float32, seed=17)
    k = _evaluate(host_run(HostLauncher(), detach, alpha=2.02), x, grad, 0.3, True)
    r = _evaluate(torch_run(detach), x, grad, 0.3, True)
    out = lif_violations(x, grad, _decay(0.3, True, "cpu"), k, r, detach=detach)
    assert out["h"] == out["spikes"] == out["flipped"] == 0, out
    assert out["gx"] > x.numel() // 2, out


def test_bounds_reject_decay_gradient_one_percent_off(host_lib):
    """dL/dw alone 1% or 0.1% off (as a wrong decay in its bracket would make it), where its terms
    barely cancel (dL/ds > 0): outside the bound; the kernel's own dL/dw inside it."""
    x, _ = _random_case(64, (2000,), torch.float32, seed=11)
    grad = torch.rand(x.shape, generator=torch.Generator().manual_seed(12))
    k = _evaluate(host_run(HostLauncher(sm_count=3)), x, grad, 0.3, True)
    r = _evaluate(torch_run(), x, grad, 0.3, True)
    decay = _decay(0.3, True, "cpu")
    ok = lif_violations(x, grad, decay, k, r)
    assert ok["gw"] == 0 and ok["gx"] == 0, ok
    # the bound here is ~1e-5 of dL/dw (U times ~190 additions: 63 per neuron, <= 119 over 2000
    # neurons, 10 more; the terms' |sum| near their sum of |terms|), so even 0.1% is out
    for factor in (1.01, 0.99, 1.001):
        off = lif_violations(x, grad, decay, dataclasses.replace(k, gw=k.gw * factor), r)
        assert off["gw"] == 1 and off["gx"] == 0, off


def test_flips_are_excused_only_within_the_bound_of_the_threshold():
    """A spike decision may differ where h is within its bound of v_threshold (the neuron is
    then left out from that step on: its states diverge); anywhere else it is a violation."""
    # LIF, decay 0.5: neuron 0 reaches h = 1.0 = v_threshold exactly at t = 1; neuron 1 never
    # comes near (h = 0.25, 0.375)
    x = torch.tensor([[1.0, 0.5], [1.5, 0.5], [0.2, 0.2]])
    grad = torch.tensor([[0.3, -0.7], [1.1, 0.4], [0.9, 0.6]])
    r = _evaluate(torch_run(), x, grad, 0.0, False)
    assert r.h[1].tolist() == [1.0, 0.375] and r.spikes[1].tolist() == [1.0, 0.0]
    k = dataclasses.replace(r, spikes=r.spikes.clone(), h=r.h.clone(), gx=r.gx.clone())
    k.h[1, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))   # one ulp below: no spike
    k.spikes[1, 0] = 0.0
    k.h[2, 0] += 0.25          # after the flip: another state, other gradients
    k.gx[:, 0] *= 3
    out = lif_violations(x, grad, 0.5, k, r)
    assert (out["flipped"], out["h"], out["spikes"], out["gx"]) == (1, 0, 0, 0), out
    k.spikes[1, 1] = 1.0        # h = 0.375 is nowhere near 1: a wrong decision
    out = lif_violations(x, grad, 0.5, k, r)
    assert (out["flipped"], out["spikes"], out["gx"]) == (1, 1, 0), out
    k = dataclasses.replace(r, gx=r.gx.clone())
    k.gx[0, 1] = torch.nextafter(k.gx[0, 1], torch.tensor(0.0))       # an ulp is within bounds
    assert lif_violations(x, grad, 0.5, k, r)["gx"] == 0
    k.gx[0, 1] *= 1 + 1e-4
    assert lif_violations(x, grad, 0.5, k, r)["gx"] == 1


@pytest.mark.parametrize("dtype_name", ["float", "half"])
def test_host_permuted_layout_runs_without_copy(host_lib, dtype_name):
    """A channels_last batch [T*N, C, H, W] viewed as [T, N, ...] runs in place: spikes share
    its strides; a gradient in another layout is copied to h's strides first."""
    x, grad = _random_case(6, (3, 5, 4, 4), DTYPES[dtype_name], seed=21)
    x_cl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (6, 3))
    assert not x_cl.is_contiguous() and cupy_lif.dense_time_major(x_cl)
    _compare(host_run(HostLauncher()), torch_run(), x_cl, grad, 0.3, dtype_name, True)
    xt = x.transpose(0, 1)                                  # time not outermost: copied
    s = host_run(HostLauncher())(xt, torch.tensor(0.5))
    assert s.is_contiguous() and torch.equal(s, torch_run()(xt.contiguous(), torch.tensor(0.5)))


def test_host_no_grad_skips_h_and_decay_as_plain_tensor(host_lib):
    """Under no_grad the wrapper passes a null h pointer; spikes are unchanged."""
    x, _ = _random_case(16, (3, 333), torch.float16, seed=9)
    launcher = HostLauncher()
    with torch.no_grad():
        s = host_run(launcher)(x, torch.tensor(0.5))
    assert torch.equal(s, lif_multistep_torch(x, torch.tensor(0.5), 1.0, 0.0, 2.0, True))
    assert [name for name, _, _ in launcher.launches] == ["lif_forward_half"]


def test_host_backward_is_once_differentiable(host_lib):
    x, _ = _random_case(4, (10,), torch.float32, seed=2)
    x.requires_grad_(True)
    s = host_run(HostLauncher())(x, torch.tensor(0.5))
    v = torch.ones_like(s, requires_grad=True)   # a differentiable dL/ds asks for double backward
    (gx,) = torch.autograd.grad(s, x, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_host_empty_input_launches_nothing(host_lib):
    launcher = HostLauncher()
    x = torch.zeros(3, 0, requires_grad=True)
    s = host_run(launcher)(x, torch.tensor(0.5))
    s.sum().backward()
    assert s.shape == (3, 0) and x.grad.shape == (3, 0) and launcher.launches == []


def test_host_launch_rejects_what_cuda_would_misread(host_lib):
    """The host kernels take arguments as the driver does: each of its parameter's width."""
    import numpy as np

    fwd, _ = HostLauncher().kernels("float", 0)[0]
    x, s, d = torch.tensor([[2.0, 0, 0], [0, 3, 0]]), torch.empty(2, 3), torch.tensor([0.5])
    ok = [np.uint64(x.data_ptr()), np.uint64(s.data_ptr()), np.uint64(0), np.uint64(d.data_ptr()),
          np.float32(1.0), np.float32(0.0), np.int64(3), np.int32(2)]
    fwd((1,), (cupy_lif.THREADS,), tuple(ok))
    assert s.tolist() == [[1, 0, 0], [0, 1, 0]]
    for k, bad in [(4, np.float64(1.0)), (6, np.int32(3)), (7, np.int64(2)), (1, 5)]:
        args = list(ok)
        args[k] = bad
        with pytest.raises(TypeError, match=fwd.params[k][1]):
            fwd((1,), (cupy_lif.THREADS,), tuple(args))
    with pytest.raises(ValueError, match="grid"):
        fwd((0,), (cupy_lif.THREADS,), tuple(ok))
    with pytest.raises(ValueError, match="compiled for"):
        fwd((1,), (128,), tuple(ok))


def test_launch_grid_caps_at_resident_blocks():
    assert cupy_lif.launch_grid(1, 132, 8) == 1
    assert cupy_lif.launch_grid(256 * 5 + 1, 132, 8) == 6
    assert cupy_lif.launch_grid(2 ** 20 + 37, 132, 8) == 1056
    assert cupy_lif.launch_grid(0, 132, 8) == 1


def test_host_bfloat16_narrowing_is_round_to_nearest_even(host_lib):
    """st_bfloat16/ld_bfloat16 equal torch's float32 -> bfloat16 -> float32, bit for bit."""
    import ctypes

    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001,
                         0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001,
                         0x00FFFFFF, 0xBF7FC000],
                        dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits.view(torch.float32),
                        torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 1e3])
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    back = torch.empty_like(values)
    host_lib.host_narrow_bfloat16(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                                  ctypes.c_void_p(back.data_ptr()), ctypes.c_longlong(values.numel()))
    expected = values.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    assert out[nan].isnan().all() and back[nan].isnan().all()
    assert torch.equal(back[~nan], expected.float()[~nan])


def test_kernel_index_arithmetic_is_64_bit():
    """T * n may pass 2**31 (fp16 at T=16 needs only 4 GiB per tensor): every element index is
    built from 64-bit values. Checked on the source, since a host run would need >16 GiB; the
    GPU run is test_cuda_big_tensor_index_math."""
    src = cupy_lif.kernel_source("half")
    for name, params in re.findall(r'__global__ void (\w+)\(([^)]*)\)', src):
        assert "const long long n" in params and "const int T" in params, name
    # every product with n is (long long)<step> * n; the grid-stride index is long long too
    products = re.findall(r"\*\s*n\b", src)
    wide = re.findall(r"\(long long\)(?:\(t[^()]*\)|t) \* n\b", src)
    assert len(products) == len(wide) == 9, (products, wide)
    assert "for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x" in src
    assert "const long long stride = (long long)gridDim.x * blockDim.x" in src
    assert "const long long j" in src and not re.search(r"\bint j\b|\bint i\b", src)


# --------------------------------------------------------------------------- CUDA

def cuda_run(detach=True):
    def run(xi, decay):
        return cupy_lif.lif_multistep_cupy(xi, decay, 1.0, 0.0, 2.0, detach)
    run.lif = _lif_params(1.0, 0.0, 2.0, detach)
    return run


@pytest.mark.cuda
def test_cuda_design_check_value():
    x = torch.tensor(DESIGN_X, device="cuda")
    s = cupy_lif.lif_multistep_cupy(x, torch.tensor(0.5, device="cuda"), 1.0, 0.0, 2.0, True)
    assert s.cpu().tolist() == DESIGN_SPIKES


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("T", [1, 5, 16, 19])
@pytest.mark.parametrize("shape", [(1,), (7, 333), (2, 3, 17, 19), (40001,)])
@pytest.mark.parametrize("plif,detach", [(False, True), (True, True), (False, False),
                                         (True, False)])
def test_cuda_kernels_match_torch_reference(dtype_name, T, shape, plif, detach):
    x, grad = _random_case(T, shape, DTYPES[dtype_name], seed=T * 7 + math.prod(shape),
                           device="cuda")
    _compare(cuda_run(detach), torch_run(detach), x, grad, 0.3 if plif else 0.0, dtype_name, plif)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("T", [7, 16])
@pytest.mark.parametrize("plif", [False, True])
def test_cuda_small_grid_walks_several_neurons_per_thread(dtype_name, T, plif, monkeypatch):
    """One SM's worth of blocks for 40001 neurons: each thread takes about 20 of them."""
    monkeypatch.setattr(cupy_lif, "_sm_count", lambda device_index: 1)
    n = 40001
    blocks = [b for _, b in cupy_lif._kernels(dtype_name, torch.cuda.current_device())]
    assert all(cupy_lif.launch_grid(n, 1, b) * cupy_lif.THREADS * 2 < n for b in blocks)
    x, grad = _random_case(T, (n,), DTYPES[dtype_name], seed=T + n, device="cuda")
    _compare(cuda_run(), torch_run(), x, grad, 0.3 if plif else 0.0, dtype_name, plif)


@pytest.mark.cuda
@pytest.mark.parametrize("plif", [False, True])
def test_cuda_launches_on_the_current_stream(plif):
    """On a side stream whose work is delayed (torch.cuda._sleep), the input and dL/ds are
    written after the delay: a kernel launched on any other stream would read the zeros that
    were there before, and the spikes or gradients would be wrong. The layout is a dense
    permutation (as channels_last gives), run without a copy."""
    x, grad = _random_case(16, (64, 50), torch.float16, seed=3, device="cuda")
    w0 = 0.3 if plif else 0.0
    xr = x.clone().requires_grad_(True)
    wr = torch.tensor(w0, device="cuda", requires_grad=plif)
    s_ref = torch_run()(xr, wr.sigmoid() if plif else torch.tensor(0.5, device="cuda"))
    h_ref = s_ref.grad_fn.saved_tensors[0]
    s_ref.backward(grad)
    xbuf = torch.zeros(16, 50, 64, dtype=torch.float16, device="cuda").transpose(1, 2)
    gbuf = torch.zeros_like(grad)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)                  # ~50 ms of GPU time on this stream
        xbuf.copy_(x)
        xi = xbuf.detach().requires_grad_(True)         # [16, 64, 50], stored as [16, 50, 64]
        assert not xi.is_contiguous() and cupy_lif.dense_time_major(xi)
        w = torch.tensor(w0, device="cuda", requires_grad=plif)
        s = cupy_lif.lif_multistep_cupy(xi, w.sigmoid() if plif else torch.tensor(0.5, device="cuda"),
                                        1.0, 0.0, 2.0, True)
        h = s.grad_fn.saved_tensors[0]
        torch.cuda._sleep(100_000_000)
        gbuf.copy_(grad)
        s.backward(gbuf)                                # contiguous: copied to h's layout
        wrapped = cupy_lif._external_stream(side.cuda_stream, torch.cuda.current_device())
        assert wrapped.ptr == side.cuda_stream
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert s.stride() == xi.stride()
    assert (w.grad is not None and wr.grad is not None) == plif
    assert_lif_agree(LIFRun(s, h, xi.grad, w.grad), LIFRun(s_ref, h_ref, xr.grad, wr.grad), x, grad,
                     _decay(w0, plif, "cuda"), torch_run().lif)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("T", [7, 16])
@pytest.mark.parametrize("plif", [False, True])
def test_cuda_big_n(dtype_name, T, plif):
    """n = 2**20 + 37 neurons: more blocks than are resident, and a ragged last block."""
    x, grad = _random_case(T, (2 ** 20 + 37,), DTYPES[dtype_name], seed=T, device="cuda")
    _compare(cuda_run(), torch_run(), x, grad, 0.3 if plif else 0.0, dtype_name, plif)


@pytest.mark.cuda
@pytest.mark.parametrize("plif", [False, True])
def test_cuda_big_tensor_index_math(plif):
    """T * n = 18 * (2**27 + 3) > 2**31 elements in fp16 (4.8 GB per tensor): 11% of the
    elements sit above index 2**31, where 32-bit index arithmetic would wrap."""
    T, n = 18, 2 ** 27 + 3
    assert T * n > 2 ** 31 * 1.1
    free, _ = torch.cuda.mem_get_info()
    if free < 80 * 2 ** 30:
        pytest.skip(f"needs 80 GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(4)
    x = (torch.randn(T, n, device="cuda", generator=g) * 0.8 + 0.6).half()
    grad = torch.randn(T, n, device="cuda", generator=g).half()
    _compare(cuda_run(), torch_run(), x, grad, 0.3 if plif else 0.0, "half", plif)


@pytest.mark.cuda
def test_cuda_multistep_net_cupy_amp_training_lowers_loss():
    from dvsg_train.model import build_model

    torch.manual_seed(0)
    model = build_model(channels=8, net="multistep", neuron="plif", backend="cupy").cuda()
    x = (torch.rand(4, 8, 2, 128, 128, device="cuda") < 0.1).float()   # [T, N, C, H, W]
    y = torch.arange(8, device="cuda") % 11
    target = torch.nn.functional.one_hot(y, 11).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
            loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
