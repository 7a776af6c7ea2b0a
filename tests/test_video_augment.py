"""augment.video: frame maps on index-coded clips, pixels against hand values and torchvision, seeding, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from helpers.clips import SEEDS, C, H, T, W, gen, index_clip, indices, others_for, random_clip

import augment.video as video
from augment.video import (
    VIDEO_AUGMENTATIONS,
    ClipSwap,
    ColorJitter,
    FrameDrop,
    FrameMask,
    FrameRepeat,
    GaussianBlur,
    Reverse,
    Shuffle,
    SpatialCrop,
    SpeedChange,
    StaticClip,
    build_augmentation,
    clips_identical,
)


def drawn(seed: int, low: float, high: float) -> float:
    """The first uniform a fresh generator with ``seed`` gives through the augmentations' draw."""
    return low + (high - low) * torch.rand((), generator=gen(seed), dtype=torch.float64).item()


# arguments that make an augmentation random where its defaults are deterministic (a fixed speed factor)
RANDOM_KWARGS = {"speed": {"factor": (0.5, 3.0)}}


# --------------------------------------------------------------------------- temporal


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_reverse_is_exact(dtype):
    x = random_clip(dtype)
    out = Reverse()(x, gen())
    assert all(torch.equal(out[t], x[T - 1 - t]) for t in range(T))


def test_full_shuffle_is_a_permutation_and_never_the_identity():
    seen = set()
    for seed in SEEDS:
        idx = indices(Shuffle()(index_clip(), gen(seed)))
        assert sorted(idx) == list(range(T))
        assert idx != list(range(T))
        seen.add(tuple(idx))
    assert len(seen) > 1
    # with two frames the only non-identity permutation is the swap, whatever was drawn
    for seed in SEEDS:
        assert indices(Shuffle()(index_clip(2), gen(seed))) == [1, 0]


@pytest.mark.parametrize("num_frames, window", [(8, 3), (8, 4), (2, 2), (5, 8)])
def test_local_shuffle_moves_frames_only_within_windows(num_frames, window):
    for seed in SEEDS:
        idx = indices(Shuffle("local", window=window)(index_clip(num_frames), gen(seed)))
        assert idx != list(range(num_frames))
        for t, source in enumerate(idx):
            assert source // window == t // window
        for start in range(0, num_frames, window):
            assert sorted(idx[start : start + window]) == list(range(start, min(start + window, num_frames)))


def test_frame_drop_stutters_on_the_previous_kept_frame():
    for seed in SEEDS:
        idx = indices(FrameDrop(fraction=0.25)(index_clip(), gen(seed)))
        assert len(idx) == T and idx[0] == 0
        assert all(b >= a for a, b in zip(idx, idx[1:], strict=False))
        kept = set(idx)
        assert len(kept) == T - 2  # round(0.25 * 8) frames dropped
        # a dropped frame t shows the last kept frame before it
        for t in range(T):
            assert idx[t] == max(k for k in kept if k <= t)
        x = random_clip(torch.float32)  # the pixels of those source frames, unchanged
        assert torch.equal(FrameDrop(fraction=0.25)(x, gen(seed)), x[idx])


@pytest.mark.parametrize("fraction, repeats, n_chosen", [(0.25, 1, 2), (0.1, 2, 1), (1.0, 1, 7)])
def test_frame_repeat_duplicates_and_pushes_out(fraction, repeats, n_chosen):
    for seed in SEEDS:
        idx = indices(FrameRepeat(fraction, repeats)(index_clip(), gen(seed)))
        steps = [b - a for a, b in zip(idx, idx[1:], strict=False)]
        assert idx[0] == 0 and set(steps) <= {0, 1}
        # every frame shown is shown once or 1 + repeats times, and the tail is pushed out
        counts = [idx.count(s) for s in sorted(set(idx))]
        assert set(counts[:-1]) <= {1, 1 + repeats}
        assert sum(c > 1 for c in counts[:-1]) + (counts[-1] > 1) <= n_chosen
        assert T - 1 - n_chosen * repeats <= idx[-1] < T - 1


