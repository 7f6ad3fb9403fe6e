"""CPU speed: keep freed activation memory in the process instead of returning it to the OS.

torch's CPU allocator is glibc malloc. A 2,048-token SmolLM2 prefill step allocates and frees
~2 GB of activations (gate_up alone is 25 MB per layer); glibc serves chunks above its mmap
threshold with fresh mmaps and trims the heap top as soon as it is free, so every step faulted
~290,000 new pages in and zeroed them: 0.5 s of kernel time of a 3.1 s step (one thread, dev box,
docs/benchmarks.md). With a fixed 32 MiB mmap threshold (glibc's maximum) and a 1 GiB trim
threshold the heap keeps the step's working set and the next step reuses it: no faults after the
first step. vLLM's CPU build gets the same effect by preloading tcmalloc.

Process-wide (like torch.set_num_threads): call once at engine start. Cost: the process's RSS
stays at its peak activation footprint instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing done) when libc is not glibc.
    Raises OSError when glibc refuses a setting."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")
    return True
