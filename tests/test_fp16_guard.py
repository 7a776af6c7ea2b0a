"""fp16 with a loss scaler: the scaler's overflow steps are its own business, not non-finite steps.

Lightning maps ``precision="16-mixed"`` to bf16 on a CPU (no scaler), so these runs pass its
``MixedPrecision`` plugin with a ``GradScaler`` explicitly: fp16 autocast and loss scaling do run on
a CPU with torch >= 2.4, so the guard is tested on real overflows, not on a stub.
"""

import lightning as L
import pytest
import torch
from helpers.trainers import quiet_trainer
from lightning.pytorch.plugins.precision import MixedPrecision

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule

INIT_SCALE = 2.0**40  # the scaled gradients overflow fp16 (max 65,504) until the scaler has lowered it


def _fp16(init_scale: float = INIT_SCALE) -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-8, growth_interval=1000)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class _Watch(L.Callback):
    """The loss scale in use and the trainable weights before each step and after the last one."""

    def __init__(self) -> None:
        self.scales: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.scales.append(trainer.precision_plugin.scaler.get_scale())
        self.weights.append(_trainable(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.weights.append(_trainable(pl_module))


def _setup(world, tiny_llava, on_nonfinite="stop"):
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(backbone, DPOLoss(), on_nonfinite=on_nonfinite)
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2})
    return module, dm


def test_scaler_overflow_steps_do_not_stop_the_run(world, tiny_llava, tmp_path):
    module, dm = _setup(world, tiny_llava, on_nonfinite="stop")
    watch = _Watch()
    trainer = quiet_trainer(
        max_steps=4, limit_val_batches=0, plugins=[_fp16()], callbacks=[watch], default_root_dir=str(tmp_path)
    )
    trainer.fit(module, datamodule=dm)  # before: FloatingPointError("non-finite gradient on records ...")
    # the first steps overflowed: the scaler skipped them (weights unchanged) and lowered its scale ...
    scales = [*watch.scales, trainer.precision_plugin.scaler.get_scale()]  # before each step, and at the end
    overflowed = [a > b for a, b in zip(scales, scales[1:], strict=False)]
    assert overflowed[0] and watch.scales[1] == INIT_SCALE * 2.0**-8
    for step, skipped in enumerate(overflowed):
        before, after = watch.weights[step], watch.weights[step + 1]
        moved = any(not torch.equal(before[n], after[n]) for n in before)
        assert moved != skipped, (step, watch.scales)
    # ... until the scale fitted fp16 and training went on; no step was counted as non-finite
    assert not all(overflowed)
    assert "train/nonfinite_steps" not in trainer.callback_metrics
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_nonfinite_loss_still_stops_under_the_scaler(world, tiny_llava, tmp_path):
    module, dm = _setup(world, tiny_llava, on_nonfinite="stop")
    compute = module.compute

    def poisoned(batch, split="train"):
        out, policy, ref = compute(batch, split)
        out.losses = out.losses * float("nan")
        return out, policy, ref

    module.compute = poisoned
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, plugins=[_fp16(2.0**8)], default_root_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match="non-finite train loss"):
        trainer.fit(module, datamodule=dm)
