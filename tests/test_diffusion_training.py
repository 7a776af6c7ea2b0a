"""Diffusion-DPO through ``PreferenceModule`` and the shared loss core, and the diffusion configs.

Training runs on tiny random-init UNet and SD3 diffusion_builds over synthetic shapes-world pairs; the configs for
SD 1.5, SDXL and SD3 medium are parsed and built with loading pointed at the tiny diffusion_builds, and their
header commands run for one step.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

import lightning as L  # noqa: E402
from helpers.diffusion import tiny_run_args, tiny_trajectory_pairs, write_video_pairs  # noqa: E402

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from datamodules.diffusion.ranked import write_diffusion_lists  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.backbones.diffusion_model import load_diffusion_model  # noqa: E402
from mmpo.cli import MMPOCLI, main  # noqa: E402
from mmpo.losses import DPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "diffusion").glob("*.yaml"))
TINY_FOR = {  # the real checkpoint of each config -> the tiny build standing in for it
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": "wan",
}
TINY_FRAMES = 9  # a video config's clips on its tiny build (4n + 1 frames)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-pairs")
    write_diffusion_pairs(root, n=8, seed=0, image_size=32)
    return root


@pytest.fixture(scope="module")
def command_data(pairs, diffusion_builds, tmp_path_factory) -> dict[str, Path]:
    """The data each header command's placeholder stands for: pairs, pairs with a second caption (DCPO), lists."""
    dual, lists = tmp_path_factory.mktemp("dcpo-pairs"), tmp_path_factory.mktemp("ranked-lists")
    scored = tmp_path_factory.mktemp("scored-pairs")
    videos = write_video_pairs(tmp_path_factory.mktemp("video-pairs"), n=4, frames=TINY_FRAMES)
    return {
        "trajectories": tiny_trajectory_pairs(diffusion_builds["sd15"], tmp_path_factory.mktemp("trajectories")),
        "videos": videos,
        "pairs": pairs / "train.jsonl",
        "dual": write_diffusion_pairs(dual, n=8, seed=0, image_size=32, caption_rejected=True),
        "lists": write_diffusion_lists(lists, n=8, k=3, seed=0, image_size=32),
        "scored": write_diffusion_pairs(scored, n=8, seed=0, image_size=32, score_fraction=1.0),
    }


def datamodule(pairs: Path, batch_size: int = 4) -> DiffusionPreferenceDataModule:
    return DiffusionPreferenceDataModule(
        train_file=str(pairs / "train.jsonl"), resolution=32, loader={"batch_size": batch_size, "shuffle": False}
    )


def preference_module(path: Path, beta: float, lr: float, lora: bool = True) -> PreferenceModule:
    """LoRA with the disabled-adapter reference, or the whole denoiser with a frozen copy as reference."""
    settings = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS) if lora else None
    return PreferenceModule(
        DiffusionBackbone(str(path), lora=settings),
        DPOLoss(beta=beta),
        optimizer=lambda params: torch.optim.AdamW(params, lr=lr),
        reference="adapter" if lora else "copy",
        keep_host_memory=False,
    )


def first_batch(pairs: Path):
    dm = datamodule(pairs)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def adapter_weights(module: PreferenceModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.denoiser.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind,beta,lora", [("sd15", 2500.0, True), ("sd3", 50.0, True), ("sd15", 2500.0, False)])
def test_a_gradient_step_lowers_the_loss_at_the_same_noise(kind, beta, lora, diffusion_builds, pairs):
    module = preference_module(diffusion_builds[kind], beta, lr=0.0, lora=lora)  # β: the configs'
    module.configure_model()
    assert module.reference_mode == ("adapter" if lora else "copy")
    batch = first_batch(pairs)
    out, policy, reference = module.compute(batch)
    # a fresh adapter (or a copy) is the identity: the policy is its reference, every log-ratio 0, the loss log 2
    torch.testing.assert_close(policy.logps.detach(), reference.logps)
    assert out.losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    out.losses.mean().backward()
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p -= 0.1 * p.grad / max(p.grad.norm().item(), 1e-12)  # a small step against each gradient
    after, _, _ = module.compute(batch)  # the same batch object: the same (t, ε)
    assert after.losses.mean().item() < math.log(2) - 1e-4


@pytest.mark.parametrize("kind,beta", [("sd15", 2500.0), ("sd3", 50.0)])
def test_diffusion_dpo_fit_moves_the_adapter_and_keeps_the_reference(kind, beta, diffusion_builds, pairs):
    module = preference_module(diffusion_builds[kind], beta, lr=1e-3)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
    )  # fmt: skip
    module.configure_model()
    start = adapter_weights(module)
    trainer.fit(module, datamodule(pairs))
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the fresh adapter is the reference
    assert losses[1:] != [pytest.approx(math.log(2), abs=1e-6)] * 3  # later steps see a moved adapter
    metrics = trainer.callback_metrics
    assert {"train/rewards/accuracies", "train/logps/chosen", "train/rewards/margins"} <= set(metrics)
    end = adapter_weights(module)
    moved = [n for n in start if not torch.equal(start[n], end[n])]
    assert moved and all(n in moved for n in start if "lora_B" in n)
    assert all(end[n].abs().sum() > 0 for n in end if "lora_B" in n)  # B left zero, the adapter now acts
    # the reference (adapter off) is still the checkpoint's denoiser, exactly
    plain = DiffusionBackbone(str(diffusion_builds[kind]))
    batch = first_batch(pairs)
    policy = module.policy.eval()
    with torch.no_grad():
        with module.backbone.adapters_disabled(policy):
            reference = module.backbone.statistics(policy, batch)
        base = plain.statistics(plain.build().eval(), batch)
        trained = module.backbone.statistics(policy, batch)
    assert torch.equal(reference.logps, base.logps)
    assert not torch.allclose(trained.logps, base.logps)


