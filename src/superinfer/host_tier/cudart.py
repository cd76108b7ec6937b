"""``cudaMemcpyBatchAsync`` through ctypes, on the CUDA runtime torch itself loaded.

torch exposes no batched copy, and one ``cudaMemcpyAsync`` per 32-128 KiB piece costs more
host time than the copy takes. One batch call hands thousands of pieces to the copy engines:
no kernel, no SM time, no staging memory (the "direct" path, ``direct.py``).
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
        self.path = find_cudart()
        self.lib = ctypes.CDLL(self.path)
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        self.version = self._int_query("cudaRuntimeGetVersion")
        self.driver_version = self._int_query("cudaDriverGetVersion")
        if self.version < MIN_RUNTIME or not hasattr(self.lib, "cudaMemcpyBatchAsync"):
            raise RuntimeError("the direct KV path needs cudaMemcpyBatchAsync (CUDA runtime "
                               f">= 12.8); {self.path} is version {self.version}")
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

    def _int_query(self, name: str) -> int:
        value = ctypes.c_int(0)
        err = getattr(self.lib, name)(ctypes.byref(value))
        if err != 0:
            raise RuntimeError(f"{name}: error {err}")
        return value.value


@functools.cache
def runtime() -> CudaRuntime:
    return CudaRuntime()


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