@pytest.mark.parametrize(
    "factor, mode, expected",
    [
        (2.0, "wrap", [0, 2, 4, 6, 0, 2, 4, 6]),
        (2.0, "clamp", [0, 2, 4, 6, 7, 7, 7, 7]),
        (3.0, "wrap", [0, 3, 6, 1, 4, 7, 2, 5]),
        (0.5, "wrap", [0, 0, 1, 1, 2, 2, 3, 3]),
        (1 / 3, "clamp", [0, 0, 0, 1, 1, 1, 2, 2]),
        (1.0, "wrap", list(range(8))),
    ],
)
def test_speed_change_indices(factor, mode, expected):
    assert indices(SpeedChange(factor, mode)(index_clip(), gen())) == expected


def test_speed_change_range_draws_one_factor_per_clip():
    for seed in SEEDS:
        factor = drawn(seed, 1.5, 3.0)
        idx = indices(SpeedChange((1.5, 3.0), "clamp")(index_clip(), gen(seed)))
        assert idx == [min(T - 1, int(t * factor + 1e-9)) for t in range(T)]


def test_static_clip_repeats_one_input_frame():
    x = random_clip()
    chosen = set()
    for seed in SEEDS:
        out = StaticClip()(x, gen(seed))
        matches = [k for k in range(T) if torch.equal(out[0], x[k])]
        assert len(matches) == 1
        assert torch.equal(out, x[matches[0]].expand_as(x))
        chosen.add(matches[0])
    assert len(chosen) > 1


def test_identical_outputs_where_documented():
    static = torch.full((T, C, H, W), 7, dtype=torch.uint8)
    for aug in (Reverse(), Shuffle(), FrameDrop(), FrameRepeat(), SpeedChange(2.0), StaticClip()):
        assert clips_identical(aug(static, gen()), static)
        assert aug.identical_when
    assert not clips_identical(Reverse()(index_clip(), gen()), index_clip())


# --------------------------------------------------------------------------- spatial and colour


def test_crop_zooms_one_box_for_every_frame():
    # each frame a horizontal ramp (value = column) plus 100 t: bilinear zoom of a ramp is known
    ramp = torch.arange(W, dtype=torch.float64).expand(H, W)
    x = (ramp + 100 * torch.arange(T, dtype=torch.float64).view(-1, 1, 1)).unsqueeze(1).expand(T, C, H, W)
    out = SpatialCrop(scale=0.25)(x, gen(1))  # a half-side box: 8 × 8 zoomed to 16 × 16
    assert out.shape == x.shape and out.dtype == x.dtype
    frame = out - 100 * torch.arange(T, dtype=torch.float64).view(-1, 1, 1, 1)
    assert torch.allclose(frame, frame[:1].expand_as(frame))  # the same box in every frame
    j = torch.arange(W, dtype=torch.float64)
    offsets = ((j + 0.5) / 2 - 0.5).clamp(0, 7)  # source column within the box, align_corners=False
    left = frame[0, 0, 0, 0]
    assert 0 <= left <= W - 8
    assert torch.allclose(frame[0, 0], (left + offsets).expand(H, W))
    lefts = {float(SpatialCrop(0.25)(x, gen(s))[0, 0, 0, 0]) for s in SEEDS}
    assert len(lefts) > 1
    assert torch.equal(SpatialCrop(1.0)(x, gen()), x)  # the whole frame: an exact copy


def test_gaussian_blur_matches_the_kernel_and_keeps_constants():
    impulse = torch.zeros(T, C, H, W, dtype=torch.float64)
    impulse[:, :, 8, 8] = 1.0
    out = GaussianBlur(kernel_size=5, sigma=1.0)(impulse, gen())
    k = video.gaussian_kernel1d(5, 1.0)  # (5,) float64
    assert torch.allclose(out[:, :, 6:11, 6:11], torch.outer(k, k).expand(T, C, 5, 5), atol=1e-12)
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(T, C, dtype=torch.float64))
    constant = torch.full((T, C, H, W), 0.3)
    assert torch.allclose(GaussianBlur(9, (1.0, 3.0))(constant, gen()), constant, atol=1e-6)
    constant_u8 = torch.full((T, C, H, W), 77, dtype=torch.uint8)
    assert torch.equal(GaussianBlur(31, 10.0)(constant_u8, gen()), constant_u8)  # kernel wider than the frame


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_color_jitter_with_zero_strengths_is_the_identity(dtype):
    x = random_clip(dtype)
    out = ColorJitter(0, 0, 0, 0)(x, gen())
    assert out.dtype == dtype and torch.equal(out, x)


