"""The ``cpu`` backend: an AVX-512 C++ kernel (``sparse24.cpp``) that reads the packed 2:4 weight directly.

Layout kept per layer: the on-disk ``values [N, K/2]`` and ``meta [N, K/8]`` (2-bit positions), re-ordered at
load in place (same tensors, shapes and bytes). bf16 on CPUs with AVX512_BF16: "row lanes", blocks of 16 rows
whose values are transposed so that one 64-byte vector holds a group's kept pair of each of the 16 rows; the
kernel picks x's kept columns per lane with ``vpshufb``, at every token count. Other dtypes: rows interleaved in
blocks of 4, word by word (64 columns: 32 values, 8 metadata bytes), so that the GEMV, which works on 4 rows at
once, streams one contiguous run of values and one of metadata, and gathers x to the kept values
(``vpmultishiftqb`` + ``vpermt2w``) rather than expanding the weights; the C++ file says why. On CPUs with
AMX-BF16 bf16 prefill goes to oneDNN instead (``PREFILL_PATHS``).

Building: the source is compiled with ``torch.utils.cpp_extension`` at first use into a per-user cache
(``$BAWA_CACHE_DIR``, default ``~/.cache/bawa-vllm``), keyed by the source, torch version and flags, so a
second start (or the next TP rank) only loads it. A file lock serialises concurrent builds (TP ranks start
together); the lock is released by the OS if a builder dies. The build is logged once, with its time.
Where the kernel cannot be used (not x86 with AVX-512, no compiler, a failed build), :func:`supported`
says why and the layer falls back to the dense path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from ...sparse.format import META_SUFFIX, PackedFormatError

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("sparse24.cpp")
# -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP, so without
# it every kernel ran on one thread whatever torch.get_num_threads() said. Compile only: the OpenMP symbols then
# resolve at load to the libgomp that torch already loaded, so the kernel shares torch's (and vLLM's bound)
# thread pool instead of starting a second runtime.
_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vbmi", "-mavx512vbmi2", "-mfma", "-mf16c"]
# What the CPU must have (as /proc/cpuinfo names it): vpmultishiftqb is AVX512_VBMI, vpexpandw AVX512_VBMI2
# (both in Ice Lake, Sapphire Rapids, Zen 4 and later).
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi", "avx512_vbmi2", "fma", "f16c")
# Other dtypes (and bf16 without AVX512_BF16): token counts up to this run the packed GEMV; above it, panels
# are decompressed for `at::mm`.
SMALL_M_MAX = 64
# Bytes of the dense panel each thread decompresses before its `at::mm` (the panels): 4 MiB measured best
# among 0.5, 1, 4 and 16 MiB at M = 128 (fewer, larger GEMM calls outweigh the panel leaving L2).
PANEL_BYTES = 4 << 20
# What runs bf16 prefill from ONEDNN_MIN_M tokens: "lanes" (the row lanes, as below it) or "onednn" (the
# panels, whose `at::mm` is oneDNN's). On CPUs with AMX-BF16 (Xeon Sapphire Rapids and later) oneDNN runs bf16
# GEMMs on AMX tiles, and so does vLLM's dense GEMM, with several times the multiply throughput of the
# `vdpbf16ps` the lanes are built on; there the panels hand the compute to AMX too. Not measured: no machine of
# this project's has AMX (every figure here is from AMD Zen 5); ONEDNN_MIN_M is a placeholder for the crossover
# there (28 tokens is where the lanes' predecessor, dense tiles, took over from the GEMV on Zen 5).
# `BAWA_CPU_PREFILL=lanes|onednn` overrides the choice (A/B).
PREFILL_PATHS = ("lanes", "onednn")
ONEDNN_MIN_M = 28

_module: ModuleType | None = None
_error: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("BAWA_CACHE_DIR") or Path.home() / ".cache" / "bawa-vllm")


def _build_key() -> str:
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join([torch.__version__, sys.version, *_FLAGS]).encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> list[str]:
    """The CPU's features as /proc/cpuinfo names them; raises OSError where it cannot be read."""
    return next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")), [])


