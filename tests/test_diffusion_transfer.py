"""Diffusion batches on their way to the device: ``to()``, ``pin_memory()`` and when loaders pin."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs
from datamodules.diffusion.pairs import DiffusionPreferenceBatch


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion_pairs")
    write_diffusion_pairs(root, n=4, seed=0, image_size=32, split="train")
    return root


def test_batch_to_and_pin_memory_keep_every_field():
    batch = DiffusionPreferenceBatch(
        pixel_values=None,
        captions=["a", "b"],
        label=torch.tensor([1.0, 0.75]),
        scores=torch.tensor([[2.0, 1.0], [float("nan"), float("nan")]]),
        ids=["p0", "p1"],
        skipped=3,
        latents=torch.randn(4, 3, 2, 2),
        text_embeds=torch.randn(2, 5, 8),
        text_extra={"pooled": torch.randn(2, 8)},
    )
    moved = batch.to("cpu", non_blocking=False)
    assert moved.pixel_values is None and moved.ids == ["p0", "p1"] and moved.skipped == 3
    assert torch.equal(moved.latents, batch.latents) and torch.equal(
        moved.text_extra["pooled"], batch.text_extra["pooled"]
    )
    assert torch.equal(moved.scores.isnan(), batch.scores.isnan()) and moved.captions == batch.captions
    if torch.cuda.is_available():  # page-locked memory needs a CUDA device
        pinned = batch.pin_memory()
        assert pinned.label.is_pinned() and pinned.latents.is_pinned() and pinned.text_extra["pooled"].is_pinned()
        assert torch.equal(pinned.to("cuda").latents.cpu(), batch.latents)


def test_loaders_pin_memory_when_training_on_cuda(pairs):
    def trainer_on(device: str):
        return types.SimpleNamespace(current_epoch=0, strategy=types.SimpleNamespace(root_device=torch.device(device)))

    def pins(trainer, **kwargs) -> bool:
        dm = DiffusionPreferenceDataModule(train_file=str(pairs / "train.jsonl"), resolution=32, **kwargs)
        dm.trainer = trainer
        dm.setup("fit")
        return dm.train_dataloader().pin_memory

    assert pins(trainer_on("cuda")) and not pins(trainer_on("cpu"))
    assert not pins(trainer_on("cuda"), loader={"pin_memory": False}) and pins(
        trainer_on("cpu"), loader={"pin_memory": True}
    )
