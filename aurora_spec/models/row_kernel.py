"""A float32 CPU linear whose rows do not depend on each other, at least as fast as MKL for one row.

Why: lossless speculation needs a verify step's logits for a position to equal what a one-token
step computes there, bit for bit. MKL's ``F.linear``, ``torch.mm`` and unpadded oneDNN all give
a row different low bits in a 2-8-row call than alone; oneDNN-packed with padding is
row-independent but 27-29 ms per SmolLM2-135M forward against MKL's one-row 18-21 ms on a plain
AVX-512 host, which is what made speculation there lose to fast target-only decoding. This
kernel (``row_kernel.c``) reduces every output in one fixed order and reads the weights once per
call of up to 12 rows. Measured for all linears of one SmolLM2-135M forward, 2 threads, float32,
on the 2-core AMD EPYC host with AVX512-BF16, beside the former kernel (16-lane partial sums,
6 x 4 tiles, commit c6bf543) (``git show c6bf543:aurora_spec/models/row_kernel.c > /tmp/old.c;
python scripts/linear_kernels.py --threads 2 --repeats 15 --rows 1,2,3,4,5,6,8,10,12,16
--baseline-source /tmp/old.c``):

    rows                        1      2      3      4      5      6      8     10     12     16
    F.linear (MKL)             56    101    128     74     76    105     85    104     85    106  ms
    oneDNN, packed             31     28     29     23     23     21     27     27     29     41  ms
    row kernel                 16     14     15     14     19     18     21     23     23     38  ms
    former row kernel          19     18     24     25     28     29     36     38     38     53  ms

A second run (this host is noisy): row kernel 25/20/30 ms at 1/5/12 rows, former 22/21/46. On 1
thread: 23/27/38 ms at 1/5/12 rows (former 25/36/64, oneDNN 35/31/48; ``--threads 1 --repeats 9
--rows 1,5,12``). Prefill-sized calls: 64 and 256 rows 116 and 446 ms (former 177 and 668,
oneDNN 115 and 404; ``--rows 64,256 --repeats 5``), a cost paid once per prompt.

With AVX2 and FMA but no AVX-512 the same source builds 16-output blocks and 6-row tiles. On a
2-core AVX2-only AMD EPYC (``python scripts/linear_kernels.py --threads 2 --repeats 7 --rows
1,2,4,5,6,8,12``):

    rows                        1      2      4      5      6      8     12
    F.linear (MKL)             57     89    173    172    203    232    209  ms
    oneDNN, packed             69     66     62     64     69     92     90  ms
    row kernel                 38     34     38     33     35     54     58  ms

(a second run, beside 8-output blocks and 12-row tiles: 32/36/36/32/32/48/55 against
31/35/34/32/36/44/62; MKL 54 for 1 row, oneDNN 56-60 for 1-6.) There 1-6 rows are one pass over the
weights (~15 GB/s; docs/results/kernels.md, "Kernels depend on the CPU"), and 8-12 rows are bound by
the multiply-adds. On a
CPU with neither, the callers keep oneDNN.

Draft heads can keep their copies in bfloat16 (``RowLinear(bf16_weights=True)``): the same
chains over weights rounded to bfloat16 and widened in registers, half the bytes a call reads; a
draft token on the AVX2-only EPYC 2.87 against 4.71 ms on one thread (``python
scripts/draft_cost.py``). Only where an output cannot depend on it: never a target.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$AURORA_KERNEL_CACHE`` (default ``~/.cache/aurora-spec/kernels``), keyed by source, compiler
and CPU flags; the build is written then renamed, so concurrent processes never load a
half-written library. Without a compiler (or for other dtypes) the callers keep oneDNN's packed
kernel, logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from aurora_spec.atomic_files import atomic_write

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_kernel.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")


def default_cache_dir() -> Path:
    """Where builds live: ``$AURORA_KERNEL_CACHE`` or ``~/.cache/aurora-spec/kernels``."""
    env = os.environ.get("AURORA_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aurora-spec" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(cache_dir: Path, compiler: str, defines: tuple[str, ...] = (),
           source: Path = SOURCE) -> Path:
    """Compile ``source`` unless a build for it, this compiler, defines and CPU exists."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    flags = (*FLAGS, *(f"-D{d}" for d in defines))
    key = hashlib.sha256("\0".join((source.read_text(), version, " ".join(flags),
                                    _cpu_flags())).encode()).hexdigest()[:16]
    target = cache_dir / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # atomic: another process loading the library sees all of it or none
    atomic_write(target, lambda scratch: subprocess.run(
        [compiler, *flags, str(source), "-o", scratch], capture_output=True, text=True,
        check=True, timeout=120))
    return target


