"""The LR scheduler a config names is stepped every optimizer step, through a real training run."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from helpers.trainers import quiet_trainer

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_linear_warmup_steps_with_the_optimizer_not_the_batch(world, tiny_llava, tmp_path, accumulate):
    module = PreferenceModule(
        VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, dropout=0.0)),
        DPOLoss(),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.25, total_iters=2),
    )
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2})
    rates = _LearningRates()
    trainer = quiet_trainer(
        max_steps=4, accumulate_grad_batches=accumulate, callbacks=[rates], default_root_dir=str(tmp_path)
    )
    trainer.fit(module, datamodule=dm)
    # LinearLR from 0.25 to 1 over 2 optimizer steps, then constant: one value per optimizer step
    assert rates.seen == pytest.approx([2.5e-4, 6.25e-4, 1e-3, 1e-3])
    assert trainer.global_step == 4
