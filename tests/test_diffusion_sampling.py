"""Sampling from a diffusion policy (the sampler, the grid, ``DiffusionSamples``, ``mmpo sample``) and the
plain denoising (SFT) stage, on tiny random-init SD 1.5 and SD3 diffusion_builds loaded with ``from_pretrained``.

The reference images come from diffusers' own pipeline loaded from the saved checkpoint (and its own
``load_lora_weights``), not from the code under test.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from PIL import Image  # noqa: E402

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.backbones.diffusion_model import load_diffusion_model  # noqa: E402
from mmpo.cli import MMPOCLI, main  # noqa: E402
from mmpo.diffusion_sampling import DiffusionSamples  # noqa: E402
from mmpo.losses import DPOLoss, SFTLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402
from mmpo.sampling import SampleSettings, pipeline_for, sample_grid, sampling_scheduler, save_grid  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square above a green triangle", "a yellow star"]
FAST = SampleSettings(seed=0, rows=1, num_inference_steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion-pairs")
    write_diffusion_pairs(root, n=16, seed=0, image_size=32)
    write_diffusion_pairs(root, n=16, seed=0, image_size=32, split="val")  # held out: other scenes
    return root


def lora_backbone(path: Path) -> DiffusionBackbone:
    return DiffusionBackbone(
        str(path), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    )


def perturbed(backbone: DiffusionBackbone, seed: int = 0):
    """The backbone's policy with adapter weights that change the denoiser (a fresh adapter is the identity)."""
    model = backbone.build()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def base_pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_sampler_is_seeded_per_prompt_and_the_disabled_adapter_is_the_base_pipeline(kind, diffusion_builds):
    backbone = lora_backbone(diffusion_builds[kind])
    model = perturbed(backbone).train()  # as the module trains it
    pipe = pipeline_for(model, sampling_scheduler(str(diffusion_builds[kind])))
    grid = sample_grid(pipe, PROMPTS, FAST)
    assert grid.shape == (1, 3, 3, 32, 32) and 0 <= grid.min() and grid.max() <= 1
    assert torch.equal(grid, sample_grid(pipe, PROMPTS, FAST))  # the same seed: the same images
    other = sample_grid(pipe, PROMPTS, SampleSettings(seed=1, num_inference_steps=4, guidance_scale=5.0))
    assert all(not torch.allclose(grid[0, i], other[0, i]) for i in range(3))  # another seed: other images
    # a prompt's image does not depend on the prompts beside it
    alone = sample_grid(pipe, PROMPTS[2:], FAST)
    torch.testing.assert_close(alone[0, 0], grid[0, 2], atol=1e-5, rtol=0)
    with backbone.adapters_disabled(model):
        reference = sample_grid(pipe, PROMPTS, FAST)
    assert torch.equal(reference, sample_grid(base_pipeline(diffusion_builds[kind]), PROMPTS, FAST))
    assert not torch.allclose(reference, grid)  # and the adapter changes what is drawn
    assert model.denoiser.training  # sampled in eval mode, then put back


@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_a_half_precision_policy_samples_beside_its_float32_vae(kind, diffusion_builds):
    # the SDXL and SD3 configs load the denoiser and text encoders in bfloat16, the VAE stays float32
    model = DiffusionBackbone(str(diffusion_builds[kind]), dtype="bfloat16").build()
    assert model.denoiser.dtype == torch.bfloat16 and model.vae.dtype == torch.float32
    pipe = pipeline_for(model, sampling_scheduler(str(diffusion_builds[kind])))
    settings = SampleSettings(num_inference_steps=2, guidance_scale=5.0)
    grid = sample_grid(pipe, PROMPTS[:2], settings)
    assert grid.dtype == torch.float32 and grid.shape == (1, 2, 3, 32, 32) and torch.isfinite(grid).all()
    assert torch.equal(grid, sample_grid(pipe, PROMPTS[:2], settings))


