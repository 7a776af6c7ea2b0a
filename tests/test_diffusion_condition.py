"""Conditioning channels for diffusion: records' ``condition`` tensors, non-square (film-strip) images, the
backbone's concatenation, conditioned sampling and the TLPO demo's strip/condition layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from helpers.diffusion import strip_datamodule  # noqa: E402

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion.media import pair_pixels  # noqa: E402
from datamodules.diffusion.module import DiffusionPreferenceDataModule  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.conditioned_sampling import sample_conditioned  # noqa: E402
from mmpo.losses import DPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

EXTRA = 3  # condition channels of the test model


@pytest.fixture(scope="module")
def conditioned_sd(diffusion_builds, tmp_path_factory):
    """The tiny SD 1.5 with a UNet taking 4 latent + 3 condition channels."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(diffusion_builds["sd15"])
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(pipe.unet.config, in_channels=4 + EXTRA)
    pipe.register_modules(unet=unet)
    out = tmp_path_factory.mktemp("conditioned") / "sd"
    pipe.save_pretrained(out)
    return out


def write_strips(root, n=4, height=32, width=64, extra=EXTRA, condition=True):
    """``n`` pairs of random 32 x 64 images, each with a (extra, 8, 16) condition file."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "cond").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        names = []
        for k in range(2):
            name = f"img/{i}-{k}.png"
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name)
            names.append(name)
        record = {"id": f"r{i}", "caption": "a red circle .", "image_0": names[0], "image_1": names[1], "label_0": 1}
        if condition:
            np.save(root / f"cond/{i}.npy", rng.standard_normal((extra, height // 4, width // 4)).astype(np.float32))
            record["condition"] = f"cond/{i}.npy"
        lines.append(json.dumps(record) + "\n")
    (root / "train.jsonl").write_text("".join(lines))
    return root / "train.jsonl"


def batch_of(train_file, **kwargs):
    return next(iter(strip_datamodule(train_file, **kwargs).train_dataloader()))


def test_a_non_square_resolution_keeps_a_strip_of_that_size_and_scales_larger_images_to_cover_it():
    rng = np.random.default_rng(1)
    strip = Image.fromarray(rng.integers(0, 255, (32, 256, 3), dtype=np.uint8))
    same = pair_pixels([strip], [32, 256])
    assert same.shape == (1, 3, 32, 256)
    assert torch.equal(same[0], torch.from_numpy(np.array(strip)).permute(2, 0, 1).float() / 127.5 - 1)
    big = strip.resize((512, 64), Image.Resampling.NEAREST)
    assert pair_pixels([big], (32, 256)).shape == (1, 3, 32, 256)
    # a square side behaves as before: shorter side to R, centre crop
    assert pair_pixels([strip], 32).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="resolution"):
        pair_pixels([strip], [32, 0])


def test_records_with_conditions_batch_them_in_group_order(tmp_path):
    batch = batch_of(write_strips(tmp_path))
    assert batch.pixel_values.shape == (8, 3, 32, 64)
    assert batch.condition.shape == (4, EXTRA, 8, 16)
    for i in range(4):
        assert torch.equal(batch.condition[i], torch.from_numpy(np.load(tmp_path / f"cond/{i}.npy")))
    moved = batch.to("cpu")
    assert torch.equal(moved.condition, batch.condition)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read condition"),
        (np.zeros((8, 16), dtype=np.float32), "must be a \\(channels, height, width\\)"),
        (np.full((EXTRA, 8, 16), np.nan, dtype=np.float32), "NaN"),
        (np.array([{"a": 1}], dtype=object), "cannot read condition"),
    ],
)
def test_a_bad_condition_file_names_the_record_and_file_or_is_a_counted_skip(tmp_path, content, message):
    train = write_strips(tmp_path)
    target = tmp_path / "cond/2.npy"
    if content is None:
        target.write_bytes(b"not a numpy file")
    else:
        np.save(target, content, allow_pickle=True)
    with pytest.raises(BadSampleError, match=f"train.jsonl:3.*{message}"):
        batch_of(train)
    skipped = batch_of(train, on_bad_sample="skip")
    assert skipped.skipped == 1 and skipped.ids == ["r0", "r1", "r3"]


def test_a_condition_that_is_not_a_npy_path_is_a_bad_record(tmp_path):
    train = write_strips(tmp_path)
    lines = train.read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]) | {"condition": "cond/1.pt"})
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="train.jsonl:2: 'condition' must be the path of a .npy file"):
        batch_of(train)


def test_statistics_concatenate_each_groups_condition_to_its_rows(conditioned_sd, tmp_path):
    batch = batch_of(write_strips(tmp_path))
    module = PreferenceModule(DiffusionBackbone(str(conditioned_sd)), DPOLoss(beta=100.0), reference="copy")
    module.configure_model()
    backbone, model = module.backbone, module.policy.eval()
    with torch.no_grad():
        stats = backbone.statistics(model, batch)
        draw = batch.noise_draw.rows(2)
        latents = backbone.encode_images(model, batch.pixel_values)
        noisy = model.schedule.noisy(latents, draw)
        text = backbone.encode_text(model, batch.captions).rows(2, torch.float32)
        inputs = torch.cat([noisy, torch.cat([batch.condition, batch.condition])], dim=1)
        prediction = model.denoiser(inputs, draw.timesteps, encoder_hidden_states=text.embeds).sample
        errors = (prediction - model.schedule.target(latents, draw)).pow(2).mean((1, 2, 3))
        torch.testing.assert_close(stats.logps, -errors.view(2, 4).T, rtol=1e-5, atol=1e-6)
        # the condition is read: another condition, same noise, another statistic
        batch.condition = batch.condition + 1.0
        assert not torch.allclose(backbone.statistics(model, batch).logps, stats.logps)


def test_channel_mismatches_are_clear_errors(conditioned_sd, tmp_path):
    module = PreferenceModule(DiffusionBackbone(str(conditioned_sd)), DPOLoss(beta=100.0), reference="copy")
    module.configure_model()
    backbone, model = module.backbone, module.policy
    without = batch_of(write_strips(tmp_path / "plain", condition=False))
    with pytest.raises(ValueError, match="takes 7 input channels but gets 4 latent \\+ 0 condition.*'condition' file"):
        backbone.statistics(model, without)
    wrong = batch_of(write_strips(tmp_path / "wrong", extra=2))
    with pytest.raises(ValueError, match="takes 7 input channels but gets 4 latent \\+ 2 condition"):
        backbone.statistics(model, wrong)


def test_a_lora_dpo_step_with_conditions_trains_and_inversion_reads_the_condition(conditioned_sd, tmp_path):
    import lightning as L

    train = write_strips(tmp_path)
    lora = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    backbone = DiffusionBackbone(str(conditioned_sd), lora=lora, noise="inversion", inversion_steps=3)
    module = PreferenceModule(backbone, DPOLoss(beta=100.0), keep_host_memory=False)
    dm = DiffusionPreferenceDataModule(
        train_file=str(train), resolution=[32, 64], center_crop=True, random_flip=False,
        loader={"batch_size": 2, "seed": 0},
    )  # fmt: skip
    L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, datamodule=dm)  # fmt: skip
    # the inversion's denoiser calls take 7 channels: without the condition rows they would fail
    moved = [n for n, p in module.policy.denoiser.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert moved


def test_conditioned_samples_depend_on_their_own_seed_and_condition_only(conditioned_sd):
    from diffusers import DDIMScheduler

    backbone = DiffusionBackbone(str(conditioned_sd))
    model = backbone.build()
    scheduler = DDIMScheduler.from_pretrained(conditioned_sd, subfolder="scheduler")
    condition = torch.randn(3, EXTRA, 8, 16, generator=torch.Generator().manual_seed(0))
    captions = ["a red circle ."] * 3
    images = sample_conditioned(backbone, model, scheduler, condition, captions, [5, 6, 7], 4)
    assert images.shape == (3, 3, 32, 64) and 0 <= images.min() and images.max() <= 1
    alone = sample_conditioned(backbone, model, scheduler, condition[1:2], captions[:1], [6], 4)
    torch.testing.assert_close(alone[0], images[1], rtol=1e-4, atol=1e-5)
    other_seed = sample_conditioned(backbone, model, scheduler, condition[1:2], captions[:1], [8], 4)
    assert not torch.allclose(other_seed[0], images[1])
    with pytest.raises(ValueError, match="3 condition rows but 2 captions"):
        sample_conditioned(backbone, model, scheduler, condition, captions[:2], [5, 6, 7], 4)


def test_the_portrait_strip_and_condition_layout():
    from diffusers import AutoencoderKL

    from mmpo.recipes.tlpo_data import clip_condition, strip_frames, strip_pixels

    frames = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    strip = strip_pixels(frames)
    assert strip.shape == (3, 32, 256)
    assert torch.equal(strip[:, :, 64:96], frames[2].permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(strip_frames((strip[None] + 1) / 2, 8)[0], frames)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, latent_channels=4,
    ).eval()  # fmt: skip
    envelope = torch.linspace(0, 1, 8)
    mel = torch.arange(16, dtype=torch.float32).view(8, 2)
    condition = clip_condition(vae, frames[0], envelope, mel, ([0.0, 1.0], [1.0, 2.0]))
    assert condition.shape == (4 + 1 + 2, 8, 64)
    for t in range(8):
        block = condition[:, :, 8 * t : 8 * t + 8]
        assert torch.allclose(block[4], torch.full((8, 8), 2 * float(envelope[t]) - 1))
        assert torch.allclose(block[5], torch.full((8, 8), float(mel[t, 0])))
        assert torch.allclose(block[6], torch.full((8, 8), (float(mel[t, 1]) - 1) / 2))
        assert torch.equal(block[:4], condition[:4, :, :8])  # the reference latents under every frame