@pytest.mark.parametrize(
    "kwargs, reference, low, high",
    [
        ({"brightness": 0.5}, TF.adjust_brightness, 0.5, 1.5),
        ({"contrast": 0.5}, TF.adjust_contrast, 0.5, 1.5),
        ({"saturation": 0.8}, TF.adjust_saturation, 0.2, 1.8),
        ({"hue": 0.4}, TF.adjust_hue, -0.4, 0.4),
    ],
)
def test_color_jitter_matches_torchvision_for_the_drawn_factor(kwargs, reference, low, high):
    x = random_clip(torch.float32)
    full = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0} | kwargs
    for seed in range(3):
        out = ColorJitter(**full)(x, gen(seed))
        expected = reference(x, drawn(seed, low, high))
        assert torch.allclose(out, expected, atol=1e-5)


def test_color_jitter_uint8_rounds_and_clamps():
    x = torch.full((T, C, H, W), 200, dtype=torch.uint8)
    x[:, :, 0] = 10
    for seed in SEEDS:
        factor = drawn(seed, 0.0, 2.0)
        out = ColorJitter(brightness=1.0, contrast=0, saturation=0, hue=0)(x, gen(seed))
        assert out.dtype == torch.uint8
        assert int(out[0, 0, 1, 0]) == min(255, round(200 * factor))
        assert int(out[0, 0, 0, 0]) == min(255, round(10 * factor))


def test_hsv_round_trip_and_known_values():
    rgb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]).view(4, 3, 1, 1)
    hsv = video.rgb_to_hsv(rgb).flatten(1)
    assert torch.allclose(hsv, torch.tensor([[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [0, 0, 0.5]]))
    x = random_clip(torch.float32)
    assert torch.allclose(video.hsv_to_rgb(video.rgb_to_hsv(x)), x, atol=1e-6)


# --------------------------------------------------------------------------- clip swap and masking


def test_clip_swap_takes_the_same_frames_of_one_other():
    other = random_clip(seed=9)  # fraction 1: the whole clip, from a list or an (N, T, C, H, W) tensor
    assert torch.equal(ClipSwap(1.0)(random_clip(), gen(), others=[other]), other)
    assert torch.equal(ClipSwap(1.0)(random_clip(), gen(), others=other.unsqueeze(0)), other)
    x = index_clip()
    others = torch.stack(others_for(x))  # (3, T, C, H, W), clip i filled with 200 + i
    picks = set()
    for seed in SEEDS:
        idx = indices(ClipSwap(0.5)(x, gen(seed), others=others))
        swapped = [t for t in range(T) if idx[t] >= 200]
        assert len(swapped) == 4 and swapped == list(range(swapped[0], swapped[0] + 4))  # contiguous
        assert len({idx[t] for t in swapped}) == 1  # from one other clip
        assert all(idx[t] == t for t in range(T) if t not in swapped)
        picks.add((idx[swapped[0]], swapped[0]))
    assert len({other for other, _ in picks}) == 3  # every other clip gets drawn
    assert len({start for _, start in picks}) > 1  # and the segment moves


@pytest.mark.parametrize(
    "others, match",
    [
        (None, "needs the other clips"),
        ([], "at least one other clip"),
        (torch.zeros(T, C, H, W, dtype=torch.uint8), r"got a tensor of shape \(8, 3, 16, 16\)"),
        ([torch.zeros(T - 1, C, H, W, dtype=torch.uint8)], r"shape \(8, 3, 16, 16\), got \(7, 3, 16, 16\)"),
        ([torch.zeros(T, C, H, W)], "dtype torch.float32"),
    ],
)
def test_clip_swap_errors(others, match):
    with pytest.raises(ValueError, match=match):
        ClipSwap()(index_clip(), gen(), others=others)


def test_frame_mask_frames_masks_the_stated_fraction():
    x = index_clip() + 1  # no zeros before masking
    for seed in SEEDS:
        out = FrameMask("frames", fraction=0.25, fill=0)(x, gen(seed))
        masked = [t for t in range(T) if bool((out[t] == 0).all())]
        assert len(masked) == 2
        assert all(torch.equal(out[t], x[t]) for t in range(T) if t not in masked)


def test_frame_mask_patches_masks_grid_cells_per_frame():
    x = random_clip(torch.float32) + 1.0
    out = FrameMask("patches", fraction=0.25, patch_size=4, fill=-1.0)(x, gen(5))
    masked = out == -1.0  # (T, C, H, W)
    assert torch.equal(masked, masked[:, :1].expand_as(masked))  # the same pixels in every channel
    cells = masked[:, 0].view(T, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).flatten(3)  # (T, rows, cols, 16 pixels)
    assert bool((cells.all(-1) | ~cells.any(-1)).all())  # cells are all masked or all kept
    assert cells.all(-1).flatten(1).sum(1).tolist() == [4] * T  # 0.25 of 16 cells, every frame
    assert not torch.equal(masked[0], masked[1]) or not torch.equal(masked[1], masked[2])  # drawn per frame
    assert torch.equal(out[~masked], x[~masked])


def test_frame_mask_mean_fill():
    x = random_clip(torch.uint8)
    out = FrameMask("frames", fraction=0.5, fill="mean")(x, gen())
    mean = x.double().mean(dim=(0, 2, 3)).round().to(torch.uint8)  # (C,)
    masked = [t for t in range(T) if not torch.equal(out[t], x[t])]
    assert len(masked) == 4
    assert all(torch.equal(out[t], mean.view(C, 1, 1).expand(C, H, W)) for t in masked)


# --------------------------------------------------------------------------- every augmentation


@pytest.mark.parametrize("name", sorted(VIDEO_AUGMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16, torch.float64])
def test_every_augmentation_keeps_shape_dtype_and_is_seeded(name, dtype):
    x = random_clip(dtype)
    aug = build_augmentation(name, **RANDOM_KWARGS.get(name, {}))
    others = others_for(x)
    before, global_state = x.clone(), torch.get_rng_state()
    torch.manual_seed(1)
    a = aug(x, gen(0), others=others)
    torch.manual_seed(2)  # a different global state must not matter, and must not be consumed
    b = aug(x, gen(0), others=others)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(2).get_state())
    torch.set_rng_state(global_state)
    assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
    assert torch.equal(a, b)
    assert torch.equal(x, before)  # the input is left unchanged
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        aug(x, 0, others=others)
    if name != "reverse":  # the only deterministic one
        assert any(not torch.equal(a, aug(x, gen(s), others=others)) for s in range(1, 8))


