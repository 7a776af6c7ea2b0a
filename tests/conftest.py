"""Shared fixtures: a small shapes world and a tiny LLaVA, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


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
