"""procs.trim_heap hands freed C heap memory back to the kernel (what every worker does every
TRIM_EVERY_S): without it, memory a burst used and freed stays in the process's RSS, and the
soak's RSS slopes would measure the allocator's habits instead of leaks."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import ctypes, os
from pairlane.supervision import procs
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20
blocks = [libc.malloc(64 * 1024) for _ in range(3000)]   # ~190 MiB, each under the mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
last = blocks.pop()          # still in use at the top of the heap: free() alone cannot shrink it
for b in blocks:
    libc.free(b)
before = rss()
print(before, rss() if not procs.trim_heap() else rss())
"""


def test_trim_heap_returns_freed_memory_below_the_heap_top():
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    assert before > 150 and after < before - 120, (before, after)
