"""CUDA C++ kernels compiled at run time with NVRTC and launched through the driver API (``ctypes``).

The batch-1 int4 GEMV (``kernels/cuda/w4a16_gemv.cu``) is written in CUDA C++ rather than Triton: Triton's
schedule for it stayed ~30 % above a plain read of the weights whatever was tried (notes/kernels.md,
sessions 12-13). Nothing is compiled at install time: NVRTC ships with PyTorch's CUDA wheels (the
``nvidia-cuda-nvrtc`` package; ``libnvrtc.so.<major>``), the cubin is built once per process, device and
template instance (~0.3 s), and kernels launch with ``cuLaunchKernelEx`` on PyTorch's current stream, so
CUDA graphs capture them and the programmatic-dependent-launch attribute (``kernels/pdl.py``) can be set.

``torch.cuda._compile_kernel`` does the compile half of this, but is private and has no launch attributes;
this module is ~150 lines of ctypes instead. ``LMKILN_NVRTC`` names the library file where it is not found.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from lmkiln.errors import KernelInputError

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "cuda"
NVRTC_ENV = "LMKILN_NVRTC"
_PDL_ATTR = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_SMEM_DEFAULT_MAX = 48 * 1024


class NvrtcUnavailable(RuntimeError):
    """No NVRTC library could be loaded (callers fall back to the Triton kernels)."""


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttr)),
        ("numAttrs", ctypes.c_uint),
    ]


def _nvrtc_candidates() -> list[str]:
    env = os.environ.get(NVRTC_ENV, "").strip()
    if env:
        return [env]
    major = (torch.version.cuda or "13").split(".")[0]
    names = []
    for site in sys.path:  # PyPI's nvidia-cuda-nvrtc: nvidia/cu13/lib (CUDA 13) or nvidia/cuda_nvrtc/lib
        for pattern in (f"nvidia/cu{major}/lib/libnvrtc.so.{major}", "nvidia/cuda_nvrtc/lib/libnvrtc.so.*"):
            names += sorted(glob.glob(os.path.join(site, pattern)))
    return [*names, f"libnvrtc.so.{major}", "libnvrtc.so"]  # the wheel first (builtins beside it), then ld


def _preload_builtins(lib_dir: str) -> None:
    """NVRTC dlopens ``libnvrtc-builtins.so.<ver>`` by name at compile time, and PyPI's wheel has no RPATH to
    find it beside itself; loading it first (by path) satisfies that lookup."""
    for path in sorted(glob.glob(os.path.join(lib_dir, "libnvrtc-builtins.so.*"))):
        if ".alt." in path:
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


@functools.cache
def nvrtc() -> ctypes.CDLL:
    tried = []
    for name in _nvrtc_candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            tried.append(f"{name}: {e}")
            continue
        if os.path.isabs(name):
            _preload_builtins(os.path.dirname(name))
        return lib
    raise NvrtcUnavailable(
        "NVRTC not found (tried " + "; ".join(tried) + "); install PyTorch's CUDA build (it depends on "
        f"nvidia-cuda-nvrtc) or set {NVRTC_ENV} to libnvrtc.so's path"
    )


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        _libcuda().cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {res} ({(msg.value or b'?').decode()})")


def enabled(device: torch.device, env: str, error: type[Exception]) -> bool:
    """Whether the kernels behind the A/B switch ``env`` (read at every call; ``error`` reports a bad value)
    may run on ``device``: the switch not 0, CUDA, compute capability >= 9 (``griddepcontrol``, clusters,
    ``red.global.add.v4.f32``), not the Triton interpreter, NVRTC loadable."""
    choice = os.environ.get(env, "").strip()
    if choice not in ("", "0", "1"):
        raise error(f"{env}={choice!r}: use 0 (off), 1 (on where supported) or leave it unset")
    if choice == "0" or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _hopper_with_nvrtc(device)


@functools.lru_cache(maxsize=8)
def _hopper_with_nvrtc(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9 and available()


def available() -> bool:
    """Whether NVRTC loads here (no GPU needed)."""
    try:
        nvrtc()
    except NvrtcUnavailable:
        return False
    return True


def read_source(name: str) -> str:
    return (SOURCE_DIR / name).read_text()


@functools.lru_cache(maxsize=64)
def compile_cubin(source: str, name_expr: str, arch: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """``(cubin, lowered name)`` of the kernel ``name_expr`` (a template instance such as
    ``"w4a16_gemv<128, 1, 1, 0, true, false, 4, true, 1>"``) in ``source``, for ``arch`` (``"sm_90"``);
    ``#include "common.cuh"`` finds the headers of :data:`SOURCE_DIR`."""
    lib = nvrtc()

    def ok(res: int, what: str) -> None:
        if res != 0:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(res).decode()}")

    prog = ctypes.c_void_p()
    ok(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"lmkiln.cu", 0, None, None), "create")
    try:
        ok(lib.nvrtcAddNameExpression(prog, name_expr.encode()), "add name")
        opts = [f"--gpu-architecture={arch}", "-std=c++17", f"--include-path={SOURCE_DIR}", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if res != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            raise RuntimeError(f"NVRTC could not compile {name_expr}:\n{buf.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        ok(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        ok(lib.nvrtcGetLoweredName(prog, name_expr.encode(), ctypes.byref(lowered)), "lowered name")
        return cubin.raw, (lowered.value or b"").decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class CudaKernel:
    """One compiled kernel on one device. ``kernel(grid, block, args, smem=0, pdl=False)`` launches it on
    PyTorch's current stream; ``args`` are tensors (passed as device pointers), Python ints (``int``) and
    floats (``float``)."""

    def __init__(
        self, module: ctypes.c_void_p, func: ctypes.c_void_p, name: str, device: torch.device
    ) -> None:
        self._module, self._func, self.name, self.device = module, func, name, device

    def __call__(
        self,
        grid: Sequence[int],
        block: Sequence[int],
        args: Sequence[torch.Tensor | int],
        smem: int = 0,
        pdl: bool = False,
    ) -> None:
        if smem > _SMEM_DEFAULT_MAX:
            raise KernelInputError(f"{self.name}: {smem} bytes of shared memory > {_SMEM_DEFAULT_MAX}")
        if torch.cuda.current_device() != self.device.index:  # the driver launches in the current context
            with torch.cuda.device(self.device):
                return self(grid, block, args, smem, pdl)
        holders: list[ctypes._SimpleCData] = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.device != self.device:
                    raise KernelInputError(
                        f"{self.name}: tensor on {a.device}, kernel built for {self.device}"
                    )
                holders.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, int):
                holders.append(ctypes.c_int(a))
            elif isinstance(a, float):
                holders.append(ctypes.c_float(a))
            else:
                raise KernelInputError(f"{self.name}: unsupported argument {type(a).__name__}")
        params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        g = (*grid, 1, 1)[:3]
        b = (*block, 1, 1)[:3]
        attrs = (_LaunchAttr * 1)()
        attrs[0].id = _PDL_ATTR
        attrs[0].value = (1).to_bytes(4, "little") + bytes(60)
        cfg = _LaunchConfig(
            *g, *b, smem, ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream), attrs, int(pdl)
        )
        _check(_libcuda().cuLaunchKernelEx(ctypes.byref(cfg), self._func, params, None), self.name)


