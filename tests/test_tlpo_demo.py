"""``mmpo tlpo-demo``: its pairs are decided by one dimension each, its stages save what they claim, it runs end to
end (tiny settings)."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("diffusers")

from mmpo.portrait_critics import DIMENSIONS  # noqa: E402
from mmpo.recipes import tlpo_demo  # noqa: E402


class PixelCritics(tlpo_demo.PortraitCritics):
    """Scores that are a hash of the pixels: samples of a model trained for two steps are noise, on which the real
    critics give every sample quality 0 (no pair of that dimension); these differ for every sample and dimension, so
    each dimension decides some pairs and the plumbing is exercised. The critics are tested in test_portrait_critics."""

    def score(self, frames, envelope, reference_face):
        digest = hashlib.sha256(frames.numpy().tobytes()).digest()
        return {d: digest[i] / 255 for i, d in enumerate(DIMENSIONS)}


@pytest.mark.slow
def test_the_demo_runs_end_to_end_with_pairs_per_dimension_and_a_gate_plot(tmp_path, monkeypatch):
    from datamodules.diffusion.pairs import load_diffusion_records

    monkeypatch.setattr(tlpo_demo, "PortraitCritics", PixelCritics)

    args = ["--workdir", str(tmp_path), "--seeds", "1", "--n-train", "24", "--n-val", "4", "--vae-steps", "4"]
    args += ["--pretrain-steps", "2", "--pretrain-batch-size", "4", "--n-clips", "4", "--margin", "0"]
    args += ["--n-eval", "2", "--eval-rows", "1", "--dpo-steps", "1", "--gate-steps", "2", "--sampling-steps", "2"]
    args += ["--batch-size", "2"]
    results = tlpo_demo.main(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["after"] == results["after"] and len(results["after"]) == 1
    figures = results["after"][0]
    assert set(figures) == set(tlpo_demo.VARIANTS)
    for scores in figures.values():
        assert set(scores) == {*DIMENSIONS, "mean"}
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    # every pair names the dimension that decides it, winner first on that dimension's score
    pairs = tmp_path / "pairs-0" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert sum(results["pairs"][0]["pairs"].values()) == len(rows) <= 4 * 6
    assert all(r["dimension"] in DIMENSIONS and r["scores"][0] > r["scores"][1] for r in rows)
    records, _ = load_diffusion_records(str(pairs), str(tmp_path), drop_ties=False)
    assert len(records) == len(rows) and all(r.condition for r in records)
    run = tmp_path / "seed-0"
    for d in DIMENSIONS:
        assert (run / "experts" / d / "adapter_model.safetensors").is_file()
    assert (run / "single" / "adapter_model.safetensors").is_file()
    assert (run / "experts" / "gate" / "gate.json").is_file()
    assert json.loads((run / "experts" / "static" / "gate.json").read_text())["settings"]["per_layer"] is False
    assert len(results["gates"][0]["tuned merge"]) == len(DIMENSIONS)
    assert (run / "gate_weights.png").is_file() and (run / "samples.png").is_file()
    # a second run reuses every stage (their stamps match) and reproduces the figures
    again = tlpo_demo.main(args)
    assert again["after"] == results["after"]
