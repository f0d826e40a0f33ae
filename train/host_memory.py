"""The process's host memory: keep freed tensor memory inside it (glibc), and read its RSS and peak.

PyTorch's CPU tensors come straight from malloc. glibc serves a block above its mmap threshold with a
fresh mmap and unmaps it at free; the threshold starts at 128 KiB and rises only to the largest
block freed so far. It also returns the free top of the heap to the kernel once that exceeds twice
the threshold. A training step frees most of its activations, so the next step page-faults them in
again, zero-filled by the kernel. Fixing both thresholds keeps freed blocks for reuse. On 2 AVX2
cores this cut the demo's system time from 27.6 to 3.7 s and its wall time by ~10% (its 96-px step
from 177 to 151 ms), with bit-identical weights (docs/performance.md "Host memory").
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

# mallopt parameters from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit). Larger blocks still get
# their own mapping; those are rare on CPU and cost little next to the work done on them.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: "never trim"; the heap stays at its peak


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc, else None (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def retain_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (and forked children); False without glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    return bool(mmap_set and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def rss_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status in KiB: VmRSS now, VmHWM its peak (Linux)."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def take_peak_rss() -> float:
    """This process's peak RSS in bytes since the previous call; the whole life of the process on the
    first call, and on every call where the kernel cannot reset the peak (not Linux, or a
    /proc/self/clear_refs this process may not write)."""
    if sys.platform.startswith("linux"):
        peak = rss_kib("VmHWM") * 1024.0
        try:
            Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")  # the peak restarts from now
        except OSError:
            pass
        return peak
    import resource  # not on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on the BSDs
