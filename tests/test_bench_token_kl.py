"""Smoke test of benchmarks/bench_token_kl.py at toy size: every path runs in its child process, the paths agree
on the KL and its gradient, and the report holds measured peaks and the ratios it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_token_kl.py"


@pytest.mark.slow
def test_bench_token_kl_runs_every_path_and_reports_the_ratios(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--vocab=300", "--hidden=16", "--rows=2", "--positions=12", "--chunk=5"]
    cmd += ["--repeats=1", "--threads=1", "--device=cpu", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"dense", "chunked", "chunked-checkpoint"}
    dense = results["dense"]
    for path in ("chunked", "chunked-checkpoint"):
        row, ratio = results[path], report["ratios"][path]
        assert row["kl_sum"] == pytest.approx(dense["kl_sum"], rel=1e-5) and row["kl_sum"] > 0
        assert row["grad_sum"] == pytest.approx(dense["grad_sum"], rel=1e-4) and row["grad_sum"] > 0
        assert ratio["time_over_dense"] == pytest.approx(row["seconds"] / dense["seconds"])
        assert ratio["peak_memory_over_dense"] == pytest.approx(row["peak_mb"] / max(dense["peak_mb"], 1e-9))
        assert f"{path}/dense: peak memory x" in proc.stdout
    for row in results.values():
        assert row["device"] == "cpu" and row["seconds"] > 0
        assert row["measured_by"].endswith("- VmRSS after the inputs")
