"""Small (T, C, H, W) clips for the video augmentation tests: index-coded, random, and a batch's others."""

from __future__ import annotations

import torch

T, C, H, W = 8, 3, 16, 16
SEEDS = range(20)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def index_clip(num_frames: int = T, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """(T, C, H, W) with frame t filled with the value t: a temporal transform's map is readable."""
    return torch.arange(num_frames, dtype=dtype).view(-1, 1, 1, 1).expand(num_frames, C, H, W).contiguous()


def indices(clip: torch.Tensor) -> list[int]:
    """The source index of every frame of a transformed index-coded clip (all pixels must agree)."""
    first = clip[:, :1, :1, :1]
    assert torch.equal(clip, first.expand_as(clip)), "a temporal transform changed pixels within a frame"
    return [int(v) for v in first.flatten()]


def random_clip(dtype: torch.dtype = torch.uint8, seed: int = 123, num_frames: int = T) -> torch.Tensor:
    g = gen(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, (num_frames, C, H, W), generator=g, dtype=torch.uint8)
    return torch.rand(num_frames, C, H, W, generator=g, dtype=torch.float64).to(dtype)


def others_for(clip: torch.Tensor) -> list[torch.Tensor]:
    return [(clip.double() * 0 + 200 + i).to(clip.dtype) for i in range(3)]