def _cpu_reason() -> str | None:
    """Why this CPU cannot run the kernel, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()} is not x86-64"
    try:
        flags = _cpu_flags()
    except OSError as err:
        return f"cannot read the CPU's features ({err})"
    missing = [f for f in _CPU_FLAGS if f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


_NO_BF16 = "the CPU lacks AVX512_BF16, which the lanes need"


def prefill_path() -> tuple[str, str]:
    """(path, why) for bf16 from ONEDNN_MIN_M tokens (from SMALL_M_MAX + 1 on CPUs without AVX512_BF16); see
    PREFILL_PATHS."""
    name = os.environ.get("BAWA_CPU_PREFILL", "").strip().lower()
    if name and name not in PREFILL_PATHS:
        raise ValueError(f"BAWA_CPU_PREFILL={name!r}: choose one of {', '.join(PREFILL_PATHS)}")
    try:
        flags = _cpu_flags()
    except OSError:
        flags = []
    # The kernel checks this itself too: no lanes without vdpbf16ps, whatever BAWA_CPU_PREFILL asks (the log
    # line then says what runs).
    if "avx512_bf16" not in flags:
        return "onednn", _NO_BF16
    if name:
        return name, "BAWA_CPU_PREFILL"
    return ("onednn", "the CPU has AMX-BF16, which oneDNN uses") if "amx_bf16" in flags else ("lanes", "no AMX-BF16")


def prefill_summary(path: str, why: str) -> str:
    """What runs bf16 from a few tokens up, from which token count, and why (the load log line; gemm.py's
    report)."""
    panels = "oneDNN on decompressed panels"
    if why == _NO_BF16:
        return f"bf16 from {SMALL_M_MAX + 1} tokens runs on {panels} ({why})"
    lanes = "bf16 runs on our AVX-512 row lanes"
    return f"{lanes}, from {ONEDNN_MIN_M} tokens on {panels} ({why})" if path == "onednn" else f"{lanes} ({why})"


def load() -> ModuleType:
    """The compiled extension, built at first use; raises RuntimeError naming why it cannot be had (and
    ValueError for a bad ``BAWA_CPU_PREFILL``: the user's setting, not a reason to fall back to dense)."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(_error)
    prefill_path()
    try:
        _module = _build()
        from .. import python_body

        _module.set_python_body(python_body)
        apply_dispatch()
    except Exception as err:
        text = str(err).strip()
        first = next((line for line in text.splitlines() if "error" in line.lower()), text[-300:])
        _error = f"the AVX-512 kernel could not be built ({type(err).__name__}: {first.strip()[:300]})"
        raise RuntimeError(_error) from err
    return _module


def _build() -> ModuleType:
    why = _cpu_reason()
    if why:
        raise RuntimeError(why)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not on PATH; install g++)")
    from torch.utils import cpp_extension

    # ninja comes with the package (a dependency); make its venv's bin/ visible to torch's builder.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    name = f"bawa_sparse24_{_build_key()}"
    build_dir = cache_dir() / "torch_extensions" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".bawa.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then load its result
        fresh = not any(build_dir.glob(f"{name}*.so"))
        start = time.perf_counter()
        module = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                                    build_directory=str(build_dir), verbose=False)
    if fresh:
        logger.info("bawa-sparse: built the AVX-512 2:4 kernel in %.1f s (%s)", time.perf_counter() - start, build_dir)
    return module


def supported(device: torch.device, dtype: torch.dtype, n: int, k: int) -> tuple[bool, str]:
    del n
    if device.type != "cpu":
        return False, f"runs on cpu, not {device.type}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False, f"{dtype} is not fp32/bf16/fp16"
    if k % 8:
        return False, f"input size {k} does not divide by 8"
    try:
        load()
    except RuntimeError as err:
        return False, str(err)
    return True, ""


def prepare(values: torch.Tensor, meta: torch.Tensor, n: int):
    """Re-tile ``values`` and ``meta`` in place; the layer keeps those two tensors only."""
    from .. import CPU, PackedLinear

    values, meta = values.contiguous(), meta.contiguous()
    bad = load().retile_(values, meta)
    if bad:
        raise PackedFormatError(f"{META_SUFFIX} row {bad[0]}, group {bad[1]} has an invalid position nibble")
    return PackedLinear(CPU, n, values, meta)


def apply_dispatch() -> None:
    """Hand this module's crossovers to the kernel, whose C++ implementation of the op reads them (done at
    load; again after changing them, e.g. to force a path in a test)."""
    path, why = prefill_path()
    # Without AVX512_BF16 the kernel runs neither lanes nor the bf16 GEMV: SMALL_M_MAX applies, as to other dtypes.
    load().set_dispatch(SMALL_M_MAX, PANEL_BYTES, ONEDNN_MIN_M if path == "onednn" else sys.maxsize)
    global _logged_prefill
    if _logged_prefill != (path, why):
        _logged_prefill = (path, why)
        logger.info("bawa-sparse: %s", prefill_summary(path, why))


_logged_prefill: tuple[str, str] | None = None
