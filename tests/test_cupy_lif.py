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

Tolerances: forward spikes are compared exactly (h is computed with round-to-nearest intrinsics,
op by op as in PyTorch). fp32 gradients to 1e-6 (rtol and atol). fp16/bf16 gradients: the kernel
computes in fp32 and rounds dL/dx once at the store, so they agree with the fp32 reference
rounded to the dtype within one unit in the last place (rtol 2**-10 fp16, 2**-7 bf16).
dL/ddecay (PLIF) is summed in double; it must match to rtol 1e-5 of the sum of |terms|.
"""
from __future__ import annotations

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
GRAD_RTOL = {"float": 1e-6, "half": 2.0 ** -10, "bfloat16": 2.0 ** -7}
GRAD_ATOL = {"float": 1e-6, "half": 1e-6, "bfloat16": 1e-6}
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


def host_run(launcher, detach=True, v_threshold=1.0, v_reset=0.0, alpha=2.0):
    """The real lif_multistep_cupy through ``launcher``, as a (x, decay) -> spikes function."""
    def run(xi, decay):
        with cupy_lif.use_launcher(launcher):
            return cupy_lif.lif_multistep_cupy(xi, decay, v_threshold, v_reset, alpha, detach)
    return run


def torch_run(detach=True, v_threshold=1.0, v_reset=0.0, alpha=2.0):
    def run(xi, decay):
        return lif_multistep_torch(xi, decay, v_threshold, v_reset, alpha, detach)
    return run


def _random_case(T, shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((T, *shape), generator=g) * 0.8 + 0.6).to(dtype)
    grad = torch.randn((T, *shape), generator=g).to(dtype)
    return x.to(device), grad.to(device)


def _compare(run_kernel, run_ref, x, grad, w0, dtype_name, plif):
    """Forward spikes exactly; dL/dx and (PLIF) dL/dw within the stated tolerances."""
    outs = []
    for run in (run_kernel, run_ref):
        xi = x.clone().requires_grad_(True)
        w = torch.tensor(w0, requires_grad=plif, device=x.device)
        decay = w.sigmoid() if plif else torch.tensor(0.5, device=x.device)
        s = run(xi, decay)
        s.backward(grad)
        outs.append((s.detach(), xi.grad, w.grad))
        del s, xi
    (s_k, gx_k, gw_k), (s_r, gx_r, gw_r) = outs
    assert s_k.dtype == x.dtype and s_k.stride() == x.stride()
    assert torch.equal(s_k, s_r)
    del s_k, s_r
    for t in range(x.shape[0]):       # step by step: the big GPU case holds 2**31 elements
        torch.testing.assert_close(gx_k[t].float(), gx_r[t].float(), rtol=GRAD_RTOL[dtype_name],
                                   atol=GRAD_ATOL[dtype_name])
    if plif:
        assert gw_k is not None and gw_r is not None
        # d decay / d w = decay * (1 - decay); the fp32 reference's own rounding is bounded by
        # a small multiple of eps times the sum of |terms| of the decay gradient.
        decay = torch.tensor(w0, dtype=torch.float64).sigmoid().item()
        scale = _decay_terms_abs_sum(x, gx_r, decay) * decay * (1 - decay)
        assert abs(float(gw_k) - float(gw_r)) <= DECAY_RTOL * scale + 1e-12
    else:
        assert gw_k is None


DECAY_RTOL = 2e-6


def _decay_terms_abs_sum(x, gx_ref, decay, v_threshold=1.0, v_reset=0.0) -> float:
    """sum over t, neurons of |dL/dh[t] * (x[t] - (v[t-1] - v_reset))|, in float64, step by step."""
    v = torch.full(x.shape[1:], v_reset, dtype=torch.float64, device=x.device)
    total = 0.0
    for t in range(x.shape[0]):
        bracket = x[t].double() - (v - v_reset)
        h = v + decay * bracket
        total += float((gx_ref[t].double() / decay * bracket).abs().sum())
        v = torch.where(h >= v_threshold, torch.full_like(h, v_reset), h)
    return total


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
        torch.cuda._sleep(100_000_000)
        gbuf.copy_(grad)
        s.backward(gbuf)                                # contiguous: copied to h's layout
        wrapped = cupy_lif._external_stream(side.cuda_stream, torch.cuda.current_device())
        assert wrapped.ptr == side.cuda_stream
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(s, s_ref) and s.stride() == xi.stride()
    torch.testing.assert_close(xi.grad.float(), xr.grad.float(),
                               rtol=GRAD_RTOL["half"], atol=GRAD_ATOL["half"])
    if plif:
        torch.testing.assert_close(w.grad, wr.grad, rtol=1e-3, atol=1e-6)


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
