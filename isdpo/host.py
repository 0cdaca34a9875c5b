"""The host process's memory allocator (``hardware.reuse_freed_memory``).

glibc's malloc serves blocks over a threshold (128 KB, raised as it goes, at most 32 MB) with fresh ``mmap``s
and gives freed memory at the top of the heap back to the system. A training step or an evaluation batch of a
small model allocates and frees the same MB-sized activations again and again, so every step page-faults and
zeroes them anew: on the synthetic task that is ~15% of a training step and ~25% of a scoring pass (bench/README.md).
Serving those blocks from the heap and keeping freed memory for the next step removes it; the process's
memory stays at its peak instead of shrinking between steps. Numbers are unchanged (only where memory lives).
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: blocks up to 32 MB come from the heap
KEEP = 1 << 30  # free memory at the heap's top kept (not returned to the system) up to 1 GB
TOP_PAD = 64 << 20  # the heap grows by at least 64 MB at a time


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc as above; False (and nothing done) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, KEEP), (M_TOP_PAD, TOP_PAD)))
