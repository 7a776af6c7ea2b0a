"""``reference: cached`` for diffusion: one (t, ε) per record (``noise_per_record``), the reference's statistics
computed once before training, and training that equals the frozen-copy and disabled-adapter references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from helpers.callbacks import LossesInMemory  # noqa: E402
from helpers.diffusion import tiny_trajectory_pairs  # noqa: E402
from helpers.trainers import quiet_trainer  # noqa: E402

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from datamodules.diffusion.trajectories import DiffusionTrajectoryDataModule  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.losses import D3POLoss, DPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_diffusion_pairs(tmp_path_factory.mktemp("cached-ref-pairs"), n=8, seed=0, image_size=32)


def data(path: Path, loader: dict | None = None, **kwargs) -> DiffusionPreferenceDataModule:
    settings = {"resolution": 32, "center_crop": True, "random_flip": False} | kwargs
    loader = {"batch_size": 4, "seed": 3} | (loader or {})
    return DiffusionPreferenceDataModule(train_file=str(path), loader=loader, **settings)


def module(tiny: Path, reference: str, lora: bool, tmp_path: Path, loss=None, **backbone) -> PreferenceModule:
    settings = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS) if lora else None
    return PreferenceModule(
        DiffusionBackbone(str(tiny), lora=settings, noise_per_record=True, **backbone), loss or DPOLoss(beta=2500.0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), reference=reference,
        reference_cache_dir=str(tmp_path / "reference-cache"), keep_host_memory=False,
    )  # fmt: skip


def fit(m: PreferenceModule, dm, steps: int = 4) -> list[float]:
    torch.manual_seed(0)  # the LoRA initialisation, drawn when the trainer builds the model
    record = LossesInMemory()
    quiet_trainer(devices=1, max_steps=steps, callbacks=[record]).fit(m, datamodule=dm)
    return record.losses


def test_a_records_noise_is_the_same_in_training_and_evaluation_and_every_epoch(diffusion_builds, pairs):
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]), noise_per_record=True)
    model = backbone.build()
    dm, small = data(pairs, loader={"shuffle": False}), data(pairs, loader={"batch_size": 2, "shuffle": False})
    dm.setup("fit")
    small.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    other = next(iter(small.train_dataloader()))  # another batch, holding the first two records of this one
    draws = []
    for mode, b in ((True, batch), (False, batch.to("cpu")), (True, other)):
        model.train(mode)
        backbone.statistics(model, b)
        draws.append(b.noise_draw)
    for draw in draws[1:]:
        n = draw.num_groups
        assert torch.equal(draw.noise, draws[0].noise[:n]) and torch.equal(draw.timesteps, draws[0].timesteps[:n])
    fresh = DiffusionBackbone(str(diffusion_builds["sd15"]))
    model.train()
    fresh.statistics(model, copy := batch.to("cpu"))
    assert not torch.equal(copy.noise_draw.noise, draws[0].noise)  # without it, training draws afresh
    with pytest.raises(ValueError, match="noise_per_record draws from eval_seed"):
        DiffusionBackbone(str(diffusion_builds["sd15"]), noise_per_record=True, eval_seed=None)


@pytest.mark.parametrize("lora,live", [(False, "copy"), (True, "adapter")])
def test_cached_reference_trains_as_the_live_reference(diffusion_builds, pairs, tmp_path, lora, live):
    tiny = diffusion_builds["sd15"]
    expected = fit(module(tiny, live, lora, tmp_path), data(pairs))
    cached = module(tiny, "cached", lora, tmp_path)
    losses = fit(cached, data(pairs))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert getattr(cached.reference, "model", None) is None  # no reference model was built or kept
    files = list((tmp_path / "reference-cache").glob("train-*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = fit(module(tiny, "cached", lora, tmp_path), data(pairs), steps=1)  # a second run reads the file
    assert again[0] == pytest.approx(losses[0]) and files[0].stat().st_mtime_ns == stamp


def test_the_cache_is_refused_where_a_records_statistic_changes(diffusion_builds, pairs, tmp_path):
    tiny = diffusion_builds["sd15"]
    plain = PreferenceModule(
        DiffusionBackbone(str(tiny)), DPOLoss(beta=2500.0), reference="cached",
        reference_cache_dir=str(tmp_path / "c"), keep_host_memory=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="training draws a fresh .t, ε. every step; set noise_per_record: true"):
        fit(plain, data(pairs), steps=1)
    with pytest.raises(ValueError, match=r"the train split has \['random_flip'\]: set center_crop: true"):
        fit(module(tiny, "cached", False, tmp_path), data(pairs, random_flip=True), steps=1)
    inverted = module(tiny, "cached", False, tmp_path, noise="inversion")
    with pytest.raises(ValueError, match="noise: inversion estimates each image's noise with the policy"):
        fit(inverted, data(pairs), steps=1)


def test_d3po_caches_every_step_of_every_pair(diffusion_builds, tmp_path):
    tiny = diffusion_builds["sd15"]
    train = tiny_trajectory_pairs(tiny, tmp_path / "trajectories", n=2, steps=4)

    def steps(**kw) -> DiffusionTrajectoryDataModule:
        return DiffusionTrajectoryDataModule(train_file=str(train), steps_per_record=2, loader={"batch_size": 2}, **kw)

    loss = D3POLoss(beta=1.0, clip=0.5)
    expected = fit(module(tiny, "adapter", True, tmp_path, loss=loss), steps(), steps=6)  # three epochs of 2 steps
    m = module(tiny, "cached", True, tmp_path, loss=loss)
    m.backbone.noise_per_record = False  # a recorded step draws no noise: the cache serves D3PO without it
    losses = fit(m, steps(), steps=6)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
