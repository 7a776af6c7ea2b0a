"""DDP with two CPU processes (gloo) trains exactly like one process with the same global batch."""

import functools

import lightning as L
import pytest
import torch
from helpers.trainers import quiet_trainer
from safetensors.torch import load_file

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.checkpoint_io import AtomicCheckpointIO
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule


def _fit(world, tiny_llava, out, devices, batch_size, steps=4, reference="auto"):
    L.seed_everything(0, verbose=False)
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(
        backbone,
        DPOLoss(beta=0.1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        save_dir=str(out / "adapter"),
        reference=reference,
        reference_cache_dir=str(out / "cache"),
    )
    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(world / "train.jsonl"), val_file=str(world / "val.jsonl"),
        loader={"batch_size": batch_size, "eval_batch_size": batch_size},
    )  # fmt: skip
    trainer = quiet_trainer(
        devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=steps, limit_val_batches=2,
        val_check_interval=steps, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return load_file(out / "adapter" / "adapter_model.safetensors"), dict(trainer.callback_metrics)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["adapter", "cached"])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(world, tiny_llava, tmp_path, reference):
    single, single_metrics = _fit(world, tiny_llava, tmp_path / "one", 1, 4, reference=reference)
    ddp, ddp_metrics = _fit(world, tiny_llava, tmp_path / "two", 2, 2, reference=reference)
    if reference == "cached":  # rank 0 computed the cache once; both ranks read it
        assert len(list((tmp_path / "two" / "cache").glob("train-*.safetensors"))) == 1
    assert single.keys() == ddp.keys() and single
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-4)
    assert any(v.abs().max() > 0 for k, v in single.items() if "lora_B" in k)  # training moved the adapter
    # validation figures are reduced over both ranks' halves of the same 8 pairs (2 batches per rank)
    for key in ("val/loss", "val/rewards/margins", "val/rewards/accuracies"):
        torch.testing.assert_close(ddp_metrics[key].float(), single_metrics[key].float(), atol=1e-5, rtol=1e-4)
    assert not list((tmp_path / "two").glob(".adapter*"))  # exported once, no partial folder left behind
