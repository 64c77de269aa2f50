"""Where and in what precision the net runs: the one resolver for every engine.

`device="auto"` is the first CUDA GPU when there is one, else the CPU; `precision="auto"` is
bf16 where the device computes it natively (CUDA since Ampere, CPUs with AVX512-BF16/AMX),
fp16 on older GPUs, fp32 elsewhere. The resolved precision is part of the descriptor.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

from featx.errors import BadInput

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA GPU is visible here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {device}: featx runs on cpu or cuda[:N]")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"--device {device}: only {torch.cuda.device_count()} GPUs are visible; use cuda:0..")
    return dev


def resolve_devices(spec: str) -> list[torch.device]:
    """`--devices`: "all" (every visible GPU) or a comma list such as cuda:0,cuda:1, one type."""
    if spec.strip() == "all":
        if not torch.cuda.is_available():
            raise BadInput("--devices all: no CUDA GPU is visible here; use --device cpu")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    devices = [resolve_device(d.strip()) for d in spec.split(",") if d.strip()]
    if not devices:
        raise BadInput(f"--devices {spec!r} names no device; give e.g. cuda:0,cuda:1 or all")
    if len({d.type for d in devices}) > 1:
        raise BadInput(f"--devices {spec}: mixes device types; give devices of one type (e.g. cuda:0,cuda:1)")
    cuda = [d for d in devices if d.type == "cuda"]
    if len({d.index or 0 for d in cuda}) < len(cuda):
        raise BadInput(f"--devices {spec} names a GPU twice; name each once")
    return devices


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32/bf16/fp16 as given; "auto" per device (featx.net.accel.auto_precision)."""
    if precision == "auto":
        return auto_precision(device)
    if precision not in DTYPES:
        raise BadInput(f"unknown --precision {precision!r}; choose auto, {', '.join(DTYPES)}")
    return precision


@cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return (
        bool(flags & {"avx512_bf16", "amx_bf16"})
        and torch.backends.mkldnn.is_available()
        and not _onednn_capped_below_bf16()
    )


# ONEDNN_MAX_CPU_ISA values under which oneDNN runs no bf16 dot products (it emulates them).
_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _onednn_capped_below_bf16() -> bool:
    """True when ONEDNN_MAX_CPU_ISA keeps oneDNN off its bf16 kernels (e.g. AVX2 emulation)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISAS_WITHOUT_BF16


def auto_precision(device: torch.device | str) -> str:
    """What precision="auto" means on `device`: bf16 where it is native and fast, else fp32/fp16.

    CPU: bf16 with AVX512-BF16/AMX (~2x fp32; centred cosine to fp32 >= 0.995 per image,
    see benchmarks/extract.py), fp32 otherwise (emulated bf16 is slower than fp32).
    CUDA: bf16 on GPUs that have it (Ampere and later), fp16 before.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "fp16"
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"
