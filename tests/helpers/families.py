"""The tiny families of ``mmpo.tiny.families`` and their first batches, shared by the family test modules.

Session-scoped, so the eleven builds and their batches are made once however many modules use them; a module
gets them as fixtures (``tests/conftest.py`` registers this module as a plugin).
"""

import json

import pytest

from datamodules import ImagePreferenceDataModule, PreferenceBatch
from datamodules.worlds.shapes import vocabulary
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.tiny.families import TINY_FAMILIES

__all__ = ["backbone", "batches", "datamodule", "pair_files", "tiny", "with_fields"]


@pytest.fixture(scope="session")
def pair_files(world, tmp_path_factory):
    """The world's first 4 pairs with 1 image per prompt, and with 2 (the next record's image added)."""
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:4]]
    out = tmp_path_factory.mktemp("family-pairs")
    files = {}
    for n in (1, 2):
        records = [
            {**r, "images": [rows[(i + j) % 4]["images"][0] for j in range(n)], "prompt": "<image> " * n + r["prompt"]}
            for i, r in enumerate(rows)
        ]
        files[n] = out / f"pairs-{n}.jsonl"
        files[n].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``tiny(family)``: the family's checkpoint directory, built on first use."""
    root = tmp_path_factory.mktemp("families")

    def build(family):
        if family == "smolvlm":  # SmolVLMProcessor refuses to start without it; mmpo does not depend on it
            pytest.importorskip("num2words")
        return TINY_FAMILIES[family](root / family, words=vocabulary(), seed=0)

    return build


def datamodule(path, pair_file, world):
    return ImagePreferenceDataModule(
        str(path), train_file=str(pair_file), data_root=str(world), loader={"batch_size": 2, "shuffle": False}
    )


@pytest.fixture(scope="session")
def batches(tiny, pair_files, world):
    """``batches(family, images)``: the first batch (2 pairs) of the 1- or 2-image pairs."""
    cache = {}

    def first(family, images):
        if (family, images) not in cache:
            dm = datamodule(tiny(family), pair_files[images], world)
            dm.setup("fit")
            cache[family, images] = next(iter(dm.train_dataloader()))
        return cache[family, images]

    return first


def backbone(path, **kw):
    """The family's backbone with the tests' LoRA (r 4, alpha 8, no dropout)."""
    return VisionLanguageBackbone(str(path), lora=LoraSettings(r=4, alpha=8, dropout=0.0), **kw)


def with_fields(batch: PreferenceBatch, **fields) -> PreferenceBatch:
    """A copy of ``batch`` with ``fields`` replaced."""
    return PreferenceBatch(**{**batch.__dict__, **fields})
