"""The instruction-set extensions of this CPU, from ``/proc/cpuinfo``: what compiled code may rely on.

AOTInductor compiles CPU code with ``-march=native`` (``torch/_inductor/cpp_builder.py``): the ``.pt2`` may use every
extension of the export machine's CPU, and on a CPU without one of them it dies with SIGILL, not an exception. So the
export records :func:`isa_flags` beside the package, and the worker refuses it (:func:`missing`) where one is absent.
BF16 (``python -m export --quantize bf16``) needs :data:`BF16_FLAGS`.

Off Linux (no ``/proc/cpuinfo``) the flags are unknown: :func:`cpu_flags` returns None and nothing is refused on them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The /proc/cpuinfo flags that name instructions a compiler may emit for -march=native (x86-64). Flags about the
# machine (virtualisation, power, bugs) are left out: they differ between hosts of one CPU model.
_ISA_PREFIXES = ("sse", "ssse3", "avx", "amx", "fma", "f16c", "bmi", "adx", "movbe", "popcnt", "lzcnt", "abm", "sha_ni",
                 "vaes", "vpclmulqdq", "gfni", "pclmulqdq", "aes", "rdrand", "rdseed", "clflushopt", "clwb", "xsave",
                 "movdir", "serialize", "waitpkg", "cx16", "prefetchw")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either gives BF16 arithmetic (OpenVINO's bf16 kernels)


@lru_cache(maxsize=4)
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The ``flags`` of the first processor in ``cpuinfo``; None when the file is not there or has none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def isa_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The instruction-set flags among ``flags`` (default: this CPU's), sorted; [] when unknown."""
    flags = cpu_flags() if flags is None else flags
    return sorted(f for f in flags or () if f.startswith(_ISA_PREFIXES))


def missing(required: list[str] | None, flags: frozenset[str] | None = None) -> list[str]:
    """The flags of ``required`` that this CPU (or ``flags``) lacks; [] when either side is unknown."""
    flags = cpu_flags() if flags is None else flags
    if not required or flags is None:
        return []
    return sorted(set(required) - flags)


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has BF16 arithmetic (AVX-512 BF16 or AMX BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags and any(f in flags for f in BF16_FLAGS))


def summary(flags: frozenset[str] | None = None) -> str:
    """The flags that decide CPU speed here, for logs and benchmark reports: ``"avx2 avx512f avx512_bf16"``."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown (no /proc/cpuinfo)"
    keys = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    return " ".join(f for f in keys if f in flags) or "no AVX2"
