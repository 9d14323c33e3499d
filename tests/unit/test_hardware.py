"""Which CPUs get bfloat16 by default: only those that multiply it natively."""

from __future__ import annotations

import torch

from aurora_spec.flywheel.trainer import bf16_autocast_ok
from aurora_spec.hardware import cpu_flags_in_cpuinfo, cpu_native_bf16, native_bf16_in_cpuinfo
from aurora_spec.models.cpu_linear import packed_kernels_available
from aurora_spec.runtime import DraftDtype, draft_dtype

# Abridged /proc/cpuinfo texts (two CPUs each: only the first one's flags count).
ICE_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bitalg
processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
"""
SAPPHIRE_RAPIDS = "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AMX_ONLY = "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\nCPU part\t: 0xd40\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


def test_plain_avx512_is_not_native_bf16() -> None:
    # oneDNN's own check says yes on such a CPU and emulates bf16 (2.8x slower training)
    assert not native_bf16_in_cpuinfo(ICE_LAKE)
    assert not native_bf16_in_cpuinfo(GRAVITON2)
    assert not native_bf16_in_cpuinfo("")


def test_flags_are_the_first_cpus() -> None:
    assert "avx512_bf16" not in cpu_flags_in_cpuinfo(ICE_LAKE)  # only CPU 1 lists it
    assert {"avx512f", "avx512_vnni"} <= cpu_flags_in_cpuinfo(ICE_LAKE)
    assert "sve" in cpu_flags_in_cpuinfo(GRAVITON3) and not cpu_flags_in_cpuinfo("")


def test_bf16_instructions_are_native() -> None:
    assert native_bf16_in_cpuinfo(SAPPHIRE_RAPIDS)
    assert native_bf16_in_cpuinfo(AMX_ONLY)
    assert native_bf16_in_cpuinfo(GRAVITON3)


def test_defaults_follow_the_cpu() -> None:
    cpu = torch.device("cpu")
    native = cpu_native_bf16()
    assert bf16_autocast_ok(cpu) == native
    # auto: bfloat16 outright only where no packed kernels could time it against float32's;
    # with them, a float32 head and a bfloat16 copy of it timed beside its kernels
    packed = packed_kernels_available()
    auto = draft_dtype("auto", torch.float32, cpu)
    assert auto.dtype == (torch.bfloat16 if native and not packed else torch.float32)
    assert auto.time_bf16_head == (native and packed)
    # an explicit choice stands, and nothing else is timed
    assert draft_dtype("float32", torch.float32, cpu) == DraftDtype(torch.float32)
    assert draft_dtype("bfloat16", torch.float32, cpu) == DraftDtype(torch.bfloat16)
    # a bfloat16 target: auto keeps it, with no second bfloat16 head to time
    assert not draft_dtype("auto", torch.bfloat16, cpu).time_bf16_head
