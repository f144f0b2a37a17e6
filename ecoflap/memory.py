"""Peak memory of one piece of work, measured the same way everywhere.

On a GPU, CUDA's counter of allocated bytes (reset at the start). On a CPU there is no
such counter, so the growth of the process's resident memory over the start of the work
is sampled in a background thread; glibc can be told to hand large freed buffers straight
back to the system, or freed tensors stay resident and every later measurement starts
from a high-water mark. Both counters are per device or process: work running beside
the measured work at the same time (another model's prune) is counted with it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import torch


def return_freed_memory_to_the_system():
    """glibc: buffers of 64 KiB or more are mapped apart and unmapped when freed; trim now."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


def resident_bytes() -> int:
    """The process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak (bytes) and m.kind."""

    def __init__(self, device: torch.device, interval: float = 0.002, collect: bool = False):
        self.cuda = device.type == "cuda"
        self.device = device
        self.interval = interval
        self.collect = collect
        self.peak = 0
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss_growth"

    def __enter__(self):
        if self.collect:
            gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = resident_bytes()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, resident_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, resident_bytes()) - self._base
        return False
