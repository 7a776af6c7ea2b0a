"""Resuming is exact with LoRA dropout on: the training steps' random streams are saved and restored per rank."""

import functools
import random

import lightning as L
import numpy as np
import pytest
import torch
from helpers.trainers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_resume_kill import _kill_resume_and_compare, _losses
from torch import nn

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.rng_state import CHECKPOINT_KEY, TrainingRandomness, gather, restore

CPU = torch.device("cpu")


def _draws(rng: TrainingRandomness, x: torch.Tensor) -> tuple:
    """A step's draws: a dropout mask from torch, and numbers from Python's random and NumPy."""
    with rng.drawn(CPU):
        return nn.functional.dropout(x, 0.5, training=True), random.random(), float(np.random.rand())


def _round_trip(entry: dict, path) -> dict:
    torch.save({"entry": entry}, path)
    return torch.load(path, weights_only=True)["entry"]  # as the CLI reads checkpoints


def test_streams_resume_exactly_whatever_else_draws_from_the_global_generators(tmp_path):
    torch.manual_seed(0)
    x = torch.ones(64)
    rng = TrainingRandomness()
    first = _draws(rng, x)
    outer = torch.get_rng_state()
    saved = _round_trip(gather(rng, world_size=1), tmp_path / "rng.pt")
    straight = _draws(rng, x)
    assert torch.equal(torch.get_rng_state(), outer)  # a step leaves the process's generator alone
    assert not torch.equal(straight[0], first[0])  # the stream moves on from step to step

    torch.manual_seed(123)  # a resumed process: other seeds, and draws (DataLoader seeds) before the first step
    torch.rand(7), random.random(), np.random.rand()
    resumed = TrainingRandomness()
    assert restore(resumed, saved, rank=0, world_size=1) is None
    again = _draws(resumed, x)
    assert torch.equal(again[0], straight[0]) and again[1:] == straight[1:]


def test_checkpoints_without_streams_or_from_another_world_size_are_refused_with_a_reason():
    rng = TrainingRandomness()
    assert "before mmpo saved them" in restore(rng, None, rank=0, world_size=1)
    entry = {"version": 1, "ranks": [None, None]}
    assert "2 rank(s), this run has 1" in restore(rng, entry, rank=0, world_size=1)
    assert rng.state_dict() is None  # left to start afresh


def test_checkpoints_hold_the_streams_and_old_ones_still_resume_with_one_warning(world, tiny_llava, tmp_path):
    def fit(steps: int, ckpt_path=None) -> L.Trainer:
        L.seed_everything(0, verbose=False)
        lora = LoraSettings(r=4, alpha=8, dropout=0.05)
        module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=lora), DPOLoss(beta=0.1))
        dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 4})
        trainer = quiet_trainer(max_steps=steps, default_root_dir=str(tmp_path))
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return trainer

    path = tmp_path / "step1.ckpt"
    fit(1).save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    entry = checkpoint.pop(CHECKPOINT_KEY)
    assert len(entry["ranks"]) == 1 and entry["ranks"][0]["torch"].dtype == torch.uint8
    torch.save(checkpoint, path)  # as written before the streams were saved
    with pytest.warns(UserWarning, match="LoRA dropout") as caught:
        assert fit(2, ckpt_path=path).global_step == 2
    assert len([w for w in caught if "LoRA dropout" in str(w.message)]) == 1


def _ddp_fit(world, tiny_llava, out, steps: int, ckpt_path=None) -> dict[str, torch.Tensor]:
    """Two gloo processes, LoRA dropout 0.05, a checkpoint after every step; the exported adapter."""
    L.seed_everything(0, verbose=False)
    lora = LoraSettings(r=4, alpha=8, dropout=0.05)
    module = PreferenceModule(
        VisionLanguageBackbone(str(tiny_llava), lora=lora), DPOLoss(beta=0.1),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5), save_dir=str(out / "adapter"),
    )  # fmt: skip
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2})
    every_step = ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        devices=2, strategy="ddp_spawn", max_steps=steps, enable_checkpointing=True, callbacks=[every_step],
        default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_each_ddp_rank_resumes_its_own_streams_from_rank_zeros_file(world, tiny_llava, tmp_path):
    straight = _ddp_fit(world, tiny_llava, tmp_path / "straight", steps=2)
    step1 = tmp_path / "straight" / "ckpt" / "epoch=0-step=1.ckpt"
    ranks = torch.load(step1, weights_only=True)[CHECKPOINT_KEY]["ranks"]
    assert len(ranks) == 2  # gathered from both ranks, written by rank 0
    # the ranks' batches differ in length, so their dropout drew different amounts: restoring one rank's
    # streams on the other would show (2e-3 in the adapter after the resumed step, tried)
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    resumed = _ddp_fit(world, tiny_llava, tmp_path / "resumed", steps=2, ckpt_path=step1)
    assert straight.keys() == resumed.keys() and any("lora_B" in k for k in straight)
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


@pytest.mark.slow
def test_sigkill_then_resume_with_lora_dropout_gives_bit_identical_losses(world, tiny_llava, tmp_path):
    # LoRA dropout 0.05 (the default; the quickstart config sets 0). Epochs cut to 4 steps, checkpoints every
    # 2 steps. Killed after step 5, the run resumes from step 4, the first epoch's last batch (an epoch
    # boundary: the new epoch's loader iterator draws its seed from the global generator); killed again
    # after step 7, it resumes from step 6, in the middle of the second epoch.
    extra = ["--model.init_args.backbone.init_args.lora.init_args.dropout=0.05", "--trainer.limit_train_batches=4"]
    want = _kill_resume_and_compare(world, tiny_llava, tmp_path, (5, 7), 8, extra)
    got = _losses(tmp_path / "killed")
    assert [got[step][0] for step in range(1, 9)] == [want[step][0] for step in range(1, 9)]  # bit-identical
