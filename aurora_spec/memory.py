"""How glibc hands out the large, short-lived buffers of a CPU training step.

A training step allocates and frees the same large buffers every step: the lm_head's dense
gradient (8192 x 576 float32, 19 MB, written by the backward of the row gather), weight
gradients, activations of the unrolled depths. By default glibc serves a request above its mmap
threshold (128 KiB, raised on the fly up to the largest freed mmap) with a fresh ``mmap`` and
unmaps it when freed, and gives the top of its heap back to the kernel past the trim threshold;
either way the next step's buffer is new memory, zero-filled by the kernel one page fault per
4 KiB. Two settings keep those buffers in the heap, where freed memory is reused as it is: an
mmap threshold at glibc's maximum (32 MiB on 64-bit) and a trim threshold above a step's peak.
The first alone is not enough in general: fixing the mmap threshold also pins the trim
threshold at its 128 KiB default, so a buffer freed at the top of the heap is given back and
faulted in again (a probe that frees one 19 MB tensor a step faulted more with it than without).

Measured with ``python scripts/shift_catchup.py --threads T speed runs/catchup-cs/traces.pt
--init runs/head-chat --steps 20 [--heap-buffers]`` (docs/results/trainer.md, "A trainer step's page
faults"): on an AVX512-BF16 host the mmap threshold alone took a step from ~4,050 faults and ~43 ms
of system time to 644 and ~9 ms, 1.13x faster on 1 thread and 1.14x on 2; on an AVX2-only host,
where glibc's defaults fault less (1,000-3,800 a step), both settings took it to none. The
price: the process keeps what it freed (peak RSS +350 MB in that script's process; the trainer
process of a day-0 bench beside glibc's defaults peaked lower with it, 2.3 GB against 2.7).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (4 MiB * sizeof(long))
TRIM_THRESHOLD = 256 << 20  # freed heap top kept before glibc gives it back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc's malloc.h)

# The same two settings for a process about to start: glibc reads them from the environment
# when its allocator initialises (other C libraries ignore them).
HEAP_BUFFERS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def started_with_heap_buffers() -> bool:
    """Whether this process started with HEAP_BUFFERS_ENV (LearnerConfig.trainer_heap_buffers
    in the trainer process): glibc read it as its allocator initialised."""
    return all(os.environ.get(k) == v for k, v in HEAP_BUFFERS_ENV.items())


def keep_large_buffers_in_heap() -> bool:
    """HEAP_BUFFERS_ENV's settings in this process, from now on. True when glibc took both;
    False elsewhere (musl, macOS, Windows: their allocators are left as they are)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)


def peak_rss_mb() -> int | None:
    """This process's peak resident memory in MiB (None where the OS does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak >> (20 if sys.platform == "darwin" else 10)
