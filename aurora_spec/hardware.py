"""What this machine's CPU computes natively, for choices of dtype that depend on it.

Why not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it also says yes on CPUs with plain
AVX-512 (no AVX512-BF16, no AMX), where oneDNN emulates bfloat16 matmuls on float32 units. On such
a CPU (the 2-core VM of this project on some days) a trainer step under bf16 autocast took 2.8x
its float32 time (1232 against 438 ms of wall time, 2418 against 867 ms of CPU:
``python scripts/shift_catchup.py speed ... --trainer '{"autocast": "off"}'``), and on a bench an
idle-class trainer made less than half the steps it makes in float32 from the same idle time
(499 against 1076: docs/bench/HISTORY.md, "The slow days were emulated bfloat16").
"""

from __future__ import annotations

import functools
from pathlib import Path

# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX-BF16 (Sapphire Rapids and later);
# Arm: the BF16 extension (Neoverse V1/N2, Graviton 3 and later).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


# The instruction sets that decide which kernels and dtypes are fast here (what a bench records).
_ISA_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                        "asimd", "sve", "bf16"})


def cpu_flags_in_cpuinfo(text: str) -> frozenset[str]:
    """The flags (x86) or features (Arm) of the first CPU in a /proc/cpuinfo text."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16_in_cpuinfo(text: str) -> bool:
    """Whether a /proc/cpuinfo text lists a bf16 matmul instruction set for its first CPU."""
    return not _BF16_FLAGS.isdisjoint(cpu_flags_in_cpuinfo(text))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


@functools.cache
def cpu_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively. Where it cannot tell (no /proc/cpuinfo:
    not Linux) it says no: float32 is always correct, at worst slower."""
    return native_bf16_in_cpuinfo(_cpuinfo())


def cpu_isa() -> list[str]:
    """The kernel-relevant instruction sets of this CPU (empty where it cannot tell): benches
    record them, since the same VM has come with and without AVX512-BF16 on different days and
    which kernels win depends on it."""
    return sorted(_ISA_FLAGS & cpu_flags_in_cpuinfo(_cpuinfo()))
