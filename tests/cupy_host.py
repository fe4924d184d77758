"""A host launcher for dvsg_train.cupy_lif: the exact CUDA kernel source, built for the CPU with
g++ against a small emulation of the CUDA built-ins, behind the launcher interface that
`cupy_lif.CudaLauncher` implements. Under ``cupy_lif.use_launcher(HostLauncher())`` the real
autograd wrapper (``lif_multistep_cupy`` / ``_LIFMultiStep``: argument packing, strides, dtype
mapping, save_for_backward, the PLIF decay gradient) runs on CPU tensors.

Emulation: one OS thread per CUDA thread of a block (a real ``std::barrier`` for
``__syncthreads``), the blocks of the grid one after another on the same threads, a mutex for
atomicAdd, ``__f*_rn`` as plain IEEE operations (built with -ffp-contract=off, so no FMA
contraction). Only the two PTX fp16 conversion helpers are swapped for host versions
(``_Float16``); everything else is the text CuPy hands to NVRTC.

Launches are checked the way the CUDA driver would take them, and a little stricter: every
argument must be the numpy scalar type of the kernel parameter it lands in (a pointer is
np.uint64, ``float`` np.float32, ``long long`` np.int64, ``int`` np.int32; CuPy would pass a
wrong width through and the kernel would read garbage), the grid must be positive and the
block exactly ``THREADS`` (the shared-memory reduction is compiled for that size).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from dvsg_train import cupy_lif

_PRELUDE = r"""
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
// Every thread of a block runs body() for block 0, 1, ...; the barrier after each block keeps
// one block's shared memory from being reused before all its threads are done.
template <typename F> static void launch(unsigned grid, unsigned block, F body) {
    gridDim.x = grid; blockDim.x = block;
    std::barrier<> bar(block);
    g_barrier = &bar;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t)
        ts.emplace_back([&body, &bar, grid, t] {
            threadIdx.x = t;
            for (unsigned b = 0; b < grid; ++b) { blockIdx.x = b; body(); bar.arrive_and_wait(); }
        });
    for (auto& th : ts) th.join();
}
"""

_HOST_HALF = r"""
inline float ld_half(const u16 b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
inline u16 st_half(const float f) { _Float16 h = (_Float16)f; u16 b; std::memcpy(&b, &h, 2); return b; }
"""

# Narrowing helpers exposed for the conversion tests (not kernels; no launch).
_NARROW = r"""
extern "C" void host_narrow_DTYPE(const float* in, STORE* out, float* back, long long n) {
    for (long long i = 0; i < n; ++i) { out[i] = st_DTYPE(in[i]); back[i] = ld_DTYPE(out[i]); }
}
"""

_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')

#: C parameter type (const and __restrict__ dropped) -> (numpy scalar type, ctypes type)
_ABI = {"float": (np.float32, ctypes.c_float), "long long": (np.int64, ctypes.c_longlong),
        "int": (np.int32, ctypes.c_int), "pointer": (np.uint64, ctypes.c_uint64)}

_CXX_FLAGS = ("-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")


def kernel_params(source: str) -> dict[str, list[tuple[str, str]]]:
    """{kernel name: [(C type, parameter name), ...]} of the extern "C" kernels in source."""
    out = {}
    for name, params in _SIGNATURE.findall(source):
        decls = []
        for p in params.split(","):
            words = p.replace("__restrict__", "").replace("*", " * ").split()
            decls.append((" ".join(words[:-1]).replace(" *", "*"), words[-1]))
        out[name] = decls
    return out


def _abi_kind(c_type: str) -> str:
    if c_type.endswith("*"):
        return "pointer"
    return c_type.replace("const ", "").strip()


def host_source() -> str:
    """One C++ translation unit: the emulation, every dtype's kernel source, and for each
    kernel an ``host_<kernel>(grid, block, void** params)`` entry that unpacks params the way
    cuLaunchKernel does."""
    parts = [_PRELUDE]
    for i, dtype in enumerate(sorted(cupy_lif.DTYPES)):
        src = cupy_lif.kernel_source(dtype)
        if cupy_lif.HALF_CONVERSIONS not in src:
            raise AssertionError("kernel source lost its fp16 conversion block")
        src = src.replace(cupy_lif.HALF_CONVERSIONS, _HOST_HALF if i == 0 else "")
        if i > 0:   # shared helpers are defined once, by the first dtype's source
            src = src[src.index("// x, spikes: [T, N]"):]
        parts.append(src)
        store = cupy_lif.DTYPES[dtype][1]
        parts.append(_NARROW.replace("DTYPE", dtype).replace("STORE", store))
        for name, decls in kernel_params(cupy_lif.kernel_source(dtype)).items():
            args = ", ".join(f"*({t}*)p[{k}]" for k, (t, _) in enumerate(decls))
            parts.append(f'extern "C" void host_{name}(unsigned grid, unsigned block, void** p) '
                         f'{{ launch(grid, block, [=] {{ {name}({args}); }}); }}\n')
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def host_library() -> ctypes.CDLL:
    """The host build, compiled once per source text (cached on disk across sessions)."""
    cxx = shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ not on PATH")
    src = host_source()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([src, version, *_CXX_FLAGS]).encode()).hexdigest()[:24]
    cache = Path(tempfile.gettempdir()) / f"dvsg_hostlif_{os.getuid()}"
    cache.mkdir(exist_ok=True)
    lib = cache / f"lif_host_{key}.so"
    if not lib.exists():
        tmp = cache / f".{key}-{os.getpid()}"
        tmp.mkdir()
        try:
            (tmp / "lif_host.cpp").write_text(src)
            subprocess.run([cxx, *_CXX_FLAGS, str(tmp / "lif_host.cpp"), "-o", str(tmp / "l.so")],
                           check=True, capture_output=True, text=True)
            os.replace(tmp / "l.so", lib)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ctypes.CDLL(str(lib))


class HostKernel:
    """One kernel of the host build, called like a cupy.RawKernel: kernel(grid, block, args)."""

    def __init__(self, name: str, params: list[tuple[str, str]], log: list | None = None):
        self.name = name
        self.params = params
        self._fn = getattr(host_library(), f"host_{name}")
        self._fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        self._fn.restype = None
        self._log = log

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        if len(grid) != 1 or len(block) != 1:
            raise ValueError(f"{self.name}: 1-D grid and block expected, got {grid}, {block}")
        if not 1 <= int(grid[0]) < 2 ** 31:
            raise ValueError(f"{self.name}: invalid grid {grid} (CUDA: invalid configuration)")
        if int(block[0]) != cupy_lif.THREADS:
            raise ValueError(f"{self.name}: block {block}, but the kernel is compiled for "
                             f"{cupy_lif.THREADS} threads")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.params)} parameters")
        values = []
        for arg, (c_type, pname) in zip(args, self.params):
            np_type, c_scalar = _ABI[_abi_kind(c_type)]
            if type(arg) is not np_type:
                raise TypeError(f"{self.name}: parameter {c_type} {pname} needs {np_type.__name__}, "
                                f"got {type(arg).__name__}")
            values.append(c_scalar(arg.item()))
        ptrs = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                 for v in values])
        if self._log is not None:
            self._log.append((self.name, tuple(grid), tuple(block)))
        self._fn(int(grid[0]), int(block[0]), ptrs)


class HostLauncher:
    """cupy_lif's launcher interface over the host build, for CPU tensors.

    sm_count * blocks_per_sm caps the grid as the GPU's resident-block count does, so a small
    cap makes each thread walk several neurons (the grid-stride loop). ``launches`` records
    (kernel, grid, block) of every launch."""

    name = "host"

    def __init__(self, sm_count: int = 2, blocks_per_sm: int = 1):
        self._sm_count = sm_count
        self.blocks_per_sm = blocks_per_sm
        self.launches: list[tuple[str, tuple, tuple]] = []

    def available(self) -> tuple[bool, str]:
        return True, "host launcher (the kernel source built for the CPU)"

    def check_input(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu":
            raise ValueError(f"the host launcher runs on CPU tensors, got one on {x.device}")

    def device_index(self, x: torch.Tensor) -> int:
        return 0

    def kernels(self, dtype: str, device_index: int):
        params = kernel_params(cupy_lif.kernel_source(dtype))
        return tuple((HostKernel(name, params[name], self.launches), self.blocks_per_sm)
                     for name in cupy_lif.kernel_names(dtype))

    def sm_count(self, device_index: int) -> int:
        return self._sm_count

    def launch(self, kernel: HostKernel, device_index: int, grid: tuple, block: tuple,
               args: tuple) -> None:
        kernel(grid, block, args)
