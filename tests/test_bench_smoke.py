"""Smoke test of benchmarks/bench_dpo.py: the tiny preset for 2 steps, through its child processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_dpo.py"


def _bench(tmp_path: Path, framework: str, preset: str = "tiny", timeout: int = 120) -> list[dict]:
    out = tmp_path / f"{framework}.json"
    cmd = [sys.executable, str(SCRIPT), f"--preset={preset}", "--images", "1", "--steps=2", "--warmup=0"]
    cmd += [f"--frameworks={framework}", "--threads=1", f"--workdir={tmp_path / 'work'}", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pairs/s" in proc.stdout  # the table was printed
    rows = json.loads(out.read_text())["results"]
    assert [r["framework"] for r in rows] == framework.split(",")
    return rows


def _presets():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import presets
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return presets


def _tiny_preset_batch(root: Path, images: int, n_pairs: int = 4):
    """The tiny preset's benchmark data (``images`` per record) as mmpo's collator batches it."""
    from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records
    from mmpo.tiny.llava import build_tiny_processor

    presets = _presets()
    preset = presets.PRESETS["tiny"]
    data = presets.write_data(preset, images, n_pairs, root)
    records, problems = load_preference_records(data, data_root=data.parent)
    assert not problems and len(records) == n_pairs
    processor = build_tiny_processor(presets.words(preset.vocab_words), preset.image_size, preset.patch_size)
    dataset = PreferenceDataset(records)
    return VisionPreferenceCollator(processor)([dataset[i] for i in range(n_pairs)])


def test_lora_targets_match_mmpo_defaults():
    from mmpo.backbones import DEFAULT_LORA_TARGETS

    assert _presets().LORA_TARGETS == DEFAULT_LORA_TARGETS


def test_preset_data_has_the_fixed_lengths_the_flop_estimate_assumes(tmp_path):
    # Every response is RESPONSE_TOKENS tokens and every prompt the same length, so no row is padded and
    # the FLOP count of a pair follows from the prompt length alone.
    presets = _presets()
    lengths = {}
    for images in (1, 3):
        batch = _tiny_preset_batch(tmp_path, images)
        assert batch.response_mask.sum(-1).tolist() == [presets.RESPONSE_TOKENS] * 8
        assert bool(batch.attention_mask.all())  # no padding anywhere
        assert len(set(batch.prompt_lengths.tolist())) == 1
        lengths[images] = int(batch.prompt_lengths[0])
    # two more images add exactly their image tokens (64 px / patch 8: 8 x 8 each) to the prompt
    assert presets.PRESETS["tiny"].image_tokens == 64
    assert lengths[3] - lengths[1] == 2 * 64


@pytest.mark.slow
def test_mmpo_side_of_tiny_preset(tmp_path):
    (row,) = _bench(tmp_path, "mmpo")
    assert row["timed_steps"] == 2 and len(row["step_seconds"]) == 2 and row["pairs_per_step"] == 4
    # throughput is the pairs of the timed steps over their time (no warm-up step here)
    assert row["pairs_per_s"] == pytest.approx(2 * 4 / sum(row["step_seconds"]), rel=1e-3)
    # the run saw the lengths of the data as mmpo's collator batches it (one image: 64 tokens + text)
    batch = _tiny_preset_batch(tmp_path / "check", images=1)
    assert row["response_tokens"] == _presets().RESPONSE_TOKENS
    assert row["prompt_tokens"] == int(batch.prompt_lengths[0]) > 64
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
    assert row["timed_steps"] == 2 and row["pairs_per_step"] == 4
    assert row["pairs_per_s"] == pytest.approx(2 * 4 / sum(row["step_seconds"]), rel=1e-3)
    assert row["response_tokens"] == _presets().RESPONSE_TOKENS  # TRL did not truncate the responses
    assert row["flops_per_pair_executed"] > row["flops_per_pair_required"]  # prompts run once per response
    assert row["speedup_vs_trl"] == pytest.approx(1.0) and row["paired_speedups_vs_trl"] == [pytest.approx(1.0)]
    assert row["median_paired_speedup_vs_trl"] == pytest.approx(1.0)
    assert 0 < row["above_imports_mb"] < row["peak_mb"] and row["above_imports_vs_trl"] == pytest.approx(1.0)


@pytest.mark.slow
def test_video_dpo_bench_runs_the_pami_pair_and_reports_their_ratio(tmp_path):
    script = REPO / "benchmarks" / "bench_video_dpo.py"
    out = tmp_path / "video.json"
    cmd = [sys.executable, str(script), "--frames=2", "--size=32", "--vocab=300", "--candidates=3", "--steps=1"]
    cmd += ["--warmup=0", "--frameworks=pami,pami-naive", "--threads=1", f"--workdir={tmp_path / 'w'}", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    pami, naive = report["results"]["pami"], report["results"]["pami-naive"]
    assert (pami["rows"], naive["rows"]) == (4, 4)  # the loader's batch: the original and 3 candidates
    assert pami["clips_per_s"] > 0 and naive["peak_mb"] > 0
    ratio = report["ratios"]["pami"]
    assert ratio["throughput"] == pytest.approx(pami["clips_per_s"] / naive["clips_per_s"])
    assert "pami: " in proc.stdout and "x the naive clips/s" in proc.stdout


@pytest.mark.slow
def test_the_qwen2_vl_preset_runs_mmpo_and_trl_on_multimodal_rotary_positions(tmp_path):
    # the tiny Qwen2-VL of mmpo.tiny.families: both frameworks train on the same data with the same
    # 128 response tokens (each child checks it), and the ratio is reported
    pytest.importorskip("trl")
    mmpo, trl = _bench(tmp_path, "mmpo,trl", preset="tiny-qwen2vl", timeout=300)
    config = json.loads((tmp_path / "work" / "tiny-qwen2vl" / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert mmpo["response_tokens"] == trl["response_tokens"] == _presets().RESPONSE_TOKENS
    assert mmpo["speedup_vs_trl"] == pytest.approx(mmpo["pairs_per_s"] / trl["pairs_per_s"])


@pytest.mark.slow
def test_the_diffusion_bench_runs_mmpo_and_the_diffusers_example_step_and_reports_their_ratio(tmp_path):
    script = REPO / "benchmarks" / "bench_diffusion_dpo.py"
    out = tmp_path / "diffusion.json"
    cmd = [sys.executable, str(script), "--steps=1", "--warmup=0", "--batch=2", "--resolution=32", "--threads=1"]
    cmd += [f"--workdir={tmp_path / 'w'}", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["framework"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"mmpo", "mmpo-uncached", "mmpo-cached-ref", "diffusers"}
    for row in rows.values():
        assert row["timed_steps"] == 1 and row["pairs_per_s"] > 0 and math.isfinite(row["loss"])
        # the same LoRA on the same UNet: rank 4 on to_q, to_k, to_v, to_out.0
        assert row["trainable_params"] == rows["diffusers"]["trainable_params"]
    assert rows["mmpo"]["speedup_vs_diffusers"] == pytest.approx(
        rows["mmpo"]["pairs_per_s"] / rows["diffusers"]["pairs_per_s"]
    )
    assert rows["mmpo"]["cache_seconds"] > 0 and "cache_seconds" not in rows["mmpo-uncached"]


def test_diffusion_step_flops_match_the_text_encoder_by_hand_and_add_up_per_framework(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import diffusion_step_flops as flops
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    parts = flops.count("sd15", 64)
    # CLIP ViT-L/14 on 77 tokens, 12 layers: q, k, v, out projections, the 4x MLP, and the two attention products
    n, d = 77, 768
    layer = 4 * 2 * n * d * d + 2 * 2 * n * d * 4 * d + 2 * 2 * n * n * d
    assert parts["text_encoders"] == pytest.approx(12 * layer / 1e12, rel=1e-9)
    # the backward of a frozen UNet runs its input gradients only (none for the caption's keys and values):
    # of the forward's order, not twice it as with weight gradients
    forward = parts["reference_forward"]
    assert forward / 2 < parts["policy_forward_backward"] - forward < 2 * forward
    steps = flops.steps(parts)
    assert steps["mmpo"] == pytest.approx(parts["policy_forward_backward"] + forward)
    assert steps["diffusers"] == pytest.approx(steps["mmpo"] + parts["vae_encoder"] + parts["text_encoders"])
    assert steps["mmpo-cached-ref"] < steps["mmpo"] < steps["diffusers"]