def compile_and_load(source: Path, what: str, fallback: str, cache_dir: Path | None = None,
                     compiler: str | None = None,
                     defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``source`` built (or found built) and loaded, or None with one log line that says why and
    what runs instead (``what: ...; fallback``). Shared by the row kernel and row_ops.c."""
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    root = cache_dir or default_cache_dir()
    if not compiler:
        log.info("%s: no C compiler found; %s", what, fallback)
        return None
    try:
        return ctypes.CDLL(str(_build(root, compiler, defines, source)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        log.warning("%s: build or load failed (%s); %s", what,
                    detail.strip().splitlines()[-1] if detail.strip() else type(e).__name__,
                    fallback)
        return None


@functools.cache
def library(cache_dir: Path | None = None, compiler: str | None = None,
            defines: tuple[str, ...] = (), source: Path = SOURCE) -> ctypes.CDLL | None:
    """The compiled kernel, or None (logged once) where it cannot be built or loaded.
    ``defines`` (``("RB=6",)``: a narrower register tile, which gives the same bits) and
    ``source`` (another version of row_kernel.c) are for comparisons and tests only."""
    lib = compile_and_load(source, "row kernel", "CPU linears use oneDNN's packed kernel",
                           cache_dir, compiler, defines)
    if lib is None:
        return None
    if not lib.aurora_native_width():
        log.info("row kernel: this CPU has neither AVX-512 nor AVX2 with FMA; CPU linears use "
                 "oneDNN's packed kernel")
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.aurora_packed_floats.argtypes, lib.aurora_packed_floats.restype = [i64, i64], i64
    lib.aurora_pack.argtypes, lib.aurora_pack.restype = [ptr, i64, i64, ptr], None
    lib.aurora_pack_bf16.argtypes, lib.aurora_pack_bf16.restype = [ptr, i64, i64, ptr], None
    for fn in (lib.aurora_linear, lib.aurora_linear_bf16):
        fn.argtypes, fn.restype = [ptr, i64, i64, ptr, i64, ptr, ptr, ctypes.c_int], None
    return lib


def supports(weight: torch.Tensor) -> bool:
    """Whether ``weight`` can run through the row kernel here (2-D float32 on CPU, kernel
    built)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and library() is not None)


class RowLinear:
    """One weight (and bias) packed for the row kernel. The packing is a copy: the source weight
    must not change afterwards (target weights are frozen).

    ``bf16_weights``: store the copy in bfloat16 (rounded to nearest) and multiply in float32.
    A call then reads half the bytes, which is most of its time for the few rows of a draft
    step; its results are those of the rounded weights, so it is for draft heads only (their
    precision changes what they propose, never an output), never for a target."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 lib: ctypes.CDLL | None = None, bf16_weights: bool = False) -> None:
        if not supports(weight):
            raise ValueError(f"row kernel cannot run a {tuple(weight.shape)} {weight.dtype} "
                             f"weight on {weight.device}")
        lib = lib or library()
        assert lib is not None
        self._lib = lib
        self.bf16_weights = bf16_weights
        self.out_features, self.in_features = weight.shape
        size = lib.aurora_packed_floats(*weight.shape)
        if bf16_weights:
            w = weight.detach().to(torch.bfloat16).contiguous()
            self.packed = torch.empty(size, dtype=torch.bfloat16)
            lib.aurora_pack_bf16(w.data_ptr(), *w.shape, self.packed.data_ptr())
            self._linear = lib.aurora_linear_bf16
        else:
            w = weight.detach().contiguous()
            self.packed = torch.empty(size, dtype=torch.float32)
            lib.aurora_pack(w.data_ptr(), *w.shape, self.packed.data_ptr())
            self._linear = lib.aurora_linear
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            raise ValueError(f"row kernel takes float32 (..., {self.in_features}), got "
                             f"{x.dtype} {tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32)
        bias = None if self.bias is None else self.bias.data_ptr()
        self._linear(flat.data_ptr(), flat.shape[0], self.in_features, self.packed.data_ptr(),
                     self.out_features, bias, out.data_ptr(), torch.get_num_threads())
        return out.reshape(*x.shape[:-1], self.out_features)


def main() -> None:
    """``python -m aurora_spec.models.row_kernel``: build the kernel and row_ops.c now
    (scripts/setup.sh does, so the first server start does not compile) and say where they are
    or why not."""
    from aurora_spec.models import row_ops  # imports this module: not at the top

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lib = library()
    print(f"row kernel: {lib._name}" if lib is not None
          else "row kernel: not available here (CPU linears use oneDNN's packed kernel)")
    ops = row_ops.library()
    print(f"row ops: {ops._name}" if ops is not None
          else "row ops: not available here (norms, rotary embeddings, attention and the MLP's "
          "activation use PyTorch)")


if __name__ == "__main__":
    main()
