"""benchmarks/heads.py still runs: its --quick mode (tiny sizes; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_heads_benchmark_quick_mode_runs(tmp_path):
    figures = tmp_path / "heads.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "heads.py"), "--quick", "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for phrase in ("machine:", "precision: float32", "including C selection", "x the float32 matrix", "per pass"):
        assert phrase in out, (phrase, out)
    assert "projection, a streamed probe of 4,000 rows" in out and "torch head - liblinear:" in out
    report = json.loads(figures.read_text())
    assert report["probe"]["head_solver"] == "scalable" and report["probe"]["rows"] == 3000
    assert [r["rows"] for r in report["streamed"]] == [1000, 2000, 4000]
    assert report["compare"]["exact"]["head_solver"] == "exact"
    assert report["compare"]["scalable"]["head_solver"] == "scalable"