def _header_commands(config: Path) -> list[str]:
    commands = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        if match := re.match(r"#\s+(mmpo .*)", line):
            commands.append(match.group(1))
    return commands


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_diffusion_configs_parse_and_instantiate(config, diffusion_builds, monkeypatch):
    spec = yaml.safe_load(config.read_text())
    model_args = spec["model"]["init_args"]
    backbone_args = dict(model_args["backbone"]["init_args"])
    tiny = diffusion_builds[TINY_FOR[backbone_args["model_name_or_path"]]]
    # loading is pointed at the tiny build; everything else is the config as written
    monkeypatch.setattr(
        DiffusionBackbone, "load_pretrained", lambda self, *args: load_diffusion_model(str(tiny), None, self.dtype)
    )
    cli = MMPOCLI(args=["--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    assert len(_header_commands(config)) == 1
    module, backbone = cli.model, cli.model.backbone
    assert type(backbone) is DiffusionBackbone and module.reference_mode == model_args["reference"]
    assert getattr(module.loss, "beta", None) == model_args["loss"].get("init_args", {}).get("beta")
    lora = backbone_args.pop("lora")["init_args"]
    for key, value in backbone_args.items():
        assert getattr(backbone, key) == value, key
    module.configure_model()
    settings = module.policy.peft_config["default"]
    assert (settings.r, settings.lora_alpha, settings.lora_dropout) == (lora["r"], lora["alpha"], lora["dropout"])
    assert set(settings.target_modules) == set(lora["target_modules"])
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in module.policy.denoiser.named_parameters() if ".lora_A" in n}
    assert all(any(n.endswith(t) for n in adapted) for t in lora["target_modules"])  # every target matched
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.shape[0] for n, p in trainable.items() if "lora_A" in n} == {lora["r"]}
    optimizer = module.configure_optimizers()
    assert optimizer.param_groups[0]["lr"] == model_args["optimizer"]["init_args"]["lr"]
    data_args = spec["data"]["init_args"]
    assert cli.datamodule.resolution == data_args.get("resolution", 512)  # trajectories (D3PO) need none
    assert cli.datamodule.frames == data_args.get("frames")
    assert cli.datamodule.loader.batch_size == data_args["loader"]["batch_size"]
    assert cli.trainer.precision == spec["trainer"]["precision"]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_header_command_runs_on_a_tiny_model(config, diffusion_builds, command_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    spec = yaml.safe_load(config.read_text())
    (command,) = _header_commands(config)
    data = {"YOUR/train.jsonl": command_data["dual" if "dcpo" in config.stem else "pairs"]}  # DCPO: two captions
    data["YOUR/ranked.jsonl"] = command_data["lists"]
    data["YOUR/scored.jsonl"] = command_data["scored"]  # SmPO: scores on every record
    data["YOUR/videos.jsonl"] = command_data["videos"]  # Wan: pairs of mp4 clips
    data["YOUR/trajectories.jsonl"] = command_data["trajectories"]  # D3PO: sampled trajectory pairs
    argv = shlex.split(command)[1:]
    for placeholder, file in data.items():
        argv = [a.replace(placeholder, str(file)) for a in argv]
    tiny = diffusion_builds[TINY_FOR[spec["model"]["init_args"]["backbone"]["init_args"]["model_name_or_path"]]]
    monkeypatch.chdir(REPO)
    frames = [f"--data.init_args.frames={TINY_FRAMES}"] if spec["data"]["init_args"].get("frames") else []
    main(argv + tiny_run_args(tiny, tmp_path) + frames)
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    rank = spec["model"]["init_args"]["backbone"]["init_args"]["lora"]["init_args"]["r"]
    assert weights and {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {rank}


def test_smpo_on_the_backbone_is_the_official_formula_and_names_records_without_scores(diffusion_builds, tmp_path):
    from mmpo.losses import SmPOLoss, smoothed_preference

    scored = write_diffusion_pairs(tmp_path / "scored", n=8, seed=0, image_size=32, score_fraction=1.0)
    module = preference_module(diffusion_builds["sd15"], 1000.0, lr=1e-3)
    module.loss = SmPOLoss(beta=1000.0)
    module.configure_model()
    batch = first_batch(scored.parent)
    out, _, _ = module.compute(batch)
    torch.testing.assert_close(out.losses.detach(), torch.full((4,), math.log(2)))  # fresh adapter: Δ = 0
    with torch.no_grad():  # move the adapter, then compare with the official script's formula on the errors
        for n, p in module.policy.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
        out, policy, reference = module.compute(batch)
    e_theta, e_ref = -policy.logps, -reference.logps  # (B, 2) mean squared denoising errors, winner first
    p = smoothed_preference(batch.scores[:, 0], batch.scores[:, 1])
    inside = -0.5 * 2000.0 * (2 * p - 1) * 10 * ((e_theta[:, 0] - e_theta[:, 1]) - (e_ref[:, 0] - e_ref[:, 1]))
    torch.testing.assert_close(out.losses, -torch.nn.functional.logsigmoid(inside))
    assert not torch.allclose(out.losses, torch.full((4,), math.log(2)))
    mixed = write_diffusion_pairs(tmp_path / "mixed", n=8, seed=0, image_size=32, score_fraction=0.5)
    batch = first_batch(mixed.parent)
    labelled = [r["id"] for r in map(json.loads, mixed.read_text().splitlines()) if "scores" not in r]
    assert 0 < len([i for i in batch.ids if i in labelled]) < 4
    with pytest.raises(ValueError, match=re.escape(str([i for i in batch.ids if i in labelled]))):
        module.compute(batch)
