"""Rounds of iterative training: Curry-DPO's reference refresh and APO's Nesterov step, and exact resume."""

import functools
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from helpers.callbacks import LossesInMemory
from helpers.data import write_ranked
from helpers.trainers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import RankedPreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.iterative import NesterovExtrapolation, ReferenceRefresh, extrapolate
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.reference.refresh import policy_weights, reference_weights

REPO = Path(__file__).resolve().parents[1]
LOG2 = math.log(2.0)


def test_extrapolate_is_the_nesterov_step_on_known_tensors():
    current, previous = torch.tensor([1.0, 2.0, -3.0]), torch.tensor([0.0, 4.0, -3.0])
    torch.testing.assert_close(extrapolate(current, previous, 0.3), torch.tensor([1.3, 1.4, -3.0]))
    torch.testing.assert_close(extrapolate(current, previous, 0.0), current)  # plain iterative DPO
    big = extrapolate(torch.tensor([1e4]), torch.tensor([-1e4]), 0.3)
    assert torch.isfinite(big).all() and big.item() == pytest.approx(1e4 + 0.3 * 2e4)


def test_rounds_follow_epochs_or_the_curriculum_stage():
    trainer = SimpleNamespace(current_epoch=0, datamodule=None)
    every = ReferenceRefresh(every_n_epochs=2)
    assert [every.round_of(SimpleNamespace(current_epoch=e)) for e in range(5)] == [0, 0, 1, 1, 2]
    staged = ReferenceRefresh()
    trainer.datamodule = SimpleNamespace(scheduled_stage=lambda: 1)
    assert staged.round_of(trainer) == 1
    trainer.datamodule = SimpleNamespace(scheduled_stage=lambda: None)  # no epochs_per_stage
    with pytest.raises(ValueError, match="schedules none"):
        staged.round_of(trainer)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1"):
        ReferenceRefresh(every_n_epochs=0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        NesterovExtrapolation(alpha=-0.1)


def _module(tiny_llava, reference: str, lr: float = 5e-3) -> PreferenceModule:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=lora)
    return PreferenceModule(backbone, DPOLoss(beta=0.1), optimizer=optimizer, reference=reference)


@pytest.mark.parametrize("reference", ["extrapolated", "trained"])
def test_nesterov_boundary_moves_the_weights_and_sets_the_reference(tiny_llava, reference):
    module = _module(tiny_llava, "copy")
    module.configure_model()
    apo = NesterovExtrapolation(alpha=0.5, reference=reference)
    apo.fresh_start(module)  # θ̂_0
    start = {n: t.clone() for n, t in apo.previous.items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "round 1 trains": θ̂_1 = θ̂_0 + d
        steps = {n: 0.1 * torch.randn(p.shape, generator=gen) for n, p in policy_weights(module).items()}
        for n, p in policy_weights(module).items():
            p.add_(steps[n])
    apo.boundary(SimpleNamespace(), module)
    after, ref = policy_weights(module), reference_weights(module)
    for n in start:
        trained = start[n] + steps[n]
        torch.testing.assert_close(after[n].detach(), trained + 0.5 * steps[n])  # θ̂_1 + α(θ̂_1 − θ̂_0)
        torch.testing.assert_close(apo.previous[n], trained)  # the next step's θ̂_{t−1} is un-extrapolated
        torch.testing.assert_close(ref[n], after[n].detach() if reference == "extrapolated" else trained)


def _fit(world, tiny_llava, root: Path, ranked: Path, callback, reference: str, steps: int, ckpt: Path | None):
    L.seed_everything(0, verbose=False)
    dm = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(ranked), data_root=str(world), loader={"batch_size": 2},
        curriculum={"stages": 3, "epochs_per_stage": 1},
    )  # fmt: skip
    losses = LossesInMemory()
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)
    callbacks = [losses, checkpoints] if callback is None else [callback, losses, checkpoints]
    trainer = quiet_trainer(
        max_steps=steps, max_epochs=-1, reload_dataloaders_every_n_epochs=1, deterministic=True,
        enable_checkpointing=True, default_root_dir=str(root), callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(_module(tiny_llava, reference), datamodule=dm, ckpt_path=ckpt)
    return losses.losses


@pytest.mark.parametrize(
    ("make", "reference"),
    [(ReferenceRefresh, "adapter"), (functools.partial(NesterovExtrapolation, alpha=0.3, every_n_epochs=None), "copy")],
    ids=["curry-dpo-adapter", "apo-copy"],
)
def test_a_run_stopped_mid_stage_resumes_to_the_losses_of_an_uninterrupted_run(
    world, tiny_llava, tmp_path, make, reference
):
    # 6 ranked records, best_vs_rest: 3 stages of 6 pairs, batch 2, one epoch (3 steps) per stage. The
    # reference moves at steps 4 and 7 (first steps of stages 1 and 2): there the policy is its reference
    # and the DPO loss is log 2. Stopped after step 5, mid stage 1, the run resumes from its checkpoint;
    # step 8 follows the second boundary, whose APO step needs θ̂_{t−1} from the checkpoint.
    ranked = write_ranked(world, tmp_path / "ranked.jsonl")
    straight = _fit(world, tiny_llava, tmp_path / "straight", ranked, make(), reference, 8, None)
    assert len(straight) == 8
    assert straight[3] == pytest.approx(LOG2, abs=1e-6) and straight[6] == pytest.approx(LOG2, abs=1e-6)
    assert all(abs(x - LOG2) > 1e-4 for x in (straight[1], straight[2], straight[4], straight[5], straight[7]))

    stopped = tmp_path / "stopped"
    first = _fit(world, tiny_llava, stopped, ranked, make(), reference, 5, None)
    assert first == pytest.approx(straight[:5], abs=1e-6)
    last = shutil.copy(stopped / "ckpt" / "last.ckpt", tmp_path / "step5.ckpt")  # the resumed run overwrites it
    checkpoint = torch.load(last, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.endswith(make().state_key)]
    assert state["round"] == 1 and state["refreshes"] == 1 and state["reference"]
    assert not any("mmpo_reference" in k for k in checkpoint["state_dict"])

    resumed = _fit(world, tiny_llava, stopped, ranked, make(), reference, 8, last)
    assert resumed == pytest.approx(straight[5:], abs=1e-6)

    # `validate` from the checkpoint evaluates against the reference the run had there
    dm = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(ranked), val_file=str(ranked), data_root=str(world), loader={"batch_size": 2}
    )
    module = _module(tiny_llava, reference)
    quiet_trainer(callbacks=[make()]).validate(module, datamodule=dm, ckpt_path=last)
    restored = reference_weights(module)
    assert restored.keys() == state["reference"].keys()
    assert all(torch.equal(restored[n], state["reference"][n]) for n in restored)

    # without the callback's state the resumed step 6 compares against another reference
    control = _fit(world, tiny_llava, tmp_path / "control", ranked, None, reference, 6, last)
    assert abs(control[0] - straight[5]) > 1e-4


