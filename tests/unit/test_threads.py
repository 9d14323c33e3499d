"""A helper thread's torch kernels run on that thread alone (aurora_spec/threads.py): no OpenMP
team of its own, while serving's thread and torch's default for new threads keep theirs."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from aurora_spec.threads import single_thread_kernels

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts OS threads")


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _in_thread(fn):
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(fn()))
    t.start()
    t.join()
    return out


def test_a_helper_threads_kernels_start_no_team_and_leave_other_threads_alone(two_threads):
    big = torch.randn(1 << 21)  # far above torch's grain size: a parallel kernel on 2 threads

    def helper():
        done = single_thread_kernels()
        before = _os_threads()
        torch.cat([big, big]).sum()
        return {"done": done, "new_os_threads": _os_threads() - before,
                "torch_threads": torch.get_num_threads()}

    assert _in_thread(helper) == {"done": True, "new_os_threads": 0, "torch_threads": 1}
    assert torch.get_num_threads() == 2  # the calling (serving) thread keeps its setting
    # ... and so does a thread started later (torch.set_num_threads(1) would have changed it).
    assert _in_thread(lambda: {"n": torch.get_num_threads()}) == {"n": 2}
