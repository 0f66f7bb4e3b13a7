"""How the benchmark's processes (the command, and each Ray worker) set up glibc's allocator."""

from __future__ import annotations

import os

#: set to 1 to leave glibc's allocator at its defaults (``scripts/perf_benchmark.py`` measures both)
GLIBC_DEFAULTS_ENV = "BENCHMARK_GLIBC_MALLOC_DEFAULTS"


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for reuse rather than hand it back to the kernel; whether it did.

    An attack step frees and allocates the same large activations every step. With glibc's defaults, blocks over
    its mmap threshold (at most 32 MiB) are unmapped when freed and come back as fresh pages the kernel must
    zero: about 4% of a step's CPU time on the default model. Serving them from the heap, never trimmed, removes
    that; results do not change (the same arithmetic on the same values). A no-op without glibc, or with
    ``BENCHMARK_GLIBC_MALLOC_DEFAULTS=1``.
    """
    import ctypes

    if os.environ.get(GLIBC_DEFAULTS_ENV) == "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    most = 2**31 - 1  # mallopt takes an int
    return all([mallopt(m_mmap_threshold, most), mallopt(m_trim_threshold, most), mallopt(m_top_pad, 1 << 28)])
