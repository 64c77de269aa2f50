"""The featx command as a user meets it: help, a run, one-line errors with exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featx
from featx.cli import app
from featx.net.backbones.vgg import torchvision_model as torchvision_vgg
from featx.net.weights import Weights

runner = CliRunner()
FAST = ["--model", "vgg11", "--scales", "224", "--quiet"]


def test_help_lists_the_commands_and_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "extract" in result.output and "info" in result.output
    result = runner.invoke(app, ["extract", "--help"])
    for option in ["--weights", "--scales", "--aggregate", "--flip", "--layer", "--precision", "--batch-size"]:
        assert option in result.output


def test_extract_samples_then_info(samples, tmp_path):
    out = tmp_path / "s.parquet"
    result = runner.invoke(app, ["extract", str(samples), "-o", str(out), "--weights", "random", *FAST])
    assert result.exit_code == 0, result.output
    assert "12 images (12 new), 0 failures" in result.output and "images/s" in result.output
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0
    assert "12 rows" in result.output and "RANDOM" in result.output and "anchor (3)" in result.output


def test_offline_default_weights_fail_in_one_line_with_exit_2(samples, tmp_path):
    # A proxy on a closed local port makes the download fail at once, whatever the network.
    env = os.environ | {
        "TORCH_HOME": str(tmp_path / "torch"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "no_proxy": "",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "featx", "extract", str(samples), "-o", str(tmp_path / "s.parquet"), *FAST],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    expected_file = str(tmp_path / "torch" / "hub" / "checkpoints" / "vgg11-8a719046.pth")
    assert lines[0].startswith("featx: error: cannot download VGG11_Weights.IMAGENET1K_V1")
    assert expected_file in lines[0] and "--weights FILE" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s.parquet").exists()
    # What README says a user sees: torch's own download line on stdout, then featx's one line.
    assert proc.stdout.splitlines() == [
        f'Downloading: "https://download.pytorch.org/models/vgg11-8a719046.pth" to {expected_file}'
    ]


def test_weights_file_is_loaded_and_recorded(samples, tmp_path):
    file = tmp_path / "vgg11-random.pth"
    torch.save(torchvision_vgg("vgg11", Weights({"kind": "random", "seed": 0}, None)).state_dict(), file)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for out, weights in [(a, str(file)), (b, "random")]:
        result = runner.invoke(app, ["extract", str(samples / "crab"), "-o", str(out), "--weights", weights, *FAST])
        assert result.exit_code == 0, result.output
    prov = featx.read_provenance(a)["weights"]
    assert prov["kind"] == "file" and prov["file"] == file.name and len(prov["sha256"]) == 64
    np.testing.assert_array_equal(featx.load_xy(a)[0], featx.load_xy(b)[0])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "missing.pth"], "missing.pth: no such file"),
        (["--scales", "256,abc"], "--scales '256,abc' is not a list of integers"),
        (["--scales", "128"], "below 224"),
        (["--device", "cuda:99"], "--device cuda:99"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(samples, tmp_path, args, message):
    result = runner.invoke(
        app, ["extract", str(samples), "-o", str(tmp_path / "x.parquet"), "--model", "vgg11", "--quiet", *args]
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.parquet").exists()


def test_missing_input_folder(tmp_path):
    result = runner.invoke(app, ["extract", str(tmp_path / "nope"), "-o", str(tmp_path / "x.parquet")])
    assert result.exit_code == 2 and "no such file or folder" in result.output
