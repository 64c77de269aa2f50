"""What the benchmarks ran on: the CPU's name and ISA, read in one place for every script's printed figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows, else "unknown CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), else none."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_isa() -> str:
    """The widest vector ISA this CPU has, and oneDNN's cap where ONEDNN_MAX_CPU_ISA sets one
    (how benchmarks emulate an AVX2-only CPU on a larger one)."""
    flags = cpu_flags()
    best = next(
        (
            name
            for flag, name in (
                ("amx_bf16", "AMX-BF16"),
                ("avx512_bf16", "AVX-512-BF16"),
                ("avx512f", "AVX-512"),
                ("avx2", "AVX2"),
            )
            if flag in flags
        ),
        "no AVX2",
    )
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return best + (f", oneDNN capped to {cap} (ONEDNN_MAX_CPU_ISA)" if cap else "")