_LOCK = threading.Lock()


def _ensure_context(device: torch.device) -> None:
    """Make PyTorch's (the primary) context of ``device`` current on this thread for the driver calls."""
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream(device)
        ctx = ctypes.c_void_p()
        _check(_libcuda().cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            dev = ctypes.c_int()
            _check(_libcuda().cuDeviceGet(ctypes.byref(dev), device.index), "cuDeviceGet")
            _check(_libcuda().cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            _check(_libcuda().cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def _load(cubin: bytes, lowered: str, device: torch.device) -> CudaKernel:
    _ensure_context(device)
    module, func = ctypes.c_void_p(), ctypes.c_void_p()
    with torch.cuda.device(device):
        _check(_libcuda().cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
        _check(
            _libcuda().cuModuleGetFunction(ctypes.byref(func), module, lowered.encode()),
            "cuModuleGetFunction",
        )
    return CudaKernel(module, func, lowered, device)


def kernel(
    source_name: str, name_expr: str, device: torch.device, options: tuple[str, ...] = ()
) -> CudaKernel:
    """The kernel ``name_expr`` of ``kernels/cuda/<source_name>``, built for ``device`` once a process."""
    if device.type != "cuda":
        raise KernelInputError(f"CUDA kernels need a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _kernel(source_name, name_expr, device, options)


@functools.lru_cache(maxsize=128)
def _kernel(source_name: str, name_expr: str, device: torch.device, options: tuple[str, ...]) -> CudaKernel:
    major, minor = torch.cuda.get_device_capability(device)
    with _LOCK:
        cubin, lowered = compile_cubin(read_source(source_name), name_expr, f"sm_{major}{minor}", options)
        log.debug("built %s for %s (%d bytes of cubin)", name_expr, device, len(cubin))
        return _load(cubin, lowered, device)
