"""What the ``tools/bench*.py`` scripts share: the machine's name, a timer, and the peak memory of one call.

Peak memory on the CPU is the process's resident size sampled every millisecond during the call, minus its
size before the call. glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, which
would hide later calls' peaks, so ``PeakMemory`` first fixes the threshold at 64 KiB (every tensor of that
size or more is mapped and returned on free) and trims the heap before each call. On CUDA it is
``torch.cuda.max_memory_allocated`` over the call.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def timed(fn, device: str = "cpu"):
    """(seconds, result) of ``fn()``; on CUDA the device is synchronised before the clock stops."""
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak``: the bytes the block added at its peak."""

    def __init__(self, device: str = "cpu", interval: float = 1e-3):
        self.device, self.interval, self.peak = device, interval, 0
        self._libc = None
        if not device.startswith("cuda") and Path("/proc/self/statm").exists():
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:  # not glibc: sampling still works, with the allocator's caching
                self._libc = None

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        if self._libc is not None:
            self._libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
            self._libc.malloc_trim(0)
        self._base = self._max = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss()) - self._base
