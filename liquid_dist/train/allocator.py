"""The host allocator settings a training process runs with.

glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB
on 64-bit) and keeps freed heap memory for reuse, so a rank's resident memory
grows past what the program holds: +19 % of a rank's peak on a 0.1 B model at
W = 1 (bench/memory.py). A fixed threshold of 64 KiB sends every freed
tensor's memory back to the kernel and makes the documented host-memory bound
hold for the trainer as launched (docs/parallelism.md). It is set with
``mallopt`` when the process starts training, unless ``MALLOC_MMAP_THRESHOLD_``
is set in the environment (the user's choice wins); on a C library other than
glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

MMAP_THRESHOLD = 64 << 10
"""Bytes: allocations from this size on are mapped, and unmapped when freed."""
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def fix_mmap_threshold() -> bool:
    """Set glibc's mmap threshold to :data:`MMAP_THRESHOLD` for this process (and the data
    loader workers it forks); whether it did."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
