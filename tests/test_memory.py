"""Freed CPU memory stays in the process (glibc): what `keep_freed_memory` sets, and that it can be turned off.

Only malloc's own state is asserted here, which these settings decide. How many page faults a step takes with
glibc's defaults depends on what the process freed before (malloc's mmap threshold adapts), so its effect on step
time is measured in `benchmarks/step_cost.py`, not asserted.
"""
import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

FREED = '''
import ctypes, sys
from safeprobe.memory import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory()
size = 16 << 20  # below the kept mmap threshold (32 MiB), far above glibc's starting one (128 KiB)
buffer = libc.malloc(size)
mapped = libc.mallinfo2().hblkhd >= size  # served by its own mapping instead of the heap
libc.free(buffer)
print(kept, mapped, libc.mallinfo2().fordblks >= size)  # freed: still in the heap, not handed back
'''


def malloc_state() -> tuple[bool, bool, bool]:
    """(whether malloc was set, whether a 16 MiB buffer got its own mapping, whether it stayed in the heap once freed)
    in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "SAFEPROBE_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", FREED], env=env, capture_output=True, text=True, check=True)
    kept, mapped, stayed = out.stdout.split()
    return kept == "True", mapped == "True", stayed == "True"


@pytest.mark.skipif(not GLIBC, reason="the settings exist in glibc's malloc only")
def test_kept_memory_serves_large_buffers_from_the_heap_and_keeps_them_when_freed():
    kept, mapped, stayed = malloc_state()
    assert kept and not mapped and stayed


class FakeLibc:
    """A C library that records the mallopt calls it gets; `glibc`: whether it has glibc's functions."""

    def __init__(self, glibc: bool):
        self.calls = []
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.36"
            self.mallopt = lambda key, value: self.calls.append((key.value, value.value)) or 1


@pytest.mark.parametrize("glibc", [True, False])
def test_it_sets_both_thresholds_on_glibc_only_and_can_be_turned_off(monkeypatch, glibc):
    from safeprobe import memory
    libc = FakeLibc(glibc)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setenv("SAFEPROBE_KEEP_FREED_MEMORY", "0")
    assert memory.keep_freed_memory() is False and libc.calls == []  # turned off: malloc is left alone
    monkeypatch.delenv("SAFEPROBE_KEEP_FREED_MEMORY")
    assert memory.keep_freed_memory() is glibc
    expected = {(memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD), (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD)}
    assert set(libc.calls) == (expected if glibc else set())
