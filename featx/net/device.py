"""Where and in what precision the net runs: the one device and precision resolver for every engine.

`device="auto"` is the first CUDA GPU when there is one, else the CPU; `precision="auto"` is
bf16 where the device computes it natively (CUDA since Ampere, CPUs with AVX512-BF16/AMX),
fp16 on older GPUs, fp32 elsewhere. The resolved precision is part of the descriptor.
Importing this module imports no torch: ExtractConfig checks a precision before torch loads.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from featx.errors import BadInput

if TYPE_CHECKING:
    import torch

# The values --precision takes, "auto" first; each other one names a torch dtype (see `dtype`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else the one-line BadInput that names them."""
    if precision not in PRECISIONS:
        raise BadInput(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved precision (fp32, bf16, fp16)."""
    import torch

    if precision == "auto":
        raise ValueError("precision 'auto' has no dtype until it is resolved for a device (resolve_precision)")
    return getattr(torch, _DTYPE_NAMES[check_precision(precision)])


def _parse_device(device: str | torch.device) -> torch.device:
    """A torch.device for a device string ("auto" is CUDA when visible, else the CPU), unchecked."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BadInput(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None


def resolve_device(device: str) -> torch.device:
    """`--device` as a torch.device that exists here: auto, cpu, or a visible cuda[:N]."""
    import torch

    dev = _parse_device(device)
    if device == "auto":
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA GPU is visible here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {device}: featx runs on cpu or cuda[:N]")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadInput(f"--device {device}: only {torch.cuda.device_count()} GPUs are visible; use cuda:0..")
    return dev


def resolve_devices(spec: str) -> list[torch.device]:
    """`--devices`: "all" (every visible GPU) or a comma list such as cuda:0,cuda:1, one type."""
    import torch

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


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """fp32/bf16/fp16 as given; "auto" what the device (a torch.device, or a device string
    such as "auto", "cpu", "cuda:1") computes natively and fast:

    CPU: bf16 with AVX512-BF16/AMX (~2x fp32; centred cosine to fp32 >= 0.995 per image,
    see benchmarks/extract.py), fp32 otherwise (emulated bf16 is slower than fp32).
    CUDA: bf16 on GPUs that have it (Ampere and later), fp16 before.
    A device string is only parsed (a feature file made on a GPU is named the same here).
    """
    if check_precision(precision) != "auto":
        return precision
    import torch

    if _parse_device(device).type == "cuda":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
            return "fp16"
        return "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16)."""
    import torch

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
