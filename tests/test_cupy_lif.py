"""Tests of the cupy LIF/PLIF kernels (dvsg_train/cupy_lif.py).

Three layers, so that most of it runs without a GPU:
- CPU: the kernel source for every dtype, the unavailable-backend error, and the kernel BODIES
  themselves, built with g++ against a small emulation of the CUDA built-ins (one OS thread per
  CUDA thread, a real barrier for __syncthreads) and compared with the torch reference
  ``dvsg_train.neuron.lif_multistep_torch``. Only the two PTX fp16 conversion helpers are
  swapped for host versions; everything else is the exact text CuPy compiles.
- nvcc: the exact source CuPy gets compiles to PTX for sm_80 and sm_90 (skipped without nvcc).
- CUDA (@pytest.mark.cuda): the real kernels through CuPy against the torch reference, and a
  short ``--cupy --amp`` training run.

Tolerances: forward spikes are compared exactly (h is computed with round-to-nearest intrinsics,
op by op as in PyTorch). fp32 gradients to 1e-6 (rtol and atol). fp16/bf16 gradients: the kernel
computes in fp32 and rounds dL/dx once at the store, so they agree with the fp32 reference
rounded to the dtype within one unit in the last place (rtol 2**-10 fp16, 2**-7 bf16).
dL/ddecay (PLIF) is summed in double; it must match to rtol 1e-5 of the sum of |terms|.
"""
from __future__ import annotations

import ctypes
import math
import shutil
import subprocess

import pytest
import torch

from dvsg_train import cupy_lif
from dvsg_train.errors import BackendUnavailableError
from dvsg_train.neuron import lif_multistep_torch

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


# --------------------------------------------------------------------------- host emulation

_HOST_PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
struct dim3_ { unsigned int x = 0, y = 0, z = 0; };
thread_local dim3_ threadIdx, blockIdx;
dim3_ gridDim, blockDim;
static std::barrier<>* g_barrier = nullptr;
static std::mutex g_atomic;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() g_barrier->arrive_and_wait()
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline double atomicAdd(double* p, double v) {
    std::lock_guard<std::mutex> lock(g_atomic); double old = *p; *p += v; return old;
}
"""

_HOST_HALF = r"""
inline float ld_half(const u16 b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
inline u16 st_half(const float f) { _Float16 h = (_Float16)f; u16 b; std::memcpy(&b, &h, 2); return b; }
"""

_HOST_LAUNCH = r"""
template <typename F> static void launch(int grid, F body) {
    gridDim.x = grid; blockDim.x = THREADS;
    for (int b = 0; b < grid; ++b) {
        std::barrier<> bar(THREADS);
        g_barrier = &bar;
        std::vector<std::thread> ts;
        for (int t = 0; t < THREADS; ++t)
            ts.emplace_back([&body, b, t] { blockIdx.x = b; threadIdx.x = t; body(); });
        for (auto& th : ts) th.join();
    }
}
"""

_HOST_ENTRY = r"""
extern "C" void host_forward_DTYPE(int grid, const void* x, void* s, float* h, const float* d,
                                    float vth, float vr, long long n, int T) {
    launch(grid, [=] { lif_forward_DTYPE((const STORE*)x, (STORE*)s, h, d, vth, vr, n, T); });
}
extern "C" void host_narrow_DTYPE(const float* in, STORE* out, float* back, long long n) {
    for (long long i = 0; i < n; ++i) { out[i] = st_DTYPE(in[i]); back[i] = ld_DTYPE(out[i]); }
}
extern "C" void host_backward_DTYPE(int grid, int plif, const void* gs, const float* h, void* gx,
                                     double* gd, const float* d, float vth, float vr, float scale,
                                     float slope, int detach, long long n, int T) {
    if (plif)
        launch(grid, [=] { plif_backward_DTYPE((const STORE*)gs, h, (STORE*)gx, gd, d, vth, vr,
                                               scale, slope, detach, n, T); });
    else
        launch(grid, [=] { lif_backward_DTYPE((const STORE*)gs, h, (STORE*)gx, gd, d, vth, vr,
                                              scale, slope, detach, n, T); });
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The kernel source of every dtype built as a host shared library (g++, C++20)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not on PATH")
    parts = [_HOST_PRELUDE, f"#define THREADS {cupy_lif.THREADS}\n", _HOST_LAUNCH]
    for i, dtype in enumerate(sorted(DTYPES)):
        src = cupy_lif.kernel_source(dtype)
        assert cupy_lif.HALF_CONVERSIONS in src
        src = src.replace(cupy_lif.HALF_CONVERSIONS, _HOST_HALF if i == 0 else "")
        if i > 0:   # shared helpers are defined once, by the first dtype's source
            src = src[src.index("// x, spikes: [T, N]"):]
        store = cupy_lif.DTYPES[dtype][1]
        parts += [src, _HOST_ENTRY.replace("DTYPE", dtype).replace("STORE", store)]
    out = tmp_path_factory.mktemp("hostlif")
    (out / "lif_host.cpp").write_text("\n".join(parts))
    # -ffp-contract=off: the host has no separate fmad switch; matches the *_rn intrinsics.
    subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                    "-pthread", str(out / "lif_host.cpp"), "-o", str(out / "lif_host.so")],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(out / "lif_host.so"))


