"""Peak memory of this process, in MiB: on the CPU the high-water mark of its resident set (the
kernel's VmHWM), with CUDA the peak torch's allocator held (`torch.cuda.max_memory_allocated`).

`process_peak` reads both since the process started (what one run of an ablation cost, in its own
worker process); `PeakMemory` reads them over a window above a starting point (what one mode of
`kdkit bench` costs, several modes in one process).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
from pathlib import Path

import torch

MIB = 2**20


def rss_mib(field: str = "VmRSS") -> float | None:
    """A memory field of /proc/self/status in MiB (`VmRSS` now, `VmHWM` its high-water mark); None
    where there is no /proc (not Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def rss_high_water_mib() -> float:
    """This process's resident-set high-water mark in MiB.

    VmHWM rather than `ru_maxrss`: a spawned process's `ru_maxrss` starts at its parent's peak (the
    kernel carries the peak of the memory image `exec` replaces), so every worker would report at
    least its coordinator's memory. Without /proc (macOS) `ru_maxrss` is all there is."""
    high_water = rss_mib("VmHWM")
    if high_water is not None:
        return high_water
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return rss / (MIB if sys.platform == "darwin" else 1024)


def cuda_peak_mib(device: torch.device | None = None) -> float:
    """The peak memory torch's CUDA allocator held on `device` (default: the current one), in MiB."""
    return torch.cuda.max_memory_allocated(device) / MIB


def process_peak() -> dict[str, float]:
    """This process's peak memory since it started: `peak_rss_MiB` and, when it used CUDA,
    `peak_cuda_MiB` (the keys of an ablation run's run.json)."""
    peak = {"peak_rss_MiB": rss_high_water_mib()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_MiB"] = cuda_peak_mib()
    return peak


class PeakMemory:
    """Peak memory (MiB) above a baseline taken at creation, over a window opened by `start()`:
    CUDA's allocator peak on a CUDA device, the resident set's high-water mark on the CPU.

    Freed memory is first handed back to the system (`malloc_trim`) and the kernel's high-water mark
    is reset at `start()`, so that what ran before the window does not count.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._settle()
        cuda = device.type == "cuda"
        self.base = torch.cuda.memory_allocated(device) / MIB if cuda else rss_mib("VmRSS")
        self.resettable = False

    def _settle(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            _malloc_trim()

    def start(self) -> None:
        """Begin the measured window."""
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resettable = True
        else:
            self.resettable = _reset_rss_high_water()

    def peak(self) -> float | None:
        """MiB above the baseline at the window's peak (None where the CPU's mark cannot be reset)."""
        if not self.resettable or self.base is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return cuda_peak_mib(self.device) - self.base
        return rss_high_water_mib() - self.base


def _malloc_trim() -> None:
    """Hand the C allocator's free memory back to the system (glibc), so the resident set drops."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_rss_high_water() -> bool:
    """Reset this process's resident-set high-water mark (VmHWM) to its current size (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
