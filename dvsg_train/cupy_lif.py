"""Multi-step LIF / PLIF neurons as CUDA kernels compiled at run time by CuPy (``--cupy``).

One thread per neuron; each thread walks the T time steps of its neuron with stride
N = number of neurons, so a warp's loads and stores at one step are contiguous. The membrane
state lives in fp32 registers whatever the input dtype (fp32, fp16, bf16); inputs are widened
exactly and outputs rounded once, at the store.

Per neuron (decay = 1/tau for LIF, sigmoid(w) for PLIF; decay_input):
    h[t] = v[t-1] + decay * (x[t] - (v[t-1] - v_reset)),  v[-1] = v_reset
    s[t] = h[t] >= v_threshold
    v[t] = v_reset if s[t] else h[t]
Backward uses the ATan surrogate ds/dh = alpha/2 / (1 + (pi/2 * alpha * (h - v_threshold))^2).

What forward saves: h[t] in fp32 (4 bytes per neuron and step). Spikes and v[t-1] are
recomputed exactly from it (s = h >= v_th; v = v_reset if s else h), so the backward pass of
an fp16/bf16 network differs from an fp32 reference fed the same rounded values only by the
final rounding of dL/dx (one unit in the last place of the dtype).
PLIF's dL/ddecay = sum over t and neurons of dL/dh[t] * (x[t] - (v[t-1] - v_reset)), with the
bracket recovered as (h[t] - v[t-1]) / decay: per-thread partial sums in double, a
shared-memory block reduction in double and one double atomicAdd per block.

The kernel source needs no header (fp16/bf16 conversions are written out: PTX ``cvt`` for
fp16, bit operations for bf16, so it also builds for GPUs older than sm_80), which makes what
NVRTC compiles under CuPy byte-identical to what ``nvcc -ptx`` compiles in the tests.

cupy is imported lazily; :func:`kernel_source` needs neither cupy nor CUDA.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from .errors import BackendUnavailableError

INSTALL_HINT = "pip install 'dvsgesture-kit[cuda]'"

#: dtype name used in the kernel source -> (torch dtype, C storage type)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float": (torch.float32, "float"),
    "half": (torch.float16, "unsigned short"),
    "bfloat16": (torch.bfloat16, "unsigned short"),
}
_NAME_OF_TORCH_DTYPE = {v[0]: k for k, v in DTYPES.items()}

#: options handed to NVRTC through cupy.RawModule (the PTX test passes the same to nvcc)
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17",)

THREADS = 256
# The grid is capped at the blocks that fit on the GPU at once (from the kernel's register
# count; a grid-stride loop covers the rest), so there is no tail wave and the PLIF backward
# issues one atomic per resident block.
_REGS_PER_SM = 65536
_MAX_THREADS_PER_SM = 2048

_TYPES = r"""
typedef unsigned short u16;

// Exact widening / round-to-nearest-even narrowing; no cuda_fp16.h / cuda_bf16.h needed.
__device__ __forceinline__ float ld_float(const float v) { return v; }
__device__ __forceinline__ float st_float(const float v) { return v; }
"""

# fp16 conversions via PTX cvt (any sm); kept apart so tests can swap in a host version.
HALF_CONVERSIONS = r"""
__device__ __forceinline__ float ld_half(const u16 b) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}
__device__ __forceinline__ u16 st_half(const float f) {
    u16 b;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}
"""

_BF16_CONVERSIONS = r"""
__device__ __forceinline__ float ld_bfloat16(const u16 b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
__device__ __forceinline__ u16 st_bfloat16(const float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
"""

_KERNELS = r"""
// x, spikes: [T, N] in STORE; h: [T, N] fp32, or null when no backward will run.
// decay: device pointer to one float.
extern "C" __global__ void lif_forward_DTYPE(
        const STORE* __restrict__ x, STORE* __restrict__ spikes, float* __restrict__ h_seq,
        const float* __restrict__ decay_ptr, const float v_threshold, const float v_reset,
        const long long n, const int T) {
    const float decay = *decay_ptr;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float v = v_reset;
        int t = 0;
        // Four loads in flight before the dependent chain uses them.
        for (; t + 4 <= T; t += 4) {
            float xs[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) xs[k] = ld_DTYPE(x[(long long)(t + k) * n + i]);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const long long j = (long long)(t + k) * n + i;
                // rn intrinsics: no FMA contraction, so h equals PyTorch's op-by-op fp32 result.
                const float hv = __fadd_rn(v, __fmul_rn(decay, __fsub_rn(xs[k], __fsub_rn(v, v_reset))));
                const bool s = hv >= v_threshold;
                if (h_seq) h_seq[j] = hv;
                spikes[j] = st_DTYPE(s ? 1.0f : 0.0f);
                v = s ? v_reset : hv;
            }
        }
        for (; t < T; ++t) {
            const long long j = (long long)t * n + i;
            const float hv = __fadd_rn(v, __fmul_rn(decay, __fsub_rn(ld_DTYPE(x[j]), __fsub_rn(v, v_reset))));
            const bool s = hv >= v_threshold;
            if (h_seq) h_seq[j] = hv;
            spikes[j] = st_DTYPE(s ? 1.0f : 0.0f);
            v = s ? v_reset : hv;
        }
    }
}

