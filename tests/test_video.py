"""Tests for frame sampling, video decoding with decord and mp4 writing with PyAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.core.records import BadSampleError
from datamodules.vision_text.video_io import read_video, sample_frame_indices, write_video

RED, BLUE, GREY = (220, 40, 40), (40, 80, 220), (200, 200, 200)
T, SIZE, SIDE = 16, 64, 16
WHERE = "train.jsonl:12"


def _red_box(t: int) -> tuple[int, int, int, int]:
    """The red square moves right 3 px per frame: x0 = 2 + 3t, rows 8..23."""
    return (2 + 3 * t, 8, 2 + 3 * t + SIDE, 8 + SIDE)


def _blue_box(t: int) -> tuple[int, int, int, int]:
    """The blue square moves down 1 px per frame: columns 40..55, y0 = 26 + t (below the red one)."""
    return (40, 26 + t, 40 + SIDE, 26 + t + SIDE)


def _clip() -> np.ndarray:
    frames = np.empty((T, SIZE, SIZE, 3), dtype=np.uint8)
    frames[:] = GREY
    for t in range(T):
        for (x0, y0, x1, y1), color in ((_red_box(t), RED), (_blue_box(t), BLUE)):
            frames[t, y0:y1, x0:x1] = color
    return frames


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, _clip(), fps=8)
    return path


def _centroid(frame: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> tuple[float, float]:
    mask = (np.abs(frame.astype(int) - np.array(color)) <= tol).all(-1)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, f"no pixel of colour {color}"
    return float(xs.mean()), float(ys.mean())


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    ("num_frames", "num_samples", "expected"),
    [
        (16, 4, [2, 6, 10, 14]),
        (10, 3, [1, 5, 8]),  # (2i+1)*10 // 6
        (16, 16, list(range(16))),
        (100, 1, [50]),
        (4, 8, [0, 0, 1, 1, 2, 2, 3, 3]),  # short video: frames repeat
        (1, 3, [0, 0, 0]),
    ],
)
def test_uniform_indices(num_frames, num_samples, expected):
    assert sample_frame_indices(num_frames, num_samples, "uniform") == expected


@pytest.mark.parametrize(
    ("num_frames", "num_samples", "video_fps", "target_fps", "expected"),
    [
        (100, 10, 30, 2, [0, 15, 30, 45, 60, 75, 90]),  # one frame every 15, fewer than the cap
        (100, 4, 30, 2, [0, 30, 60, 90]),  # 7 candidates thinned at positions 0, 2, 4, 6
        (10, 8, 25, 10, [0, 2, 5, 7]),  # step 2.5: floor(k * 2.5)
        (35, 8, 29.97, 2.997, [0, 10, 20, 30]),  # step 10 despite float rounding
        (5, 8, 8, 30, [0, 1, 2, 3, 4]),  # target above the video's fps: every frame once
        (16, 8, 8, 8, [1, 3, 5, 7, 9, 11, 13, 15]),  # 16 candidates over the cap: uniform(16, 8)
    ],
)
def test_fps_indices(num_frames, num_samples, video_fps, target_fps, expected):
    assert sample_frame_indices(num_frames, num_samples, "fps", video_fps, target_fps) == expected


def test_fps_indices_thin_uniformly_over_the_candidates():
    # 8 fps kept from an 8 fps video: every frame is a candidate, thinned to uniform(num_frames, 4).
    assert sample_frame_indices(16, 4, "fps", 8, 8) == [2, 6, 10, 14]
    assert sample_frame_indices(64, 4, "fps", 8, 8) == [8, 24, 40, 56]
    # 1 fps kept: candidates 0, 8, .., 56 (8 of them), thinned at positions 1, 3, 5, 7.
    assert sample_frame_indices(64, 4, "fps", 8, 1) == [8, 24, 40, 56]
    assert sample_frame_indices(64, 2, "fps", 8, 1) == [16, 48]


def _window(indices: list[int], num_frames: int, num_samples: int) -> tuple[int, int]:
    """The (start, length) whose uniform cover gives ``indices`` (asserts there is one)."""
    fits = [
        (start, length)
        for length in range(min(num_frames, num_samples), num_frames + 1)
        for start in range(num_frames - length + 1)
        if indices == [start + i for i in sample_frame_indices(length, num_samples, "uniform")]
    ]
    assert fits, f"{indices} is not a uniform cover of a window of {num_frames} frames"
    return fits[0]


def test_random_segment_is_a_uniformly_covered_window_and_seeded():
    windows = set()
    for seed in range(200):
        indices = sample_frame_indices(32, 8, "random_segment", generator=torch.Generator().manual_seed(seed))
        again = sample_frame_indices(32, 8, "random_segment", generator=torch.Generator().manual_seed(seed))
        assert indices == again and len(indices) == 8 and indices == sorted(indices)
        assert 0 <= indices[0] and indices[-1] < 32
        windows.add(_window(indices, 32, 8))
    starts = {s for s, _ in windows}
    lengths = {n for _, n in windows}
    assert len(windows) > 50 and min(starts) == 0 and max(starts) >= 20  # it really augments
    assert min(lengths) <= 10 and max(lengths) >= 30


def test_random_segment_edge_cases():
    g = torch.Generator().manual_seed(0)
    assert sample_frame_indices(8, 8, "random_segment", generator=g) == list(range(8))  # the only window
    assert sample_frame_indices(3, 6, "random_segment", generator=g) == [0, 0, 1, 1, 2, 2]  # repeats
    torch.manual_seed(5)
    first = sample_frame_indices(40, 4, "random_segment")
    torch.manual_seed(5)
    assert sample_frame_indices(40, 4, "random_segment") == first  # global generator when None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_frames": 0, "num_samples": 4}, "num_frames"),
        ({"num_frames": 10, "num_samples": 0}, "num_samples"),
        ({"num_frames": 10, "num_samples": -1}, "num_samples"),
        ({"num_frames": 10, "num_samples": 4, "strategy": "fps", "target_fps": 2}, "video_fps"),
        ({"num_frames": 10, "num_samples": 4, "strategy": "fps", "video_fps": 30}, "target_fps"),
        ({"num_frames": 10, "num_samples": 4, "strategy": "fps", "video_fps": 30, "target_fps": 0}, "target_fps"),
        ({"num_frames": 10, "num_samples": 4, "strategy": "bogus"}, "strategy"),
    ],
)
def test_sampling_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_frame_indices(**kwargs)


# ---------------------------------------------------------------- decoding


def test_read_video_frames_and_metadata(clip_path):
    frames, meta = read_video(clip_path, num_samples=T)
    assert frames.dtype == torch.uint8 and tuple(frames.shape) == (T, SIZE, SIZE, 3)
    assert meta["indices"] == list(range(T)) and meta["num_frames"] == T
    assert meta["fps"] == pytest.approx(8.0) and meta["duration"] == pytest.approx(2.0)
    assert (meta["height"], meta["width"]) == (SIZE, SIZE) and meta["path"] == str(clip_path)
    error = np.abs(frames.numpy().astype(int) - _clip().astype(int))
    assert error.mean() < 3  # near-lossless H.264; the error sits on colour edges (yuv420p chroma)


def test_decoded_pixels_match_ground_truth_colours(clip_path):
    frames = read_video(clip_path, num_samples=T)[0].numpy().astype(int)
    for t in range(T):
        for (x0, y0, x1, y1), color in ((_red_box(t), RED), (_blue_box(t), BLUE)):
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            assert np.abs(frames[t, cy, cx] - color).max() <= 12, (t, color, frames[t, cy, cx])
        assert np.abs(frames[t, 60, 4] - GREY).max() <= 12  # bottom-left corner stays background


def test_direction_of_motion_recoverable_from_two_frames(clip_path):
    frames, meta = read_video(clip_path, num_samples=2)  # uniform: frames 4 and 12
    assert meta["indices"] == [4, 12]
    frames = frames.numpy()
    (rx0, ry0), (rx1, ry1) = _centroid(frames[0], RED), _centroid(frames[1], RED)
    (bx0, by0), (bx1, by1) = _centroid(frames[0], BLUE), _centroid(frames[1], BLUE)
    assert rx1 - rx0 == pytest.approx(3 * 8, abs=1.5) and abs(ry1 - ry0) < 1  # red moves right
    assert by1 - by0 == pytest.approx(1 * 8, abs=1.5) and abs(bx1 - bx0) < 1  # blue moves down


def test_sampled_frames_equal_the_full_decode(clip_path):
    full = read_video(clip_path, num_samples=T)[0]
    for strategy, kwargs in (("uniform", {}), ("fps", {"target_fps": 2})):
        frames, meta = read_video(clip_path, num_samples=8, strategy=strategy, **kwargs)
        assert torch.equal(frames, full[meta["indices"]])
    _, meta = read_video(clip_path, num_samples=8, strategy="fps", target_fps=2)
    assert meta["indices"] == [0, 4, 8, 12]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, meta_a = read_video(clip_path, 4, "random_segment", generator=g1)
    b, meta_b = read_video(clip_path, 4, "random_segment", generator=g2)
    assert meta_a["indices"] == meta_b["indices"] and torch.equal(a, b)


def test_short_video_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, _clip()[:3])
    frames, meta = read_video(path, num_samples=6)
    assert meta["indices"] == [0, 0, 1, 1, 2, 2] and frames.shape[0] == 6
    assert torch.equal(frames[0], frames[1]) and not torch.equal(frames[1], frames[2])


def test_write_video_is_deterministic_atomic_and_takes_tensors(tmp_path):
    write_video(tmp_path / "a.mp4", _clip())
    write_video(tmp_path / "b.mp4", torch.from_numpy(_clip()))
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no temporary left


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((4, 63, 64, 3), np.uint8), "even"),
        (np.zeros((4, 64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64, 3), np.uint8), "shape"),
        (np.zeros((0, 64, 64, 3), np.uint8), "N>=1"),
    ],
)
def test_write_video_rejects_bad_frames(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        write_video(tmp_path / "x.mp4", frames)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad files


def _assert_bad(path: Path) -> str:
    with pytest.raises(BadSampleError) as info:
        read_video(path, num_samples=8, where=WHERE)
    message = str(info.value)
    assert message.startswith(f"{WHERE}: ") and str(path) in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in _assert_bad(tmp_path / "nope.mp4")


def test_random_bytes_empty_and_text_files(tmp_path):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n" * 50)
    for path in (noise, empty, text):
        _assert_bad(path)


@pytest.mark.parametrize("width", [16, 48, 72])
def test_frame_widths_decord_cannot_copy_are_bad_records_naming_the_file(tmp_path, width):
    # decord 0.6 opens these valid H.264 files (48 px high) but fails to copy their frames out ("The size
    # must exactly match"); 32 and 64 px wide decode (the other tests). No frames come back half-copied:
    # the record is reported, naming the file
    path = tmp_path / f"w{width}.mp4"
    write_video(path, np.full((2, 48, width, 3), 128, dtype=np.uint8))
    assert "cannot decode frames" in _assert_bad(path)


@pytest.mark.parametrize("keep", [0.02, 0.3, 0.6, 0.9, -16, -1])
def test_truncated_mp4(clip_path, tmp_path, keep):
    # The moov header sits at the front (faststart): a cut inside the header or the frame data fails
    # when decord opens the file (it scans every packet). A file missing only the tail of its last
    # packet opens with all 16 frames counted, and decoding the frames that need that packet fails.
    data = clip_path.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    message = _assert_bad(path)
    assert ("cannot decode frames" if keep < 0 else "cannot open video") in message
