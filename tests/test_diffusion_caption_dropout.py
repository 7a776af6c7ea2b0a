"""Caption dropout for classifier-free guidance: which groups drop is a pure function of (seed, epoch, index), and a
dropped group is denoised exactly as if its caption were the empty one, from pixels or from the latent cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from mmpo.backbones import DiffusionBackbone  # noqa: E402


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_diffusion_pairs(tmp_path_factory.mktemp("dropout"), n=16, seed=0, image_size=32)


def datamodule(train_file, dropout, **kwargs):
    return DiffusionPreferenceDataModule(
        train_file=str(train_file), val_file=str(train_file), resolution=32, center_crop=True, random_flip=False,
        loader={"batch_size": 16, "shuffle": False, "seed": 3}, caption_dropout=dropout, **kwargs,
    )  # fmt: skip


def test_dropped_groups_are_seeded_per_epoch_and_only_in_training(pairs):
    dm = datamodule(pairs, 0.5)
    dm.setup("fit")
    train = dm.datasets["train"]
    first = [train.caption_dropped(i, 0) for i in range(16)]
    assert first == [train.caption_dropped(i, 0) for i in range(16)]  # reproducible
    assert 2 <= sum(first) <= 14 and first != [train.caption_dropped(i, 1) for i in range(16)]
    batch = next(iter(dm.train_dataloader()))
    assert batch.caption_dropped.tolist() == first
    assert batch.captions == [r.caption for r in train.records]  # the captions themselves are kept
    assert next(iter(dm.val_dataloader())).caption_dropped is None  # evaluation is always conditional
    dm0 = datamodule(pairs, 0.0)
    dm0.setup("fit")
    assert next(iter(dm0.train_dataloader())).caption_dropped is None


def test_bad_dropout_settings_are_refused(pairs):
    with pytest.raises(ValueError, match=r"caption_dropout must be in \[0, 1\)"):
        datamodule(pairs, 1.0)
    with pytest.raises(ValueError, match="dual_captions"):
        datamodule(pairs, 0.1, dual_captions=True)


@pytest.mark.parametrize("cached", [False, True])
def test_a_dropped_group_is_denoised_as_the_empty_caption(pairs, diffusion_builds, tmp_path, cached):
    backbone = DiffusionBackbone(str(diffusion_builds["sdxl"]))  # a pooled embedding too
    model = backbone.build().eval()
    dm = datamodule(pairs, 0.5, **({"cache_dir": str(tmp_path / "cache")} if cached else {}))
    if cached:
        dm.build_cache(**backbone.cache_encoders(model), show_progress=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    dropped = batch.caption_dropped
    assert dropped.any() and not dropped.all()
    empty = dataclasses.replace(
        batch, captions=["" if d else c for c, d in zip(batch.captions, dropped.tolist(), strict=True)],
        caption_dropped=None, text_embeds=None, text_extra={},
    )  # fmt: skip
    if cached:  # the empty-caption batch encodes its captions from pixels: give it the same latents
        empty.latents = batch.latents
    with torch.no_grad():
        got = backbone.statistics(model, batch)
        empty.noise_draw = batch.noise_draw
        want = backbone.statistics(model, empty)
        batch.caption_dropped, batch.noise_draw = None, batch.noise_draw
        conditional = backbone.statistics(model, batch)
    torch.testing.assert_close(got.logps, want.logps, rtol=1e-5, atol=1e-6)
    kept = ~dropped
    torch.testing.assert_close(got.logps[kept], conditional.logps[kept], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.logps[dropped], conditional.logps[dropped])