// One backward step at time t: returns dL/dh[t]; writes dL/dx[t]; adds to the decay sum.
template <bool NEED_DECAY>
__device__ __forceinline__ float backward_step_DTYPE(
        const float gs, const float hv, const float h_prev, const bool has_prev,
        const float grad_v, STORE* __restrict__ gx, double& acc, const float decay,
        const float v_threshold, const float v_reset, const float sg_scale,
        const float sg_slope, const int detach_reset) {
    const float spiked = (hv >= v_threshold) ? 1.0f : 0.0f;
    const float z = sg_slope * (hv - v_threshold);
    const float sg = sg_scale / (1.0f + z * z);
    const float grad_h = detach_reset
        ? gs * sg + grad_v * (1.0f - spiked)
        : gs * sg + grad_v * ((1.0f - spiked) + (v_reset - hv) * sg);
    *gx = st_DTYPE(grad_h * decay);
    if (NEED_DECAY) {
        // v[t-1] from the saved h[t-1]: the reset value if that step spiked.
        const float v_prev = has_prev ? ((h_prev >= v_threshold) ? v_reset : h_prev) : v_reset;
        acc += (double)grad_h * (((double)hv - (double)v_prev) / (double)decay);
    }
    return grad_h;
}

// grad_s, grad_x: [T, N] in STORE; h: [T, N] fp32 from the forward pass.
// grad_decay: one double, one atomicAdd per block (plif_* kernels only).
template <bool NEED_DECAY>
__device__ __forceinline__ void backward_DTYPE(
        const STORE* __restrict__ grad_s, const float* __restrict__ h_seq,
        STORE* __restrict__ grad_x, double* __restrict__ grad_decay,
        const float* __restrict__ decay_ptr, const float v_threshold, const float v_reset,
        const float sg_scale, const float sg_slope, const int detach_reset,
        const long long n, const int T) {
    __shared__ double partial[BLOCK];
    const float decay = *decay_ptr;
    const float keep = 1.0f - decay;
    const long long stride = (long long)gridDim.x * blockDim.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float grad_v = 0.0f;  // dL/dv[t] arriving from step t + 1
        int t = T - 1;
        float hv = h_seq[(long long)t * n + i];
        // Steps t..t-3 with their loads issued together before the dependent chain.
        for (; t >= 3; t -= 4) {
            float gs[4], hp[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) gs[k] = ld_DTYPE(grad_s[(long long)(t - k) * n + i]);
#pragma unroll
            for (int k = 0; k < 3; ++k) hp[k] = h_seq[(long long)(t - k - 1) * n + i];
            hp[3] = (t >= 4) ? h_seq[(long long)(t - 4) * n + i] : 0.0f;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float grad_h = backward_step_DTYPE<NEED_DECAY>(
                    gs[k], hv, hp[k], t - k > 0, grad_v, grad_x + (long long)(t - k) * n + i,
                    acc, decay, v_threshold, v_reset, sg_scale, sg_slope, detach_reset);
                grad_v = grad_h * keep;
                hv = hp[k];
            }
        }
        for (; t >= 0; --t) {
            const long long j = (long long)t * n + i;
            const float h_prev = (t > 0) ? h_seq[j - n] : 0.0f;
            const float grad_h = backward_step_DTYPE<NEED_DECAY>(
                ld_DTYPE(grad_s[j]), hv, h_prev, t > 0, grad_v, grad_x + j, acc, decay,
                v_threshold, v_reset, sg_scale, sg_slope, detach_reset);
            grad_v = grad_h * keep;
            hv = h_prev;
        }
    }
    if (NEED_DECAY) {
        partial[threadIdx.x] = acc;
        __syncthreads();
        for (int width = BLOCK / 2; width > 0; width >>= 1) {
            if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
            __syncthreads();
        }
        if (threadIdx.x == 0) atomicAdd(grad_decay, partial[0]);
    }
}

