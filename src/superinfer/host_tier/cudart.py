"""The CUDA runtime calls torch does not expose, through ctypes on the libcudart torch loaded.

- ``cudaMemcpyBatchAsync``: one ``cudaMemcpyAsync`` per 32-128 KiB piece costs more host time
  than the copy takes; one batch call hands thousands of pieces to the copy engines: no kernel,
  no SM time, no staging memory (the "direct" path, ``direct.py``).
- Persisting L2 (``pin_in_l2``): keeps the staging path's small staging ring resident in L2, so
  its gather/scatter kernels and the copy engines meet there instead of in HBM (``duplex.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import sys
from pathlib import Path

import torch

MIN_RUNTIME = 12080  # cudaMemcpyBatchAsync appeared in CUDA 12.8


class MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class MemcpyAttributes(ctypes.Structure):
    """``struct cudaMemcpyAttributes`` (driver_types.h, CUDA 12.8+): 24 bytes."""

    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", MemLocation),
                ("dstLocHint", MemLocation), ("flags", ctypes.c_uint)]


SRC_ACCESS_ORDER_STREAM = 1  # cudaMemcpySrcAccessOrderStream
LOC_DEVICE, LOC_HOST = 1, 2  # cudaMemLocationTypeDevice / cudaMemLocationTypeHost


class CudaRuntime:
    """The process's libcudart. 12.8/12.9 take a ``size_t* failIdx`` before the stream in
    ``cudaMemcpyBatchAsync``; 13.0 dropped it."""

    def __init__(self) -> None:
        self.path, self.lib = _libcudart()
        self.version = _int_query(self.lib, "cudaRuntimeGetVersion")
        self.driver_version = _int_query(self.lib, "cudaDriverGetVersion")
        if self.version < MIN_RUNTIME or not hasattr(self.lib, "cudaMemcpyBatchAsync"):
            raise RuntimeError(f"the direct KV path needs cudaMemcpyBatchAsync (CUDA runtime >= 12.8); "
                               f"{self.path} is version {self.version}")
        self._batch = self.lib.cudaMemcpyBatchAsync
        self.has_fail_idx = self.version < 13000
        self._batch.restype = ctypes.c_int
        self._batch.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_size_t, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_size_t]
                                + [ctypes.c_void_p] * (2 if self.has_fail_idx else 1))
        self._attrs_idx = (ctypes.c_size_t * 1)(0)
        self._fail_idx = ctypes.c_size_t(0)

    def memcpy_batch(self, dsts: torch.Tensor, srcs: torch.Tensor, sizes: torch.Tensor,
                     to_host: bool, stream: torch.cuda.Stream, device: int) -> None:
        """Copy ``sizes[i]`` bytes from ``srcs[i]`` to ``dsts[i]`` for every i, in order on
        ``stream``. The arrays are int64 CPU tensors, read during the call."""
        attrs = MemcpyAttributes()
        attrs.srcAccessOrder = SRC_ACCESS_ORDER_STREAM
        dev, host = MemLocation(LOC_DEVICE, device), MemLocation(LOC_HOST, 0)
        attrs.srcLocHint, attrs.dstLocHint = (dev, host) if to_host else (host, dev)
        self.memcpy_batch_with(dsts, srcs, sizes, attrs, stream)

    def memcpy_batch_with(self, dsts: torch.Tensor, srcs: torch.Tensor, sizes: torch.Tensor,
                          attrs: MemcpyAttributes, stream: torch.cuda.Stream) -> None:
        """As ``memcpy_batch``, with the caller's attributes for every copy."""
        args = [dsts.data_ptr(), srcs.data_ptr(), sizes.data_ptr(), dsts.numel(),
                ctypes.addressof(attrs), ctypes.addressof(self._attrs_idx), 1]
        if self.has_fail_idx:
            args.append(ctypes.addressof(self._fail_idx))
        err = self._batch(*args, stream.cuda_stream)
        if err != 0:
            where = f", failIdx {self._fail_idx.value}" if self.has_fail_idx else ""
            raise RuntimeError(f"cudaMemcpyBatchAsync: error {err} "
                               f"({self.lib.cudaGetErrorString(err).decode()}){where}")



@functools.cache
def runtime() -> CudaRuntime:
    return CudaRuntime()


@functools.cache
def _libcudart() -> tuple[str, ctypes.CDLL]:
    path = find_cudart()
    lib = ctypes.CDLL(path)
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    return path, lib


def _check(lib: ctypes.CDLL, name: str, err: int) -> None:
    if err != 0:
        raise RuntimeError(f"{name}: error {err} ({lib.cudaGetErrorString(err).decode()})")


