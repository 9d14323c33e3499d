"""aurora_spec/memory.py: glibc's settings that keep a training step's large buffers in the
heap, from within a process (``shift_catchup.py speed --heap-buffers``) or from the
environment of one about to start (the trainer process: tests/unit/test_flywheel_online.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from aurora_spec.memory import HEAP_BUFFERS_ENV, MMAP_THRESHOLD, TRIM_THRESHOLD


def test_the_environment_carries_both_settings() -> None:
    # the names glibc reads at start (the trailing underscore is part of them)
    assert HEAP_BUFFERS_ENV == {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
                                "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
    # glibc refuses an mmap threshold above 32 MiB on 64-bit, and keeps its defaults
    assert MMAP_THRESHOLD <= 32 << 20 < TRIM_THRESHOLD


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator settings")
def test_glibc_takes_both_settings() -> None:
    # in a subprocess: the settings last for the process, and the tests' process keeps its own
    code = "from aurora_spec.memory import keep_large_buffers_in_heap as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