def test_registry_builds_every_name():
    names = "reverse shuffle frame_drop frame_repeat speed static crop blur color_jitter clip_swap mask"
    assert set(VIDEO_AUGMENTATIONS) == set(names.split())
    for name, cls in VIDEO_AUGMENTATIONS.items():
        aug = build_augmentation(name)
        assert type(aug) is cls and aug.name == name and aug.identical_when
    assert build_augmentation("shuffle", mode="local", window=3).window == 3
    with pytest.raises(ValueError, match="unknown video augmentation 'flip'; known: blur, clip_swap"):
        build_augmentation("flip")
    with pytest.raises(ValueError, match=r"video augmentation 'reverse' \(Reverse\): .*argument"):
        build_augmentation("reverse", factor=2)
    with pytest.raises(ValueError, match="'speed' \\(SpeedChange\\): .*unexpected keyword argument 'window'"):
        build_augmentation("speed", window=2)


# --------------------------------------------------------------------------- validation and helpers


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("shuffle", {"mode": "all"}, "mode must be 'full' or 'local', got 'all'"),
        ("shuffle", {"mode": "local", "window": 1}, "window must be an integer >= 2, got 1"),
        ("frame_drop", {"fraction": 1.0}, r"fraction must be in \(0, 1\), got 1.0"),
        ("frame_repeat", {"repeats": 0}, "repeats must be an integer >= 1, got 0"),
        ("speed", {"factor": 0}, "factor must lie in .* got 0"),
        ("speed", {"factor": (3.0, 2.0)}, r"factor must lie in .*min <= max, got \(3.0, 2.0\)"),
        ("speed", {"factor": None}, r"factor must be a number or a \(min, max\) pair, got None"),
        ("blur", {"sigma": "2"}, r"sigma must be a number or a \(min, max\) pair, got '2'"),
        ("speed", {"mode": "loop"}, "mode must be 'wrap' or 'clamp', got 'loop'"),
        ("crop", {"scale": 0.0}, r"scale must be in \(0, 1\], got 0.0"),
        ("crop", {"scale": 1.5}, "scale must lie in .* got 1.5"),
        ("blur", {"kernel_size": 4}, "kernel_size must be an odd integer >= 3, got 4"),
        ("color_jitter", {"hue": 0.6}, r"hue must be a number in \[0, 0.5\], got 0.6"),
        ("color_jitter", {"brightness": -0.1}, r"brightness must be a number in \[0, inf\], got -0.1"),
        ("clip_swap", {"fraction": 0.0}, r"fraction must be in \(0, 1\], got 0.0"),
        ("mask", {"mode": "tubes"}, "mode must be 'frames' or 'patches', got 'tubes'"),
        ("mask", {"patch_size": 0}, "patch_size must be a positive integer or a pair of them, got 0"),
        ("mask", {"fill": "median"}, "fill must be a finite number or 'mean', got 'median'"),
    ],
)
def test_bad_parameters_name_the_parameter_and_value(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_augmentation(name, **kwargs)


@pytest.mark.parametrize(
    "aug, clip, match",
    [
        (Reverse(), torch.zeros(C, H, W), r"4-D \(T, C, H, W\), got shape \(3, 16, 16\)"),
        (GaussianBlur(), torch.zeros(1, T, C, H, W), r"got shape \(1, 8, 3, 16, 16\)"),
        (Shuffle(), torch.zeros(1, C, H, W), r"at least 2 frames, got shape \(1, 3, 16, 16\)"),
        (FrameDrop(), torch.zeros(1, C, H, W), r"at least 2 frames, got shape \(1, 3, 16, 16\)"),
        (FrameRepeat(), torch.zeros(1, C, H, W), r"at least 2 frames, got shape \(1, 3, 16, 16\)"),
        (SpatialCrop(), torch.zeros(T, C, 0, W), r"empty dimension, shape \(8, 3, 0, 16\)"),
        (ColorJitter(), torch.zeros(T, 1, H, W), r"RGB clips \(C = 3\), got shape \(8, 1, 16, 16\)"),
        (FrameMask(fill=300), index_clip(), "fill 300 is outside the range of torch.uint8"),
    ],
)
def test_bad_clips_raise_with_the_shape_or_value(aug, clip, match):
    with pytest.raises(ValueError, match=match):
        aug(clip, gen())


def test_single_frame_clips_where_allowed():
    one = random_clip(num_frames=1)
    for aug in (Reverse(), SpeedChange(2.0), StaticClip(), GaussianBlur(), ColorJitter(), FrameMask()):
        assert aug(one, gen()).shape == one.shape
    assert torch.equal(Reverse()(one, gen()), one)


def test_clips_identical():
    x = random_clip()
    y = x.clone()
    assert clips_identical(x, y)
    y[3, 1, 2, 2] ^= 1  # one unit in one pixel
    assert not clips_identical(x, y) and not clips_identical(x, y, atol=5)  # integers compare exactly
    f = x.float() / 255
    g = f.clone()
    g[0, 0, 0, 0] += 1e-4
    assert not clips_identical(f, g) and clips_identical(f, g, atol=1e-3)
    assert not clips_identical(f, f[:-1])
    g[0, 0, 0, 0] = float("nan")
    assert not clips_identical(g, g, atol=1.0)
    assert clips_identical(x, x.float())  # values compared across dtypes
    with pytest.raises(ValueError, match="atol must be >= 0, got -1"):
        clips_identical(x, x, atol=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(VIDEO_AUGMENTATIONS))
def test_cuda_clip_with_a_cpu_generator_matches_cpu(name):
    x = random_clip(torch.float32)
    aug = build_augmentation(name)
    cpu = aug(x, gen(0), others=others_for(x))
    cuda = aug(x.cuda(), gen(0), others=[o.cuda() for o in others_for(x)])
    assert cuda.device.type == "cuda" and cuda.dtype == x.dtype
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-5)
