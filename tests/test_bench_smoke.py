"""Smoke test of benchmarks/bench_dpo.py: the tiny preset for 2 steps, through its child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_dpo.py"


def _bench(tmp_path: Path, framework: str) -> list[dict]:
    out = tmp_path / f"{framework}.json"
    cmd = [sys.executable, str(SCRIPT), "--preset=tiny", "--images", "1", "--steps=2", "--warmup=0"]
    cmd += [f"--frameworks={framework}", "--threads=1", f"--workdir={tmp_path / 'work'}", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pairs/s" in proc.stdout  # the table was printed
    rows = json.loads(out.read_text())["results"]
    assert [r["framework"] for r in rows] == [framework]
    return rows


def test_lora_targets_match_mmpo_defaults():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from presets import LORA_TARGETS, RESPONSE_TOKENS
    finally:
        sys.path.remove(str(SCRIPT.parent))
    from mmpo.backbones import DEFAULT_LORA_TARGETS

    assert LORA_TARGETS == DEFAULT_LORA_TARGETS
    assert RESPONSE_TOKENS == 128


@pytest.mark.slow
def test_mmpo_side_of_tiny_preset(tmp_path):
    (row,) = _bench(tmp_path, "mmpo")
    assert row["pairs_per_s"] > 0 and row["peak_mb"] > 0
    assert row["timed_steps"] == 2 and len(row["step_seconds"]) == 2
    assert row["response_tokens"] == 128 and row["prompt_tokens"] > 64  # 64 image tokens + text
    assert row["flops_per_pair_executed"] == row["flops_per_pair_required"] > 0  # shared prefix: nothing redone
    assert row["speedup_vs_trl"] is None and row["mfu"] is None  # no TRL run; CPU: no MFU
    assert 0 < row["imports_rss_mb"] < row["peak_mb"]
    assert row["runs_pairs_per_s"] == [row["pairs_per_s"]] and row["paired_speedups_vs_trl"] is None
    assert row["median_paired_speedup_vs_trl"] is None
    assert row["above_imports_mb"] == pytest.approx(row["peak_mb"] - row["imports_rss_mb"])


@pytest.mark.slow
def test_trl_side_of_tiny_preset(tmp_path):
    pytest.importorskip("trl")
    (row,) = _bench(tmp_path, "trl")
    assert row["pairs_per_s"] > 0 and row["peak_mb"] > 0
    assert row["response_tokens"] == 128  # TRL did not truncate the responses
    assert row["flops_per_pair_executed"] > row["flops_per_pair_required"]  # prompts run once per response
    assert row["speedup_vs_trl"] == pytest.approx(1.0) and row["paired_speedups_vs_trl"] == [pytest.approx(1.0)]
    assert row["median_paired_speedup_vs_trl"] == pytest.approx(1.0)
    assert 0 < row["above_imports_mb"] < row["peak_mb"] and row["above_imports_vs_trl"] == pytest.approx(1.0)