def test_grid_png_is_rows_by_columns_of_images(diffusion_builds, tmp_path):
    pipe = base_pipeline(diffusion_builds["sd15"])
    settings = SampleSettings(seed=3, rows=2, num_inference_steps=2, guidance_scale=1.0, resolution=16)
    grid = sample_grid(pipe, PROMPTS, settings)  # (2, 3, 3, 16, 16)
    path = save_grid(grid, tmp_path / "grid.png", PROMPTS)
    image = np.asarray(Image.open(path))
    assert image.shape == (2 * 16, 3 * 16, 3)
    # row 1, column 2 is the third prompt's image at seed 4
    cell = torch.from_numpy(image[16:32, 32:48].copy()).permute(2, 0, 1).float()
    assert torch.equal(cell, (grid[1, 2] * 255).round())
    assert (tmp_path / "grid.txt").read_text().splitlines() == [f"column {i}: {p}" for i, p in enumerate(PROMPTS)]


def _fit(module, pairs, steps, callbacks, logger=False, root=None) -> list[float]:
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(), *callbacks],
        default_root_dir=root, log_every_n_steps=1,
    )  # fmt: skip
    dm = DiffusionPreferenceDataModule(
        train_file=str(pairs / "train.jsonl"), resolution=32, loader={"batch_size": 4, "shuffle": False}
    )
    trainer.fit(module, dm)
    return losses


def dpo_module(path: Path, lr: float) -> PreferenceModule:
    return PreferenceModule(
        lora_backbone(path), DPOLoss(beta=2500.0), optimizer=lambda p: torch.optim.AdamW(p, lr=lr),
        reference="adapter", keep_host_memory=False,
    )  # fmt: skip


def test_callback_draws_the_reference_once_and_the_policy_every_n_steps(diffusion_builds, pairs, tmp_path):
    samples = DiffusionSamples(PROMPTS[:2], every_n_steps=2, rows=2, num_inference_steps=4, guidance_scale=5.0)
    logger = TensorBoardLogger(tmp_path / "tb", name="", version=0)
    torch.manual_seed(0)
    losses = _fit(dpo_module(diffusion_builds["sd15"], lr=0.05), pairs, 5, [samples], logger, tmp_path)
    out = tmp_path / "samples"
    names = ["reference", "step_000002", "step_000004", "step_000005"]  # 5: the last step
    assert samples.written == [out / f"{n}.png" for n in names]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{n}.png" for n in names)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    logged = {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert logged == {"samples/reference": [(0, 64, 64)], "samples/policy": [(2, 64, 64), (4, 64, 64), (5, 64, 64)]}
    grids = {n: np.asarray(Image.open(out / f"{n}.png")) for n in names}
    base = sample_grid(base_pipeline(diffusion_builds["sd15"]), PROMPTS[:2], samples.settings)
    assert np.array_equal(grids["reference"], np.asarray(Image.open(save_grid(base, tmp_path / "base.png"))))
    assert not np.array_equal(grids["step_000005"], grids["reference"])  # the trained adapter draws otherwise
    # sampling consumed none of the training run's random draws: the same losses without the callback
    torch.manual_seed(0)
    assert _fit(dpo_module(diffusion_builds["sd15"], lr=0.05), pairs, 5, []) == losses


