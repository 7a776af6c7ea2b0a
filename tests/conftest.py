"""Shared fixtures: small shapes and video worlds and tiny LLaVA models, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# the tiny model families and their first batches (tiny, pair_files, batches), session-scoped
pytest_plugins = ["helpers.families"]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from datamodules.worlds.shapes import write_shapes_world

    root = tmp_path_factory.mktemp("world")
    write_shapes_world(root, n_train=48, n_val=16, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava", words=vocabulary(), seed=0)


@pytest.fixture(scope="session")
def video_world(tmp_path_factory) -> dict:
    """A small video world (mp4 clips of 8 frames, 32 pixels): its ``write_video_world`` summary."""
    from datamodules.worlds.video import write_video_world

    return write_video_world(tmp_path_factory.mktemp("video-world"), n_train=6, n_val=2, num_frames=8, size=32)


@pytest.fixture(scope="session")
def video_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA-NeXT-Video (32-pixel frames) over the shapes world's words."""
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("vmodel") / "tiny", vocabulary(), image_size=32, video=True)


@pytest.fixture(scope="session")
def diffusion_builds(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD 1.5 (ε and v prediction), SDXL and SD3 checkpoints over the shapes world's words, and a tiny
    Wan 2.1 text-to-video checkpoint over the video world's."""
    from datamodules.worlds import video
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.diffusion import build_tiny_sd, build_tiny_sd3, build_tiny_wan

    root, words = tmp_path_factory.mktemp("tiny-diffusion"), vocabulary()
    return {
        "sd15": build_tiny_sd(root / "sd15", words),
        "sd15-v": build_tiny_sd(root / "sd15-v", words, prediction_type="v_prediction"),
        "sdxl": build_tiny_sd(root / "sdxl", words, variant="sdxl"),
        "sd3": build_tiny_sd3(root / "sd3", words),
        "wan": build_tiny_wan(root / "wan", video.vocabulary()),
    }


@pytest.fixture(scope="session")
def processor(tiny_llava):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava)


@pytest.fixture(scope="module")
def first_batch(world, tiny_llava):
    """The world's first four training pairs, in file order, as one batch."""
    from datamodules import ImagePreferenceDataModule

    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 4, "shuffle": False}
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))