def _p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


class _HostLIF(torch.autograd.Function):
    """The host-built kernels behind the same autograd contract as lif_multistep_cupy."""

    @staticmethod
    def forward(ctx, lib, grid, x_seq, decay, vth, vr, alpha, detach):
        name = {v: k for k, v in DTYPES.items()}[x_seq.dtype]
        x = x_seq.contiguous()
        T, n = x.shape[0], x.numel() // x.shape[0]
        s = torch.empty_like(x)
        h = torch.empty(x.shape, dtype=torch.float32)
        d = decay.detach().reshape(1).float().contiguous()
        getattr(lib, f"host_forward_{name}")(
            grid, _p(x), _p(s), _p(h), _p(d), ctypes.c_float(vth), ctypes.c_float(vr),
            ctypes.c_longlong(n), T)
        ctx.save_for_backward(h, d)
        ctx.cfg = (lib, grid, name, vth, vr, alpha, detach, n, T)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        h, d = ctx.saved_tensors
        lib, grid, name, vth, vr, alpha, detach, n, T = ctx.cfg
        g = grad_s.contiguous()
        gx = torch.empty_like(g)
        gd = torch.zeros(1, dtype=torch.float64)
        plif = int(ctx.needs_input_grad[3])
        getattr(lib, f"host_backward_{name}")(
            grid, plif, _p(g), _p(h), _p(gx), _p(gd), _p(d), ctypes.c_float(vth),
            ctypes.c_float(vr), ctypes.c_float(alpha / 2), ctypes.c_float(math.pi / 2 * alpha),
            int(detach), ctypes.c_longlong(n), T)
        return (None, None, gx, gd.float().reshape(()) if plif else None,
                None, None, None, None)


