"""Tests for the portrait critics: measurements read from pixels, and each score on clips with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.config import instantiate
from jsonargparse import ArgumentParser

from datamodules.worlds.portrait import PortraitWorld
from datamodules.worlds.portrait_face import render_face
from mmpo.portrait_critics import (
    MotionSettings,
    PortraitCritics,
    lip_sync_score,
    measure_head,
    measure_mouth,
    motion_score,
    preference_pairs,
    quality_score,
    score_clip,
)

WORLD = PortraitWorld(seed=0)  # 16 frames of 32x32 at 8 fps
RECORDS = [WORLD.record("train", i) for i in range(4)]


def _identity(record: dict):
    return WORLD.identity(int(record["identity"][3:]))


def _render(record: dict, openings=None, heads=None) -> np.ndarray:
    """The record's clip with the mouth driven by ``openings`` and the head at ``heads`` instead."""
    truth = record["truth"]
    openings = truth["mouth_open"] if openings is None else openings
    heads = truth["head"] if heads is None else heads
    ident = _identity(record)
    return np.stack(
        [
            render_face(ident, WORLD.size, h, r, o, not b)
            for h, r, o, b in zip(heads, truth["tilt"], openings, truth["blink"], strict=True)
        ]
    )


# ---------------------------------------------------------------- measurements


def test_measured_mouth_grows_with_the_drawn_opening() -> None:
    ident = WORLD.identity(2)
    frames = np.stack([render_face(ident, 32, (16.0, 17.0), 5.0, o) for o in np.linspace(0, 1, 6)])
    mouth = measure_mouth(frames)
    assert torch.all(mouth[1:] > mouth[:-1] + 0.5), mouth  # at least half a dark pixel per step
    eyes_shut = render_face(ident, 32, (16.0, 17.0), 5.0, 0.0, eyes_open=False)
    assert measure_mouth(eyes_shut[None])[0] == pytest.approx(float(mouth[0]), abs=1e-4)  # eyes are not the mouth


def test_measured_head_follows_a_translation() -> None:
    ident = WORLD.identity(0)
    a, b = render_face(ident, 32, (15.0, 16.0)), render_face(ident, 32, (17.0, 15.0))
    delta = measure_head(np.stack([a, b]))
    assert torch.allclose(delta[1] - delta[0], torch.tensor([2.0, -1.0]), atol=0.05)  # polygon rounding
    assert torch.isnan(measure_head(np.full((1, 32, 32, 3), (150, 196, 206), np.uint8))).all()  # no face


# ---------------------------------------------------------------- lip sync


def test_lip_sync_known_answers() -> None:
    frames = _render(RECORDS[0])
    mouth = measure_mouth(frames)
    assert lip_sync_score(frames, mouth) == pytest.approx(1.0, abs=1e-9)
    assert lip_sync_score(frames, -mouth) == 0.0  # anti-correlated: clipped to 0
    assert lip_sync_score(frames, np.full(16, 0.5)) == 0.0  # constant audio: nothing to agree with
    with pytest.raises(ValueError, match="15"):
        lip_sync_score(frames, np.zeros(15))


def test_lip_sync_ranks_true_above_shifted_and_reversed() -> None:
    true, shifted, reversed_ = [], [], []
    for record in RECORDS:
        env = np.array(record["envelope"])
        true.append(lip_sync_score(_render(record), env))
        shifted.append(lip_sync_score(_render(record, openings=np.roll(env, 3)), env))
        reversed_.append(lip_sync_score(_render(record, openings=env[::-1]), env))
    assert min(true) > 0.98, true  # measured from pixels, so not exactly 1
    assert all(s < t - 0.3 for s, t in zip(shifted, true, strict=True)), shifted
    assert all(r < t - 0.3 for r, t in zip(reversed_, true, strict=True)), reversed_
    assert np.mean(shifted) < 0.3 and np.mean(reversed_) < 0.3


# ---------------------------------------------------------------- motion


def test_motion_ranks_smooth_above_frozen_and_jittered() -> None:
    rng = np.random.default_rng(0)
    for record in RECORDS[:2]:
        env = record["envelope"]
        smooth = _render(record)
        jittered_heads = [[x + rng.uniform(-1.5, 1.5), y + rng.uniform(-1.5, 1.5)] for x, y in record["truth"]["head"]]
        smooth_score = motion_score(smooth, env)
        assert smooth_score == 1.0  # the world's head paths stay under jitter_free
        assert motion_score(np.repeat(smooth[:1], 16, 0), env) == 0.0  # frozen while talking
        assert motion_score(_render(record, heads=jittered_heads), env) < 0.2
        flicker = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)  # new noise each frame
        still_noise = np.clip(smooth + rng.normal(0, 20, smooth.shape[1:]), 0, 255).astype(np.uint8)  # same noise
        assert motion_score(flicker, env) < 0.4
        assert motion_score(still_noise, env) > 0.9  # a noisy picture is quality's business, not motion's


