"""CPU memory: keep freed heap memory in the process instead of handing it back to the OS after every step.

A training step on a CPU frees and reallocates the same large buffers every time (the vocabulary head's logits and
their gradient, the activations). glibc's malloc gives freed memory at the top of its heap back to the OS, and
serves buffers above its mmap threshold with fresh mappings, so the next step page-faults every one of them in
again, one 4 KiB page at a time. On this project's CPU benchmark that was a third of a step on a small model
(`benchmarks/step_cost.py`). Raising both thresholds keeps the memory mapped: the process holds on to its peak,
as PyTorch's GPU allocator does on a GPU.

Linux with glibc only (elsewhere this does nothing); set SAFEPROBE_KEEP_FREED_MEMORY=0 to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters (malloc.h)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap, at most
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed on 64-bit: smaller buffers come from the heap and are reused


def keep_freed_memory(one_arena: bool = False) -> bool:
    """Set glibc malloc to keep freed memory. `one_arena`: threads allocate from the main heap too, so that work run
    in a thread (a benchmark's) allocates as the main thread does. Returns whether malloc is so set."""
    settings = {M_TRIM_THRESHOLD: TRIM_THRESHOLD, M_MMAP_THRESHOLD: MMAP_THRESHOLD}
    if one_arena:
        settings[M_ARENA_MAX] = 1
    return _mallopt(settings)


def _mallopt(settings: dict[int, int]) -> bool:
    if os.environ.get("SAFEPROBE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
            return False  # not glibc
        done = all(libc.mallopt(ctypes.c_int(key), ctypes.c_int(value)) == 1 for key, value in settings.items())
    except (OSError, TypeError, AttributeError):  # no C library to load by that name (Windows)
        return False
    log.debug("glibc malloc keeps freed memory: %s", done)
    return done
