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


def _filled_batch(with_pixels: bool) -> DiffusionPreferenceBatch:
    """Every field set, each to its own random values, so a dropped or swapped field shows."""
    g = torch.Generator().manual_seed(0)
    return DiffusionPreferenceBatch(
        pixel_values=torch.rand(4, 3, 8, 8, generator=g) * 2 - 1 if with_pixels else None,
        captions=["a", "b"],
        label=torch.tensor([1.0, 0.75]),
        scores=torch.tensor([[2.0, 1.0], [float("nan"), float("nan")]]),
        ids=["p0", "p1"],
        skipped=3,
        latents=None if with_pixels else torch.randn(4, 3, 2, 2, generator=g),
        text_embeds=None if with_pixels else torch.randn(2, 5, 8, generator=g),
        text_extra={} if with_pixels else {"pooled": torch.randn(2, 8, generator=g), "ids": torch.arange(2)},
    )


def _assert_same_batch(moved: DiffusionPreferenceBatch, batch: DiffusionPreferenceBatch) -> None:
    for name in ("pixel_values", "label", "scores", "latents", "text_embeds"):
        a, b = getattr(moved, name), getattr(batch, name)
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # same numbers, same dtype
    assert moved.text_extra.keys() == batch.text_extra.keys()
    for name, value in batch.text_extra.items():
        torch.testing.assert_close(moved.text_extra[name], value, rtol=0, atol=0)
    assert (moved.captions, moved.ids, moved.skipped, moved.num_pairs) == (
        batch.captions,
        batch.ids,
        batch.skipped,
        batch.num_pairs,
    )


@pytest.mark.parametrize("with_pixels", [True, False], ids=["pixels", "cached"])
def test_batch_to_and_pin_memory_keep_every_field(with_pixels):
    batch = _filled_batch(with_pixels)
    moved = batch.to("cpu", non_blocking=False)
    _assert_same_batch(moved, batch)
    moved.ids.append("p2")  # the lists are the moved batch's own
    assert batch.ids == ["p0", "p1"]
    if torch.cuda.is_available():  # page-locked memory needs a CUDA device
        pinned = batch.pin_memory()
        assert pinned.label.is_pinned() and all(t.is_pinned() for t in pinned.text_extra.values())
        on_device = pinned.to("cuda")  # non-blocking copies from pinned memory
        assert on_device.label.device.type == "cuda"
        _assert_same_batch(on_device.to("cpu"), batch)


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