@pytest.mark.parametrize("config", ["configs/ranked/curry_dpo_lora.yaml", "configs/iterative/apo_lora.yaml"])
def test_iterative_configs_parse_and_instantiate(config, tiny_llava, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from mmpo.cli import MMPOCLI

    monkeypatch.setattr(
        VisionLanguageBackbone, "load_pretrained", lambda self: AutoModelForImageTextToText.from_pretrained(tiny_llava)
    )
    spec = yaml.safe_load((REPO / config).read_text())
    cli = MMPOCLI(args=["--config", str(REPO / config), "--trainer.accelerator=cpu"], run=False)
    cli.model.configure_model()
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ReferenceRefresh | NesterovExtrapolation)]
    want = next(c for c in spec["trainer"]["callbacks"] if c["class_path"].startswith("mmpo.iterative."))
    assert type(callback).__name__ == want["class_path"].rsplit(".", 1)[1]
    for key, value in want["init_args"].items():
        assert getattr(callback, key) == value, key
    assert cli.model.reference_mode == spec["model"]["init_args"]["reference"]
    assert cli.trainer.reload_dataloaders_every_n_epochs == spec["trainer"].get("reload_dataloaders_every_n_epochs", 0)
    if type(cli.datamodule).__name__ == "RankedPreferenceDataModule":
        assert cli.datamodule.curriculum.stages * cli.datamodule.curriculum.epochs_per_stage == cli.trainer.max_epochs


def test_snapshot_adapter_weights_stay_out_of_the_module_weights_of_a_checkpoint():
    # with checkpoint_trainable_only=False the frozen snapshot would reach the module's weights, and a resumed
    # run (which adds the adapter only once the callback's state is applied) would meet unexpected keys
    kept = "policy.base_model.model.q_proj.lora_A.default.weight"
    checkpoint = {"state_dict": {kept: torch.ones(1), "policy.base_model.model.q_proj.lora_A.mmpo_reference.weight": 0}}
    ReferenceRefresh().on_save_checkpoint(None, None, checkpoint)
    assert list(checkpoint["state_dict"]) == [kept]


@pytest.mark.slow
def test_curry_dpo_config_header_command_runs_on_a_tiny_model(world, tiny_llava, tmp_path, monkeypatch):
    # the header command with ranked data of the shapes world; 4 steps of batch 2 cross the first stage boundary
    from safetensors.torch import load_file

    from mmpo.cli import main

    config = REPO / "configs/ranked/curry_dpo_lora.yaml"
    (command,) = [line.lstrip("# ") for line in config.read_text().splitlines() if line.startswith("#   mmpo ")]
    ranked = write_ranked(world, tmp_path / "ranked.jsonl")
    argv = [a.replace("YOUR/ranked.jsonl", str(ranked)) for a in command.split()[1:]]
    monkeypatch.chdir(REPO)
    main(
        argv
        + [
            f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
            f"--model.init_args.save_dir={tmp_path / 'out'}",
            f"--data.init_args.data_root={world}",
            "--data.init_args.loader.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.accumulate_grad_batches=1",
            "--trainer.max_steps=4",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    trained = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(trained[k].abs().max() > 0 for k in trained if "lora_B" in k)
    assert not (tmp_path / "out" / "mmpo_reference").exists()  # the export holds the trained adapter alone


def test_reset_optimizer_clears_the_moments_at_a_boundary_only(tiny_llava, first_batch):
    module = _module(tiny_llava, "copy")
    module.configure_model()
    optimizer = module.configure_optimizers()
    out, _, _ = module.compute(first_batch)
    out.losses.mean().backward()
    optimizer.step()
    assert optimizer.state
    trainer = SimpleNamespace(current_epoch=0, optimizers=[optimizer])
    callback = ReferenceRefresh(every_n_epochs=2, reset_optimizer=True)
    for epoch, kept in [(0, True), (1, True), (2, False)]:
        trainer.current_epoch = epoch
        callback.on_train_epoch_start(trainer, module)
        assert bool(optimizer.state) == kept, epoch
    assert callback.refreshes == 1 and callback.round == 1
