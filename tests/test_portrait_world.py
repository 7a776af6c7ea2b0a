"""Tests for the talking-portrait world: seeded audio with bursts and pauses, frame-aligned features, errors
naming the file and record, ground truth that the pixels agree with, and files that read back."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from datamodules.core.records import BadSampleError
from datamodules.worlds.portrait import PortraitWorld, load_portrait_clip, main, read_film_strip, write_portrait_world
from datamodules.worlds.portrait_audio import (
    ENVELOPE_FULL_RMS,
    frame_features,
    mel_filterbank,
    read_wav,
    samples_per_frame,
    speech_like_audio,
    write_wav,
)
from datamodules.worlds.portrait_face import BACKGROUND, MAX_OPEN, render_face

WORLD = PortraitWorld(seed=5, num_frames=8, n_identities=3, n_val_identities=2)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("portrait-world")
    write_portrait_world(root, n_train=4, n_val=2, seed=5, num_frames=8, n_identities=3, n_val_identities=2)
    return root


def _records(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- audio


def test_audio_is_seeded_and_has_bursts_and_pauses() -> None:
    a, syl_a = speech_like_audio(random.Random(1), 2.0, 8000)
    b, syl_b = speech_like_audio(random.Random(1), 2.0, 8000)
    c, _ = speech_like_audio(random.Random(2), 2.0, 8000)
    assert a.shape == (16000,) and a.dtype == np.float32
    assert np.array_equal(a, b) and syl_a == syl_b and not np.array_equal(a, c)
    env = frame_features(a, 8000, 8, 16)["envelope"]
    assert (env > 0.3).sum() >= 3, env  # bursts
    assert (env < 0.05).sum() >= 1, env  # a pause: only the noise floor (RMS 0.002 -> 0.0067)
    starts, ends = np.array([s[0] for s in syl_a]), np.array([s[1] for s in syl_a])
    assert len(syl_a) >= 3 and np.all(starts[1:] - ends[:-1] >= 0.05 - 1e-6)  # silence between syllables
    # inside a gap the signal is the noise floor only; inside a syllable it is loud somewhere
    gap = a[int(ends[0] * 8000) + 8 : int(starts[1] * 8000) - 8]
    assert np.abs(gap).max() < 0.02
    assert np.abs(a[int(starts[0] * 8000) : int(ends[0] * 8000)]).max() > 0.2


def test_features_are_aligned_to_frames() -> None:
    rate, fps, frames = 8000, 8, 6
    spf = samples_per_frame(rate, fps)
    assert spf == 1000
    audio = np.zeros(frames * spf + 123, dtype=np.float32)  # extra samples past the clip are ignored
    t = np.arange(spf) / rate
    audio[3 * spf : 4 * spf] = 0.3 * math.sqrt(2) * np.sin(2 * math.pi * 1000 * t)  # RMS 0.3, frame 3 only
    feats = frame_features(audio, rate, fps, frames, n_mels=8)
    expected = np.zeros(frames)
    expected[3] = min(1.0, 0.3 / ENVELOPE_FULL_RMS)
    np.testing.assert_allclose(feats["envelope"], expected, atol=1e-4)
    assert feats["mel"].shape == (frames, 8)
    # the loud frame's strongest band is the one whose filter weighs 1000 Hz most
    bank = mel_filterbank(8, 256, rate)
    assert int(np.argmax(feats["mel"][3])) == int(bank[:, round(1000 / (rate / 256))].argmax())
    assert feats["mel"][3].max() > feats["mel"][2].max() + 5  # orders of magnitude above silence (log10)


def test_short_audio_and_mismatched_rates_name_file_and_record(tmp_path: Path) -> None:
    audio = np.zeros(7999, dtype=np.float32)
    with pytest.raises(BadSampleError, match=r"train.jsonl:4 \(train-000004\): audio a.wav holds 7999 samples"):
        frame_features(audio, 8000, 8, 8, where="train.jsonl:4 (train-000004)", path="a.wav")
    with pytest.raises(
        BadSampleError, match=r"^r1: audio b.wav: sample rate 8000 Hz is not a whole multiple of .* 7 fps"
    ):
        frame_features(np.zeros(16000), 8000, 7, 8, where="r1", path="b.wav")
    with pytest.raises(BadSampleError, match=r"^portrait world: audio: sample rate 8000 Hz .* 7 fps"):
        PortraitWorld(fps=7)
    with pytest.raises(ValueError, match="positive counts"):
        PortraitWorld(n_val_identities=0)
    wav = tmp_path / "c.wav"
    write_wav(wav, np.zeros(100), 16000)
    with pytest.raises(BadSampleError, match=r"^r2: WAV .*c.wav is sampled at 16000 Hz but the record says 8000 Hz"):
        read_wav(wav, "r2", sample_rate=8000)
    with pytest.raises(BadSampleError, match=r"^r3: audio file not found: .*missing.wav"):
        read_wav(tmp_path / "missing.wav", "r3")


def test_wav_round_trip(tmp_path: Path) -> None:
    audio, _ = speech_like_audio(random.Random(0), 0.5, 8000)
    write_wav(tmp_path / "x.wav", audio, 8000)
    back, rate = read_wav(tmp_path / "x.wav", sample_rate=8000)
    assert rate == 8000 and back.shape == audio.shape
    assert np.abs(back - audio).max() <= 0.5 / 32767 + 1e-7  # 16-bit rounding only


# ---------------------------------------------------------------- faces and records


def test_records_are_seeded_and_val_identities_are_held_out() -> None:
    assert WORLD.record("train", 1) == PortraitWorld(seed=5, num_frames=8, n_identities=3, n_val_identities=2).record(
        "train", 1
    )
    assert WORLD.record("train", 1)["envelope"] != PortraitWorld(seed=6, num_frames=8).record("train", 1)["envelope"]
    train = {WORLD.record("train", i)["identity"] for i in range(12)}
    val = {WORLD.record("val", i)["identity"] for i in range(8)}
    assert train <= {"id-000", "id-001", "id-002"} and val <= {"id-003", "id-004"} and val
    a, b = WORLD.identity(0), WORLD.identity(3)
    assert a != b and a == PortraitWorld(seed=5).identity(0)


def test_truth_matches_the_pixels() -> None:
    record = WORLD.record("train", 0)
    truth = record["truth"]
    assert truth["mouth_open"] == record["envelope"]  # the known function
    assert len(truth["head"]) == len(truth["landmarks"]) == len(record["mel"]) == 8
    frames = WORLD.frames(record)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    bg = np.array(BACKGROUND)
    for t in range(8):
        marks = truth["landmarks"][t]
        mx, my = (int(v) for v in marks["mouth"])
        hx, hy = (int(v) for v in marks["head"])
        assert np.abs(frames[t, hy, hx].astype(int) - bg).max() > 30  # the head centre is on the face
        assert np.abs(frames[t, 1, 1].astype(int) - bg).max() == 0  # the corner is background
        if truth["mouth_open"][t] > 0.6:  # wide open: the mouth centre shows the dark inside
            assert frames[t, my, mx].astype(int).sum() < 250, (t, frames[t, my, mx])
    ident = WORLD.identity(int(record["identity"][3:]))
    assert truth["mouth_open_px"][0] == pytest.approx(
        truth["mouth_open"][0] * MAX_OPEN * ident.face_frac * 32, abs=1e-3
    )


def test_render_face_moves_with_the_head() -> None:
    ident = WORLD.identity(1)
    a = render_face(ident, 32, (15.0, 16.0))
    b = render_face(ident, 32, (17.0, 16.0))  # two pixels to the right
    diff = np.abs(a[:, :-2].astype(int) - b[:, 2:].astype(int))
    assert diff.max() <= 16 and (diff > 0).any(-1).sum() <= 10  # the same picture up to polygon rounding at 4x
    closed, opened = render_face(ident, 32, mouth_open=0.0), render_face(ident, 32, mouth_open=1.0)
    assert opened.astype(int).sum() < closed.astype(int).sum()  # the open mouth is darker


# ---------------------------------------------------------------- on disk


def test_written_files_read_back(world_dir: Path, tmp_path: Path) -> None:
    train, val = _records(world_dir, "train"), _records(world_dir, "val")
    assert [r["id"] for r in train] == [f"train-{i:06d}" for i in range(4)] and len(val) == 2
    for record in train[:2] + val[:1]:
        clip = load_portrait_clip(world_dir, record, f"x.jsonl ({record['id']})")
        assert np.array_equal(clip["frames"].numpy(), WORLD.frames(record))  # PNG is lossless
        ident = WORLD.identity(int(record["identity"][3:]))
        assert np.array_equal(clip["reference"].numpy(), WORLD.reference(ident))
        np.testing.assert_allclose(clip["envelope"].numpy(), record["envelope"], atol=2e-4)  # 16-bit WAV
        np.testing.assert_allclose(clip["mel"].numpy(), record["mel"], atol=0.05)
    copy = tmp_path / "copy"  # the same seed writes the same bytes
    write_portrait_world(copy, n_train=1, n_val=1, seed=5, num_frames=8, n_identities=3, n_val_identities=2)
    for rel in ("frames/train-000000.png", "audio/train-000000.wav", "identities/id-000.png"):
        assert (copy / rel).read_bytes() == (world_dir / rel).read_bytes(), rel
    assert _records(copy, "val")[0] == val[0]
    world = json.loads((world_dir / "world.json").read_text())
    assert world["settings"]["num_frames"] == 8 and len(world["identities"]) == 5
    again = write_portrait_world(
        world_dir, n_train=4, n_val=2, seed=5, num_frames=8, n_identities=3, n_val_identities=2
    )
    assert again["generated"] is False
    with pytest.raises(FileExistsError):
        write_portrait_world(world_dir, n_train=4, n_val=2, seed=6, num_frames=8, n_identities=3, n_val_identities=2)


def test_bad_files_name_file_and_record(world_dir: Path, tmp_path: Path) -> None:
    record = _records(world_dir, "train")[0]
    short = tmp_path / "short.wav"
    write_wav(short, np.zeros(5000), 8000)  # 0.625 s for a 1 s clip
    bad = {**record, "audio": str(short)}
    with pytest.raises(BadSampleError, match=r"^train.jsonl:1 \(train-000000\): audio .*short.wav holds 5000 samples"):
        load_portrait_clip(world_dir, bad, "train.jsonl:1 (train-000000)")
    with pytest.raises(
        BadSampleError, match=r"^t:1: WAV .*train-000000.wav is sampled at 8000 Hz but the record says 16000"
    ):
        load_portrait_clip(world_dir, {**record, "sample_rate": 16000}, "t:1")
    with pytest.raises(
        BadSampleError, match=r"^t:2: audio .*train-000000.wav: sample rate 8000 Hz is not a whole multiple"
    ):
        load_portrait_clip(world_dir, {**record, "fps": 7}, "t:2")
    with pytest.raises(BadSampleError, match=r"^t:3: film strip .*train-000000.png is 256x32; 6 square frames"):
        read_film_strip(world_dir / record["frames"][0], 6, "t:3")


def test_cli_writes_a_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = main(
        ["--out", str(tmp_path / "w"), "--n-train", "1", "--n-val", "1", "--num-frames", "4", "--size", "64"]
    )
    assert summary["n_train"] == 1 and summary["identities"] == 10 and '"generated": true' in capsys.readouterr().out
    record = _records(tmp_path / "w", "train")[0]
    assert load_portrait_clip(tmp_path / "w", record, "w")["frames"].shape == (4, 64, 64, 3)