def _grid_for(n: int, cap: int) -> int:
    return max(1, min(-(-n // cupy_lif.THREADS), cap))


def _random_case(T, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((T, *shape), generator=g) * 0.8 + 0.6).to(dtype)
    grad = torch.randn((T, *shape), generator=g).to(dtype)
    return x, grad


def _compare(run_kernel, run_ref, x, grad, w0, dtype_name, plif):
    """Forward spikes exactly; dL/dx and (PLIF) dL/dw within the stated tolerances."""
    outs = []
    for run in (run_kernel, run_ref):
        xi = x.clone().requires_grad_(True)
        w = torch.tensor(w0, requires_grad=plif)
        decay = w.sigmoid() if plif else torch.tensor(0.5)
        s = run(xi, decay)
        (s.float() * grad.float()).sum().backward()
        outs.append((s, xi.grad, w.grad))
    (s_k, gx_k, gw_k), (s_r, gx_r, gw_r) = outs
    assert s_k.dtype == x.dtype
    assert torch.equal(s_k, s_r)
    torch.testing.assert_close(gx_k.float(), gx_r.float(), rtol=GRAD_RTOL[dtype_name],
                               atol=GRAD_ATOL[dtype_name])
    if plif:
        assert gw_k is not None and gw_r is not None
        # d decay / d w = decay * (1 - decay); the fp32 reference's own rounding is bounded by
        # a small multiple of eps times the sum of |terms| of the decay gradient.
        decay = torch.tensor(w0, dtype=torch.float64).sigmoid().item()
        scale = _decay_terms_abs_sum(x, gx_r, decay) * decay * (1 - decay)
        assert abs(float(gw_k) - float(gw_r)) <= DECAY_RTOL * scale + 1e-12


DECAY_RTOL = 2e-6


def _decay_terms_abs_sum(x, gx_ref, decay, v_threshold=1.0, v_reset=0.0) -> float:
    """sum over t, neurons of |dL/dh[t] * (x[t] - (v[t-1] - v_reset))|, in float64."""
    xs = x.double().cpu()
    gh = gx_ref.double().cpu() / decay
    v = torch.full_like(xs[0], v_reset)
    total = 0.0
    for t in range(xs.shape[0]):
        bracket = xs[t] - (v - v_reset)
        h = v + decay * bracket
        total += float((gh[t] * bracket).abs().sum())
        v = torch.where(h >= v_threshold, torch.full_like(h, v_reset), h)
    return total


def test_host_kernels_design_check_value(host_kernels):
    x = torch.tensor(DESIGN_X)
    s = _HostLIF.apply(host_kernels, 1, x, torch.tensor(0.5), 1.0, 0.0, 2.0, True)
    assert s.tolist() == DESIGN_SPIKES


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("T,shape,grid_cap", [(1, (257,), 1), (16, (3, 333), 2), (64, (5, 7), 1),
                                              (19, (1001,), 2)])
@pytest.mark.parametrize("plif,detach", [(False, True), (True, True), (True, False)])
def test_host_kernels_match_torch_reference(host_kernels, dtype_name, T, shape, grid_cap, plif,
                                            detach):
    x, grad = _random_case(T, shape, DTYPES[dtype_name], seed=T * 1000 + shape[-1])
    n = math.prod(shape)
    grid = _grid_for(n, grid_cap)   # a small grid also runs the grid-stride loop

    def kernel(xi, decay):
        return _HostLIF.apply(host_kernels, grid, xi, decay, 1.0, 0.0, 2.0, detach)

    def ref(xi, decay):
        return lif_multistep_torch(xi, decay, 1.0, 0.0, 2.0, detach)

    _compare(kernel, ref, x, grad, 0.3 if plif else 0.0, dtype_name, plif)


def test_host_forward_without_saved_h(host_kernels):
    """Under no_grad the wrapper passes a null h pointer; spikes are unchanged."""
    x, _ = _random_case(16, (3, 333), torch.float16, seed=9)
    s = torch.empty_like(x)
    d = torch.tensor([0.5])
    host_kernels.host_forward_half(2, _p(x), _p(s), ctypes.c_void_p(0), _p(d),
                                   ctypes.c_float(1.0), ctypes.c_float(0.0),
                                   ctypes.c_longlong(999), 16)
    assert torch.equal(s, lif_multistep_torch(x, torch.tensor(0.5), 1.0, 0.0, 2.0, True))


def test_host_plif_decay_gradient_without_cancellation(host_kernels):
    """Positive dL/ds: the decay gradient's terms barely cancel, so its relative error shows."""
    x, _ = _random_case(64, (2000,), torch.float32, seed=11)
    grad = torch.rand(x.shape, generator=torch.Generator().manual_seed(12))

    def kernel(xi, decay):
        return _HostLIF.apply(host_kernels, 3, xi, decay, 1.0, 0.0, 2.0, True)

    def ref(xi, decay):
        return lif_multistep_torch(xi, decay, 1.0, 0.0, 2.0, True)

    _compare(kernel, ref, x, grad, 0.3, "float", True)


def test_host_bfloat16_narrowing_is_round_to_nearest_even(host_kernels):
    """st_bfloat16/ld_bfloat16 equal torch's float32 -> bfloat16 -> float32, bit for bit."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001,
                         0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFF800001,
                         0x00FFFFFF, 0xBF7FC000],
                        dtype=torch.int64).to(torch.int32)
    values = torch.cat([bits.view(torch.float32),
                        torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 1e3])
    out = torch.empty(values.shape, dtype=torch.bfloat16)
    back = torch.empty_like(values)
    host_kernels.host_narrow_bfloat16(_p(values), _p(out), _p(back),
                                      ctypes.c_longlong(values.numel()))
    expected = values.to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(out.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])
    assert out[nan].isnan().all() and back[nan].isnan().all()
    assert torch.equal(back[~nan], expected.float()[~nan])


def test_host_kernels_nonzero_reset(host_kernels):
    x, grad = _random_case(8, (300,), torch.float32, seed=5)
    for detach in (True, False):
        def kernel(xi, decay, detach=detach):
            return _HostLIF.apply(host_kernels, 2, xi, decay, 0.7, -0.2, 3.0, detach)

        def ref(xi, decay, detach=detach):
            return lif_multistep_torch(xi, decay, 0.7, -0.2, 3.0, detach)

        _compare(kernel, ref, x, grad, -0.4, "float", True)


# --------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
def test_cuda_design_check_value():
    x = torch.tensor(DESIGN_X, device="cuda")
    s = cupy_lif.lif_multistep_cupy(x, torch.tensor(0.5, device="cuda"), 1.0, 0.0, 2.0, True)
    assert s.cpu().tolist() == DESIGN_SPIKES


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.parametrize("shape", [(1,), (7, 333), (2, 3, 17, 19), (40001,)])
@pytest.mark.parametrize("plif,detach", [(False, True), (True, True), (False, False),
                                         (True, False)])
def test_cuda_kernels_match_torch_reference(dtype_name, T, shape, plif, detach):
    x, grad = _random_case(T, shape, DTYPES[dtype_name], seed=T * 7 + math.prod(shape))
    x, grad = x.cuda(), grad.cuda()

    def kernel(xi, decay):
        return cupy_lif.lif_multistep_cupy(xi, decay.cuda(), 1.0, 0.0, 2.0, detach)

    def ref(xi, decay):
        return lif_multistep_torch(xi, decay.cuda(), 1.0, 0.0, 2.0, detach)

    _compare(kernel, ref, x, grad, 0.3 if plif else 0.0, dtype_name, plif)


@pytest.mark.cuda
@pytest.mark.parametrize("plif", [False, True])
def test_cuda_side_stream_and_permuted_layout(plif):
    """A channels_last-like (permuted, dense) input runs without a copy on a side stream."""
    x, grad = _random_case(16, (64, 50), torch.float16, seed=3)
    x_perm = x.cuda().transpose(1, 2)          # [T, 50, 64], dense but not contiguous
    grad = grad.cuda().transpose(1, 2).contiguous()   # a layout unlike the saved h: copied
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        def kernel(xi, decay):
            return cupy_lif.lif_multistep_cupy(xi, decay.cuda(), 1.0, 0.0, 2.0, True)

        def ref(xi, decay):
            return lif_multistep_torch(xi, decay.cuda(), 1.0, 0.0, 2.0, True)

        _compare(kernel, ref, x_perm, grad, 0.3 if plif else 0.0, "half", plif)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


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
