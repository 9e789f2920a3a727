"""Keep memory a process freed for its next request instead of giving it back to the kernel at once.

glibc serves allocations of 128 KiB and more with fresh mmap()s (and trims freed heap tops back to the kernel),
so every large request a server handles -- a 1.4 MB inference body received, decoded and copied -- faults in its
pages anew, one kernel entry per 4 KiB page, and unmaps them again. Measured on the gRPC front end with 256-item
RMC1 queries: a fifth of the server process's CPU went to page faults, and served throughput rose 1.35x with
freed memory kept (tritonclient in the benchmark's process gains as much). The price: a process holds on to
what it freed, up to its own peak (what jemalloc and tcmalloc servers do anyway). No library sets this, and
the environment variable (GLIBC_TUNABLES) only acts at process start, so we call mallopt through ctypes.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit: larger requests still get an mmap of their own
TRIM_THRESHOLD = 1 << 30  # free memory at the heap top kept before any is returned


def retain_freed_memory() -> bool:
    """Serve allocations below 32 MiB from the heap and keep freed memory; False where the C library is not
    glibc (musl, macOS), which then behaves as before."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