def _int_query(lib: ctypes.CDLL, name: str, *args: int) -> int:
    value = ctypes.c_int(0)
    _check(lib, name, getattr(lib, name)(ctypes.byref(value), *args))
    return value.value


DEV_ATTR_MAX_PERSISTING_L2 = 108  # cudaDevAttrMaxPersistingL2CacheSize
DEV_ATTR_MAX_WINDOW = 109  # cudaDevAttrMaxAccessPolicyWindowSize
LIMIT_PERSISTING_L2 = 0x06  # cudaLimitPersistingL2CacheSize
STREAM_ATTR_ACCESS_POLICY_WINDOW = 1  # cudaStreamAttributeAccessPolicyWindow
ACCESS_NORMAL, ACCESS_STREAMING, ACCESS_PERSISTING = 0, 1, 2  # enum cudaAccessProperty


class AccessPolicyWindow(ctypes.Structure):
    """``struct cudaAccessPolicyWindow`` (driver_types.h)."""

    _fields_ = [("base_ptr", ctypes.c_void_p), ("num_bytes", ctypes.c_size_t),
                ("hitRatio", ctypes.c_float), ("hitProp", ctypes.c_int), ("missProp", ctypes.c_int)]


class StreamAttrValue(ctypes.Union):
    """``union cudaLaunchAttributeValue`` (64 bytes), of which only the window is used here."""

    _fields_ = [("accessPolicyWindow", AccessPolicyWindow), ("pad", ctypes.c_char * 64)]


def pin_in_l2(buffer: torch.Tensor, streams: list[torch.cuda.Stream]) -> int:
    """Mark ``buffer`` persisting in L2 for kernels on ``streams`` and grow the device's
    persisting set-aside to cover it (never shrinking one set by someone else). Returns the
    bytes set aside; 0 where the GPU has no persisting L2 (the buffer then stays a normal one).

    Copy engines do not take the window, but their reads and writes hit the lines the kernels
    left resident: a staging chunk written by the gather is read by the DMA from L2, and
    rewritten there by the next gather, without a round trip through HBM."""
    _, lib = _libcudart()
    device = buffer.device.index if buffer.device.index is not None else torch.cuda.current_device()
    max_set_aside = _int_query(lib, "cudaDeviceGetAttribute", DEV_ATTR_MAX_PERSISTING_L2, device)
    max_window = _int_query(lib, "cudaDeviceGetAttribute", DEV_ATTR_MAX_WINDOW, device)
    num_bytes = buffer.numel() * buffer.element_size()
    if max_set_aside <= 0 or max_window <= 0:
        return 0
    window = min(num_bytes, max_window)
    current = ctypes.c_size_t(0)
    lib.cudaDeviceGetLimit.argtypes = [ctypes.c_void_p, ctypes.c_int]
    _check(lib, "cudaDeviceGetLimit", lib.cudaDeviceGetLimit(ctypes.byref(current), LIMIT_PERSISTING_L2))
    set_aside = max(current.value, min(window, max_set_aside))
    lib.cudaDeviceSetLimit.argtypes = [ctypes.c_int, ctypes.c_size_t]
    with torch.cuda.device(device):
        _check(lib, "cudaDeviceSetLimit", lib.cudaDeviceSetLimit(LIMIT_PERSISTING_L2, set_aside))
    value = StreamAttrValue()
    value.accessPolicyWindow = AccessPolicyWindow(buffer.data_ptr(), window, min(1.0, set_aside / window),
                                                  ACCESS_PERSISTING, ACCESS_STREAMING)
    lib.cudaStreamSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    for stream in streams:
        _check(lib, "cudaStreamSetAttribute",
               lib.cudaStreamSetAttribute(stream.cuda_stream, STREAM_ATTR_ACCESS_POLICY_WINDOW,
                                          ctypes.byref(value)))
    return set_aside


def find_cudart() -> str:
    """The libcudart already mapped into this process by torch, else the usual install places."""
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcudart.so" in line:
                return line.split()[-1]
    roots = [Path(torch.__file__).parent / "lib", *(Path(p) / "nvidia" for p in sys.path if p)]
    patterns = [str(r / "**" / "libcudart.so*") for r in roots]
    patterns.append("/usr/local/cuda/lib64/libcudart.so*")
    for pattern in patterns:
        hits = sorted(glob.glob(pattern, recursive=True), reverse=True)
        if hits:
            return hits[0]
    found = ctypes.util.find_library("cudart")
    if found:
        return found
    raise RuntimeError("libcudart not found (not in /proc/self/maps nor the usual places)")