def test_motion_frozen_share_is_counted_exactly() -> None:
    smooth = _render(RECORDS[0])
    half = np.concatenate([smooth[:8], np.repeat(smooth[8:9], 8, 0)])  # steps 8..14 repeat a frame: 7 of 15
    assert motion_score(half) == pytest.approx(8 / 15, abs=1e-6)
    quiet = np.zeros(16)
    quiet[:8] = 0.5  # talking in frames 0..7 only: the active steps are 0->1 .. 7->8, none frozen
    assert motion_score(half, quiet) == pytest.approx(1.0, abs=1e-6)
    quiet[8] = 0.5  # now step 8->9, a repeated frame, is active too: 1 frozen of 9 active steps
    assert motion_score(half, quiet) == pytest.approx(8 / 9, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 frames"):
        motion_score(smooth[:1])


# ---------------------------------------------------------------- quality


def test_quality_known_answers() -> None:
    record = RECORDS[1]
    ref = WORLD.reference(_identity(record))
    assert quality_score(ref[None], ref) == pytest.approx(1.0, abs=1e-6)
    assert quality_score(np.roll(ref, (2, -1), (0, 1))[None], ref) == pytest.approx(1.0, abs=1e-6)  # moved head
    other = WORLD.reference(WORLD.identity(6))
    assert quality_score(other[None], ref) < 0.95  # another face's structure


def test_quality_ranks_true_above_blurred_and_noisy() -> None:
    rng = np.random.default_rng(0)
    for record in RECORDS:
        ref = WORLD.reference(_identity(record))
        frames = _render(record)
        true = quality_score(frames, ref)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).round().byte().numpy()
        noisy = np.clip(frames + rng.normal(0, 60, frames.shape), 0, 255).astype(np.uint8)
        pure = rng.integers(0, 256, frames.shape, dtype=np.uint8)
        assert true > 0.75, true
        assert quality_score(blurred, ref) < true - 0.3
        assert quality_score(noisy, ref) < true - 0.1
        assert quality_score(pure, ref) < 0.1


def test_score_clip_has_every_dimension_in_range() -> None:
    record = RECORDS[2]
    scores = score_clip(_render(record), record["envelope"], WORLD.reference(_identity(record)))
    assert set(scores) == {"lip_sync", "motion", "quality"}
    assert scores["lip_sync"] > 0.98 and scores["motion"] == 1.0 and 0.75 < scores["quality"] <= 1.0
    strict = PortraitCritics(
        motion=MotionSettings(jitter_free=0.0, jitter_scale=1e-3)
    )  # any head acceleration now costs motion
    strict_scores = strict.score(_render(record), record["envelope"], WORLD.reference(_identity(record)))
    assert strict_scores["motion"] < 0.5 and strict_scores["lip_sync"] == scores["lip_sync"]


# ---------------------------------------------------------------- pairs


def test_preference_pairs_rule() -> None:
    a = [
        {"lip_sync": 0.9, "motion": 0.5, "quality": 0.5},  # 0: lip sync decides, a wins
        {"lip_sync": 0.2, "motion": 0.5, "quality": 0.5},  # 1: lip sync decides, b wins
        {"lip_sync": 0.9, "motion": 0.9, "quality": 0.5},  # 2: motion differs more than lip sync: not kept
        {"lip_sync": 0.53, "motion": 0.5, "quality": 0.5},  # 3: below the margin
        {"lip_sync": 0.8, "motion": 0.5, "quality": 0.1},  # 4: quality differs more (0.4 > 0.3): b wins on it
    ]
    b = [
        {"lip_sync": 0.3, "motion": 0.45, "quality": 0.55},
        {"lip_sync": 0.7, "motion": 0.5, "quality": 0.5},
        {"lip_sync": 0.5, "motion": 0.3, "quality": 0.5},
        {"lip_sync": 0.5, "motion": 0.5, "quality": 0.5},
        {"lip_sync": 0.5, "motion": 0.5, "quality": 0.5},
    ]
    assert preference_pairs(a, b, "lip_sync", margin=0.05) == [(0, 0), (1, 1)]
    assert preference_pairs(a, b, "motion", margin=0.05) == [(2, 0)]
    assert preference_pairs(a, b, "quality", margin=0.05) == [(4, 1)]
    assert preference_pairs(a, b, "lip_sync", margin=0.5) == [(0, 0)]
    assert PortraitCritics(margin=0.5).pairs(a, b, "lip_sync") == [(0, 0)]
    assert preference_pairs([], [], "motion") == []
    with pytest.raises(ValueError, match="unknown dimension"):
        preference_pairs(a, b, "sharpness")
    with pytest.raises(ValueError, match="5 first samples but 4"):
        preference_pairs(a, b[:4], "motion")


def test_critics_settings_parse_from_yaml() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--critics", type=PortraitCritics)
    yaml = "critics:\n  margin: 0.1\n  motion:\n    jitter_free: 0.02\n    freeze_tol: 0.002\n"
    critics = instantiate(parser, parser.parse_string(yaml)).critics
    assert critics == PortraitCritics(margin=0.1, motion=MotionSettings(jitter_free=0.02, freeze_tol=0.002))


@pytest.mark.slow
def test_the_docs_table_script_runs_and_the_true_clips_score_full_lip_sync_and_motion():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "portrait_critics_table.py"
    out = subprocess.run([sys.executable, str(script), "2"], capture_output=True, text=True, check=True).stdout
    true_row = next(line for line in out.splitlines() if line.startswith("| true |"))
    assert true_row.split(" | ")[1].startswith("1.00") and true_row.split(" | ")[2].startswith("1.00")
    assert "- blur 3x3 box: " in out and "quality 2/2 (true wins 2)" in out