def test_mmpo_sample_writes_the_saved_adapters_images(diffusion_builds, tmp_path):
    backbone = lora_backbone(diffusion_builds["sd15"])
    model = perturbed(backbone)
    backbone.save(model, tmp_path / "lora")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[1]}\n\n{PROMPTS[2]}\n")
    common = ["--prompts-file", str(prompts_file), "--rows", "2", "--steps", "4", "--guidance", "5", "--seed", "7"]
    sd15 = str(diffusion_builds["sd15"])
    main(["sample", sd15, PROMPTS[0], "--lora", str(tmp_path / "lora"), "-o", str(tmp_path / "lora.png")] + common)
    main(["sample", str(diffusion_builds["sd15"]), PROMPTS[0], "-o", str(tmp_path / "base.png")] + common)
    tuned, base = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("lora", "base"))
    assert tuned.shape == base.shape == (2 * 32, 3 * 32, 3)
    assert (tmp_path / "lora.txt").read_text().splitlines()[2] == f"column 2: {PROMPTS[2]}"
    settings = SampleSettings(seed=7, rows=2, num_inference_steps=4, guidance_scale=5.0)
    # diffusers' load_lora_weights of the saved file draws what the trained model draws (to 8-bit rounding)
    trained = sample_grid(pipeline_for(model, sampling_scheduler(str(diffusion_builds["sd15"]))), PROMPTS, settings)
    expected = np.asarray(Image.open(save_grid(trained, tmp_path / "trained.png"))).astype(int)
    assert np.abs(tuned - expected).max() <= 1
    assert np.abs(tuned - base).max() > 10  # the adapter changes the images


def sft_module(path: Path, lr: float) -> PreferenceModule:
    return PreferenceModule(
        lora_backbone(path), SFTLoss(), optimizer=lambda p: torch.optim.AdamW(p, lr=lr), reference="none",
        keep_host_memory=False,
    )  # fmt: skip


