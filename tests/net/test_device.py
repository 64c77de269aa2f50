"""featx.net.device: the one precision resolver and the one list of precisions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from featx.extract.config import ExtractConfig, descriptor_settings
from featx.net.device import PRECISIONS, check_precision, resolve_device, resolve_precision, torch_dtype


def test_one_list_of_precisions_for_the_cli_the_config_and_the_resolver():
    from featx.cli import Precision

    assert PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    assert tuple(p.value for p in Precision) == PRECISIONS
    with pytest.raises(ValueError) as by_config:
        ExtractConfig(precision="fp8")
    with pytest.raises(ValueError) as by_resolver:
        resolve_precision("fp8", "cpu")
    message = "unknown --precision 'fp8'; choose one of auto, fp32, bf16, fp16"
    assert str(by_config.value) == str(by_resolver.value) == message


def test_dtypes_come_from_the_list():
    assert [torch_dtype(p) for p in PRECISIONS[1:]] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="resolve"):
        torch_dtype("auto")
    with pytest.raises(ValueError, match="fp64"):
        torch_dtype("fp64")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "auto"])
def test_a_device_string_or_torch_device_is_resolved_alike(device):
    cpu = resolve_precision("auto", torch.device("cpu"))
    assert cpu in ("bf16", "fp32")
    expected = cpu if device != "auto" or not torch.cuda.is_available() else resolve_precision("auto", "cuda")
    assert resolve_precision("auto", device) == expected
    for given in PRECISIONS[1:]:  # a precision given is kept, whatever the device
        assert resolve_precision(given, device) == given


def test_a_gpu_device_string_is_only_parsed():
    """A feature file made on a GPU names its descriptor the same on a machine without one."""
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cuda:1") == "bf16"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda:1")  # running there is another matter
    with pytest.raises(ValueError, match=r"unknown --device 'tpu'; use auto, cpu or cuda\[:N\]"):
        resolve_precision("auto", "tpu")
    with pytest.raises(ValueError, match=r"unknown --device 'tpu'"):
        resolve_device("tpu")


def test_the_config_records_what_the_resolver_says():
    config = ExtractConfig(model="vgg11", weights="random", device="cpu")
    assert descriptor_settings(config, {}, {})["precision"] == resolve_precision("auto", "cpu")
    assert descriptor_settings(config.replace(precision="fp16"), {}, {})["precision"] == "fp16"
    assert check_precision("bf16") == "bf16"


def test_checking_a_precision_imports_no_torch():
    code = (
        "import json, sys; from featx.net.device import check_precision, resolve_precision\n"
        "from featx.extract.config import ExtractConfig, descriptor_settings\n"
        "c = ExtractConfig(precision='bf16'); check_precision('fp16')\n"
        "given = descriptor_settings(c, {}, {})['precision']\n"
        "before = 'torch' in sys.modules; resolve_precision('auto', 'cpu')\n"
        "print(json.dumps([given, before, 'torch' in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # ... and the check can fail: resolving "auto" does load torch.
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["bf16", False, True], proc.stderr
