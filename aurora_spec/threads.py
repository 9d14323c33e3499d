"""Which threads run torch CPU kernels, on how many cores; OS thread names.

Torch CPU kernels on one core in helper threads (the flywheel's bridge to its trainer, the
server's HTTP thread); all of the server's real torch work on its engine thread
(aurora_spec/engine/loop.py).

Why: torch runs a CPU kernel on an OpenMP team of the calling thread. A helper thread that runs
one parallel kernel (a ``torch.cat`` of trace rows, the weight reorder of a new head) gets a team
of its own, whose worker threads live as long as the helper. libgomp then manages more threads
than the machine has cores and makes every team, serving's included, sleep at its barriers
instead of spinning ("throttled" spin). Measured on the 2-core VM (docs/results/kernels.md, "A
measurement fault"): target-only decoding beside an online learner ran at 32.5 tokens/s against 49.4
without one (43.6 after this fix), and in ``aurora bench`` the online arm, whose idle-class
trainer kept the cores busy so that serving's wake-ups were quick, looked 5-13% cheaper per
verify step than the arms beside it.

``torch.set_num_threads`` cannot fix this from a helper thread: it also sets torch's
process-wide default, which every thread takes the first time it runs a kernel, so a serving
thread starting later would run on one core. The OpenMP runtime's own ``omp_set_num_threads``
changes the calling thread alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded (its own copy first), or None
    where there is none to find (no /proc, no OpenMP build)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    runtimes = sorted((p for p in paths if os.path.basename(p).startswith(_OPENMP_RUNTIMES)),
                      key=lambda p: not p.startswith(torch_dir))
    for path in runtimes:
        try:
            return ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
    return None


def single_thread_kernels() -> bool:
    """Run the calling thread's torch CPU kernels on that thread alone, leaving every other
    thread's setting and torch's default as they are. True when it took effect."""
    torch.get_num_threads()  # torch's per-thread set-up first: it would undo the call below
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)
    done = torch.get_num_threads() == 1
    if not done:
        log.debug("cannot limit this helper thread's torch kernels to one thread")
    return done


_PR_SET_NAME = 15  # prctl(2)


def name_os_thread(name: str) -> None:
    """Name the calling OS thread (Linux keeps 15 bytes), as ``top -H``, py-spy and /proc show
    it; threads it starts later, its OpenMP workers among them, inherit the name. A no-op
    where prctl is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