def test_sft_loss_is_the_winners_mean_squared_denoising_error(diffusion_builds, pairs):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = diffusion_builds["sd15"]
    module = sft_module(path, lr=0.0)
    module.configure_model()
    assert module.reference_mode == "none"
    dm = DiffusionPreferenceDataModule(
        train_file=str(pairs / "train.jsonl"), resolution=32, loader={"batch_size": 4, "shuffle": False}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    out, policy, reference = module.compute(batch)
    assert reference is None
    # by hand, from the components loaded on their own: ε-prediction error of image 0 (the winner) of each pair
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    alphas = DDPMScheduler.from_pretrained(path, subfolder="scheduler").alphas_cumprod
    draw = batch.noise_draw  # the (t, ε) the module drew for this batch
    b = batch.num_groups
    with torch.no_grad():
        x0 = vae.encode(batch.pixel_values[:b]).latent_dist.mean * vae.config.scaling_factor  # winners
        a = alphas[draw.timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * draw.noise
        ids = tokenizer(
            batch.captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        text = encoder(ids.input_ids).last_hidden_state
        prediction = unet(noisy, draw.timesteps, encoder_hidden_states=text).sample
    winners = (prediction - draw.noise).pow(2).mean()
    assert out.losses.mean().item() == pytest.approx(winners.item(), rel=1e-5)
    assert out.losses.mean().item() != pytest.approx(-policy.logps[:, 1].mean().item(), rel=1e-3)  # not the losers
    out.losses.mean().backward()
    grads = [p.grad for n, p in module.policy.denoiser.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def heldout_winner_error(module: PreferenceModule, pairs: Path) -> float:
    """Mean denoising error of the held-out pairs' preferred images, at noise fixed by each record's id."""
    dm = DiffusionPreferenceDataModule(
        train_file=str(pairs / "val.jsonl"), resolution=32, center_crop=True, random_flip=False,
        loader={"batch_size": 8, "shuffle": False},
    )  # fmt: skip
    dm.setup("fit")
    policy = module.policy.eval()
    with torch.no_grad():
        errors = [-module.backbone.statistics(policy, batch).logps[:, 0] for batch in dm.train_dataloader()]
    return torch.cat(errors).mean().item()


def test_sft_fit_lowers_the_heldout_denoising_error(diffusion_builds, pairs, tmp_path):
    module = sft_module(diffusion_builds["sd15"], lr=1e-2)
    module.configure_model()
    before = heldout_winner_error(module, pairs)
    torch.manual_seed(0)
    losses = _fit(module, pairs, 24, [], root=tmp_path)
    after = heldout_winner_error(module, pairs)
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    print(f"held-out winners' denoising error: {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before, (before, after)


def test_mmpo_sample_loads_a_fully_fine_tuned_denoiser(diffusion_builds, tmp_path):
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]))  # no LoRA: save() writes the whole denoiser
    model = backbone.build()
    with torch.no_grad():
        model.denoiser.conv_out.bias.add_(0.5)  # a visible change
    backbone.save(model, tmp_path / "unet")
    main(
        [
            "sample",
            str(diffusion_builds["sd15"]),
            *PROMPTS[:2],
            "--denoiser",
            str(tmp_path / "unet"),
            "--steps",
            "4",
            "-o",
            str(tmp_path / "ft.png"),
        ]
    )
    settings = SampleSettings(seed=0, num_inference_steps=4, guidance_scale=7.5)
    trained = sample_grid(pipeline_for(model, sampling_scheduler(str(diffusion_builds["sd15"]))), PROMPTS[:2], settings)
    expected = np.asarray(Image.open(save_grid(trained, tmp_path / "trained.png"))).astype(int)
    base_grid = sample_grid(base_pipeline(diffusion_builds["sd15"]), PROMPTS[:2], settings)
    base = np.asarray(Image.open(save_grid(base_grid, tmp_path / "b.png")))
    written = np.asarray(Image.open(tmp_path / "ft.png")).astype(int)
    assert np.abs(written - expected).max() <= 1 and np.abs(written - base.astype(int)).max() > 10


SFT_CONFIG = REPO / "configs" / "diffusion" / "sd15_sft_lora.yaml"


def _header_command(config: Path) -> str:
    (command,) = [
        line.split("#", 1)[1].strip() for line in config.read_text().splitlines() if line.startswith("#   mmpo")
    ]
    return command


def test_sft_config_parses_and_builds(diffusion_builds, monkeypatch):
    spec = yaml.safe_load(SFT_CONFIG.read_text())
    tiny = diffusion_builds["sd15"]
    monkeypatch.setattr(
        DiffusionBackbone, "load_pretrained", lambda self, *args: load_diffusion_model(str(tiny), None, self.dtype)
    )
    cli = MMPOCLI(args=["--config", str(SFT_CONFIG), "--trainer.accelerator=cpu", "--trainer.devices=1"], run=False)
    module = cli.model
    assert type(module.loss) is SFTLoss and module.reference_mode == "none"
    assert (
        module.backbone.model_name_or_path == spec["model"]["init_args"]["backbone"]["init_args"]["model_name_or_path"]
    )
    (samples,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DiffusionSamples)]
    callback = spec["trainer"]["callbacks"][-1]["init_args"]
    assert samples.prompts == callback["prompts"] and samples.every_n_steps == callback["every_n_steps"]
    assert samples.settings.rows == callback["rows"] and samples.settings.guidance_scale == callback["guidance_scale"]
    module.configure_model()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (
        module.configure_optimizers().param_groups[0]["lr"]
        == spec["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    )


@pytest.mark.slow
def test_sft_config_header_command_trains_saves_and_samples(diffusion_builds, pairs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    argv = [a.replace("YOUR/train.jsonl", str(pairs / "train.jsonl")) for a in shlex.split(_header_command(SFT_CONFIG))]
    assert argv[:3] == ["mmpo", "fit", "--config"]
    monkeypatch.chdir(REPO)
    main(
        argv[1:]
        + [
            f"--model.init_args.backbone.init_args.model_name_or_path={diffusion_builds['sd15']}",
            f"--model.init_args.save_dir={tmp_path / 'out'}",
            "--data.init_args.resolution=32",
            "--data.init_args.loader.num_workers=0",
            "--data.init_args.loader.batch_size=4",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            "--trainer.accumulate_grad_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    weights = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert weights and {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {4}
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["reference.png", "step_000002.png"]  # every 250 steps: only the reference and the last step
    assert Image.open(tmp_path / "samples" / "reference.png").size == (3 * 32, 2 * 32)  # 3 prompts × 2 rows
