"""The benchmark scripts still run: benchmarks/gpu.py's CPU smoke mode (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_images

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_runs_on_cpu_over_class_folders(tmp_path):
    # Class folders whose photos share bare names (anchor/img_000.jpg, camera/img_000.jpg), as
    # Caltech-101's image_0001.jpg do: --images must keep them two images.
    for label, seed in (("anchor", 0), ("camera", 1)):
        write_images(tmp_path / "photos", [(300, 200), (240, 320)], seed=seed, label=label)
    report = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu.py"),
            str(tmp_path / "photos"),
            "--device",
            "cpu",
            "--quick",
            "--images",
            "4",
            "--workers",
            "2",
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("versions: Python "), out[:200]
    for phrase in (
        "peak:",
        "decode alone:",
        "buckets + cuDNN autotuning, first pass",
        "buckets + autotuning, warm",
        "first call vs repeat per new shape",
        "host syncs in stage + run",
        "mixed planning (the CPU's), heuristics, warm",
        "same-shape only, heuristics, warm",
        "Caltech descriptor end to end (warm):",
        "single scale 224x224",
        "exactness:",
    ):
        assert phrase in out, (phrase, out)
    assert "(<= 1e-4 ok)" in out and "vs one: 0.0e+00 (ok)" in out
    figures = json.loads(report.read_text())
    assert figures["settings"]["images"] == 4 and figures["caltech_end_to_end_warm"]["failures"] == 0
    assert figures["caltech_buckets_autotuned"]["images"] == 4 and "seconds" in figures


@pytest.mark.slow
def test_scale_benchmark_runs_every_stage_at_two_sizes(tmp_path):
    """benchmarks/scale.py at tiny sizes: every stage reports seconds and peak RSS at both sizes."""
    out = tmp_path / "scale.json"
    scale = REPO / "benchmarks" / "scale.py"
    args = ["--files", "300", "--rows", "2000", "--dir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run([sys.executable, str(scale), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    stages = {(r["stage"], r["n"]) for r in results}
    assert {s for s, _ in stages} == {"plan", "merge", "resume", "merge-file", "info", "index-ivf", "index-hnsw"}
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in results)
    assert ("plan", 300) in stages and ("plan", 30) in stages and ("info", 2000) in stages