extern "C" __global__ void lif_backward_DTYPE(
        const STORE* __restrict__ grad_s, const float* __restrict__ h_seq,
        STORE* __restrict__ grad_x, double* __restrict__ grad_decay,
        const float* __restrict__ decay_ptr, const float v_threshold, const float v_reset,
        const float sg_scale, const float sg_slope, const int detach_reset,
        const long long n, const int T) {
    backward_DTYPE<false>(grad_s, h_seq, grad_x, grad_decay, decay_ptr, v_threshold, v_reset,
                          sg_scale, sg_slope, detach_reset, n, T);
}

extern "C" __global__ void plif_backward_DTYPE(
        const STORE* __restrict__ grad_s, const float* __restrict__ h_seq,
        STORE* __restrict__ grad_x, double* __restrict__ grad_decay,
        const float* __restrict__ decay_ptr, const float v_threshold, const float v_reset,
        const float sg_scale, const float sg_slope, const int detach_reset,
        const long long n, const int T) {
    backward_DTYPE<true>(grad_s, h_seq, grad_x, grad_decay, decay_ptr, v_threshold, v_reset,
                         sg_scale, sg_slope, detach_reset, n, T);
}
"""


def kernel_source(dtype: str) -> str:
    """CUDA C++ source of the forward and backward kernels for one storage dtype.

    dtype: "float", "half" or "bfloat16". Kernels are ``extern "C"`` and named
    ``lif_forward_<dtype>`` / ``lif_backward_<dtype>``; block size is fixed at THREADS.
    """
    if dtype not in DTYPES:
        raise ValueError(f"kernel dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    store = DTYPES[dtype][1]
    body = (_KERNELS.replace("DTYPE", dtype).replace("STORE", store)
            .replace("BLOCK", str(THREADS)))
    return (f"// dvsg_train.cupy_lif kernels, dtype {dtype}\n"
            f"{_TYPES}{HALF_CONVERSIONS}{_BF16_CONVERSIONS}{body}")


def kernel_names(dtype: str) -> tuple[str, str, str]:
    """(forward, LIF backward, PLIF backward) kernel names in :func:`kernel_source` (dtype)."""
    return f"lif_forward_{dtype}", f"lif_backward_{dtype}", f"plif_backward_{dtype}"


def _cuda_cupy_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, f"--cupy needs a CUDA GPU, and torch sees none (then: {INSTALL_HINT})"
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library cupy cannot load
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return False, f"--cupy needs CuPy, which cannot be imported ({reason}): {INSTALL_HINT}"
    return True, "cupy backend available"


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_compile_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _kernels(dtype: str, device_index: int):
    """(kernel, resident blocks per SM) for forward, LIF backward and PLIF backward of dtype
    on one device, compiled once (CuPy also keeps the binaries in its on-disk cache)."""
    import cupy

    with _compile_lock, cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=kernel_source(dtype), options=COMPILE_OPTIONS)
        out = []
        for name in kernel_names(dtype):
            f = module.get_function(name)
            # Loads the module onto this device now, not inside a later (captured) launch.
            out.append((f, resident_blocks(int(f.attributes["num_regs"]))))
    return tuple(out)


def resident_blocks(num_regs: int) -> int:
    """Blocks of THREADS threads that fit on one SM at num_regs registers per thread."""
    per_thread = max(8, -(-num_regs // 8) * 8)   # allocation granularity: 8 registers
    return max(1, min(_MAX_THREADS_PER_SM // THREADS, _REGS_PER_SM // (per_thread * THREADS)))


def launch_grid(n: int, sm_count: int, blocks_per_sm: int) -> int:
    """Blocks to launch for n neurons: one per THREADS neurons, at most the blocks resident at
    once (sm_count * blocks_per_sm); the grid-stride loop covers the rest."""
    return max(1, min(-(-n // THREADS), sm_count * blocks_per_sm))


class _StreamRef:
    """A raw stream handle behind the CUDA stream protocol (what Stream.from_external takes)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _external_stream(stream_ptr: int, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:        # CuPy >= 14 (ExternalStream is deprecated there)
            stream = from_external(_StreamRef(stream_ptr))
            if stream.ptr != stream_ptr:
                raise RuntimeError(f"cupy.cuda.Stream.from_external wrapped stream {stream.ptr:#x}, "
                                   f"not torch's {stream_ptr:#x}")
            return stream
        return cupy.cuda.ExternalStream(stream_ptr, device_index)


class CudaLauncher:
    """Runs the kernels through CuPy on CUDA tensors, on torch's current stream.

    The launch interface the autograd wrapper uses (tests put a host-compiled build of the same
    source behind it, ``tests/cupy_host.py``): ``available()``, ``check_input(x)``,
    ``device_index(x)``, ``kernels(dtype, device_index)`` -> 3 x (kernel, resident blocks per
    SM), ``sm_count(device_index)`` and ``launch(kernel, device_index, grid, block, args)``
    with CuPy's RawKernel argument conventions (numpy scalars; pointers as np.uint64).
    """

    name = "cuda"

    def available(self) -> tuple[bool, str]:
        return _cuda_cupy_available()

    def check_input(self, x: torch.Tensor) -> None:
        if not x.is_cuda:
            raise BackendUnavailableError(
                f"the cupy neuron backend runs on CUDA tensors, got a tensor on {x.device}")

    def device_index(self, x: torch.Tensor) -> int:
        return x.device.index if x.device.index is not None else torch.cuda.current_device()

    def kernels(self, dtype: str, device_index: int):
        return _kernels(dtype, device_index)

    def sm_count(self, device_index: int) -> int:
        return _sm_count(device_index)

    def launch(self, kernel, device_index: int, grid: tuple, block: tuple, args: tuple) -> None:
        import cupy

        stream = _external_stream(torch.cuda.current_stream(device_index).cuda_stream, device_index)
        with cupy.cuda.Device(device_index), stream:
            kernel(grid, block, args)


_active_launcher = CudaLauncher()


def active_launcher():
    """The launcher lif_multistep_cupy uses now (CudaLauncher unless `use_launcher` swapped it)."""
    return _active_launcher


@contextlib.contextmanager
def use_launcher(launcher):
    """Run the cupy backend through ``launcher`` inside the block (tests: a host build)."""
    global _active_launcher
    previous, _active_launcher = _active_launcher, launcher
    try:
        yield launcher
    finally:
        _active_launcher = previous


def cupy_available() -> tuple[bool, str]:
    """Whether the cupy backend can run here, and if not, one line saying why and what to do."""
    return _active_launcher.available()


def _launch(launcher, compiled, device_index: int, n: int, args: tuple) -> None:
    kernel, blocks_per_sm = compiled
    grid = launch_grid(n, launcher.sm_count(device_index), blocks_per_sm)
    launcher.launch(kernel, device_index, (grid,), (THREADS,), args)


def _ptr(t: torch.Tensor | None):
    import numpy as np

    return np.uint64(0 if t is None else t.data_ptr())


def dense_time_major(x: torch.Tensor) -> bool:
    """True if x [T, ...] can be walked as [T, n] raw memory: step t is elements t*n .. t*n+n-1.

    Holds for contiguous tensors and for dense permutations inside a step (e.g. a
    channels_last [T*N, C, H, W] batch viewed as [T, N, C, H, W]), which then need no copy.
    """
    if x.dim() < 1 or x.numel() == 0:
        return x.is_contiguous()
    n = x.numel() // x.shape[0]
    if x.shape[0] > 1 and x.stride(0) != n:
        return False
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(x.shape[1:], x.stride()[1:])
                                if sz != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _decay_on_device(decay: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """decay as a 1-element fp32 tensor on device, without a host-device synchronisation."""
    if isinstance(decay, torch.Tensor):
        d = decay.detach()
        if d.numel() != 1:
            raise ValueError(f"decay must hold one value, got shape {tuple(d.shape)}")
        if d.device == device:
            return d.reshape(1).to(torch.float32).contiguous()
        # A CPU scalar is read on the host (free) and filled on the device (no sync).
        decay = float(d.reshape(()).item()) if d.device.type == "cpu" else d
        if isinstance(decay, torch.Tensor):
            return decay.reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(decay), dtype=torch.float32, device=device)


class _LIFMultiStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, decay: torch.Tensor, v_threshold: float,
                v_reset: float, alpha: float, detach_reset: bool, launcher) -> torch.Tensor:
        import numpy as np

        dtype_name = _NAME_OF_TORCH_DTYPE[x_seq.dtype]
        dev = launcher.device_index(x_seq)
        # Any dense layout with time outermost runs as is (channels_last included); outputs and
        # saved h share its strides.
        x = x_seq if dense_time_major(x_seq) else x_seq.contiguous()
        T = x.shape[0]
        n = x.numel() // T if T else 0
        spikes = torch.empty_like(x)
        # h is only stored when a backward pass can follow (not under no_grad / eval).
        keep_h = bool(ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        h_seq = torch.empty_like(x, dtype=torch.float32) if keep_h else None
        decay_dev = _decay_on_device(decay, x.device)
        if n > 0 and T > 0:
            fwd = launcher.kernels(dtype_name, dev)[0]
            _launch(launcher, fwd, dev, n, (_ptr(x), _ptr(spikes), _ptr(h_seq), _ptr(decay_dev),
                                            np.float32(v_threshold), np.float32(v_reset),
                                            np.int64(n), np.int32(T)))
        ctx.save_for_backward(h_seq, decay_dev)
        ctx.params = (dtype_name, dev, n, T, float(v_threshold), float(v_reset), float(alpha),
                      bool(detach_reset))
        ctx.launcher = launcher
        ctx.decay_meta = (decay.shape, decay.device) if isinstance(decay, torch.Tensor) else None
        return spikes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_spikes: torch.Tensor):
        import numpy as np

        h_seq, decay_dev = ctx.saved_tensors
        dtype_name, dev, n, T, v_threshold, v_reset, alpha, detach_reset = ctx.params
        launcher = ctx.launcher
        need_decay = bool(ctx.needs_input_grad[1])
        g = grad_spikes.to(DTYPES[dtype_name][0])
        if g.stride() != h_seq.stride():
            g = torch.empty_like(h_seq, dtype=g.dtype).copy_(g)
        grad_x = torch.empty_like(g)
        # Only the PLIF kernel writes it; an empty tensor costs no fill kernel for LIF.
        grad_decay = (torch.zeros(1, dtype=torch.float64, device=g.device) if need_decay
                      else torch.empty(0, dtype=torch.float64, device=g.device))
        if n > 0 and T > 0:
            bwd = launcher.kernels(dtype_name, dev)[2 if need_decay else 1]
            _launch(launcher, bwd, dev, n, (
                _ptr(g), _ptr(h_seq), _ptr(grad_x), _ptr(grad_decay), _ptr(decay_dev),
                np.float32(v_threshold), np.float32(v_reset), np.float32(alpha / 2.0),
                np.float32(math.pi / 2.0 * alpha), np.int32(detach_reset), np.int64(n),
                np.int32(T)))
        out_decay = None
        if need_decay and ctx.decay_meta is not None:
            shape, device = ctx.decay_meta
            out_decay = grad_decay.to(torch.float32).reshape(shape).to(device)
        return grad_x, out_decay, None, None, None, None, None


def lif_multistep_cupy(x_seq: torch.Tensor, decay: torch.Tensor, v_threshold: float,
                       v_reset: float, alpha: float, detach_reset: bool) -> torch.Tensor:
    """Multi-step LIF/PLIF with the ATan surrogate on CUDA.

    x_seq: [T, ...] CUDA tensor, float32, float16 or bfloat16. decay: 0-dim float32 tensor
    (1/tau for LIF; sigmoid(w) for PLIF, which then receives its gradient). Returns spikes
    [T, ...] in x_seq's dtype. Raises BackendUnavailableError without CUDA or cupy.
    Launches go through the active launcher (CUDA via CuPy; see `use_launcher`).
    """
    launcher = _active_launcher
    ok, reason = launcher.available()
    if not ok:
        raise BackendUnavailableError(reason)
    launcher.check_input(x_seq)
    if x_seq.dtype not in _NAME_OF_TORCH_DTYPE:
        raise ValueError(f"the cupy backend takes float32, float16 or bfloat16, got {x_seq.dtype}")
    if x_seq.dim() < 1:
        raise ValueError("x_seq must have a leading time dimension [T, ...]")
    return _LIFMultiStep.apply(x_seq, decay, v_threshold, v_reset, alpha, detach_reset, launcher)
