"""The benchmark scripts still run: benchmarks/gpu.py's CPU smoke mode (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_runs_on_cpu(tmp_path):
    report = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu.py"),
            "--device",
            "cpu",
            "--quick",
            "--workers",
            "2",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for phrase in (
        "peak:",
        "decode alone:",
        "Caltech descriptor end to end:",
        "images per batch",
        "model alone, mixed batches:",
        "model alone, same-shape only:",
        "single scale 224x224",
        "exactness:",
    ):
        assert phrase in out, (phrase, out)
    assert "(<= 1e-4 ok)" in out
    assert report.stat().st_size > 0
