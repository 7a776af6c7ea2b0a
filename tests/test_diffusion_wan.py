"""Wan 2.1 text-to-video through DiffusionBackbone: UMT5 captions, the Wan VAE's normalised 5-D latents, the flow
schedule of its UniPC sampler, clips from mp4 files and film strips, and Diffusion-DPO end to end on a tiny build."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from helpers.callbacks import LossesInMemory  # noqa: E402
from helpers.diffusion import write_video_pairs  # noqa: E402
from helpers.trainers import quiet_trainer  # noqa: E402

from datamodules.core.records import BadSampleError  # noqa: E402
from datamodules.diffusion.module import DiffusionPreferenceDataModule  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion_noise import NoiseDraw, segment_errors  # noqa: E402
from mmpo.losses import DPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402

FRAMES = 9  # 4n + 1: three latent frames
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]  # the Wan config's


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return write_video_pairs(tmp_path_factory.mktemp("wan-videos"), n=8, frames=FRAMES)


@pytest.fixture(scope="module")
def strips(tmp_path_factory) -> Path:
    return write_video_pairs(tmp_path_factory.mktemp("wan-strips"), n=8, frames=FRAMES, strips=True)


def video_data(train_file: Path, batch_size: int = 4, **kwargs) -> DiffusionPreferenceDataModule:
    dm = DiffusionPreferenceDataModule(
        train_file=str(train_file), frames=FRAMES, resolution=32, center_crop=True, random_flip=False,
        loader={"batch_size": batch_size, "shuffle": False}, **kwargs,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def first(train_file: Path, **kwargs):
    return next(iter(video_data(train_file, **kwargs).train_dataloader()))


def test_wan_loads_as_a_flow_matching_video_model_with_its_samplers_shift(diffusion_builds):
    from diffusers import UniPCMultistepScheduler

    backbone = DiffusionBackbone(str(diffusion_builds["wan"]))
    model = backbone.build()
    assert model.family == "wan" and model.vae_scale_factor == 8 and model.denoiser_name == "transformer"
    shipped = UniPCMultistepScheduler.from_pretrained(diffusion_builds["wan"], subfolder="scheduler")
    assert shipped.config.use_flow_sigmas and shipped.config.flow_shift == 3.0  # what Wan ships: a sampler
    # training noises at the shifted flow sigmas σ' = 3σ / (1 + 2σ), σ = 1, ..., 1/1000 (FlowMatchEuler's grid)
    sigma = torch.linspace(1.0, 1.0 / 1000, 1000, dtype=torch.float64)
    draw = model.schedule.at(torch.tensor([0, 499, 999]), torch.zeros(3, 4, 3, 4, 4))
    expected = (3 * sigma / (1 + 2 * sigma))[[0, 499, 999]].float()
    torch.testing.assert_close(draw.sigmas, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(draw.timesteps, expected * 1000, rtol=1e-5, atol=1e-3)


def test_captions_are_encoded_as_wan_pipeline_encodes_them(diffusion_builds):
    from diffusers import WanPipeline

    backbone = DiffusionBackbone(str(diffusion_builds["wan"]))
    model = backbone.build()
    captions = ["a red circle moves left .", "a  blue square &amp; moves up ."]  # pipeline cleaning: spaces, HTML
    ours = backbone.encode_text(model, captions)
    pipe = WanPipeline.from_pretrained(diffusion_builds["wan"])
    with torch.no_grad():
        theirs = pipe.encode_prompt(  # at the length WanPipeline.__call__ asks for by default
            captions, do_classifier_free_guidance=False, max_sequence_length=512, device=torch.device("cpu")
        )[0]
    assert ours.embeds.shape == (2, 512, 32) and ours.pooled is None
    torch.testing.assert_close(ours.embeds, theirs, rtol=1e-5, atol=1e-5)
    lengths = (ours.embeds.abs().sum(-1) > 0).sum(1)
    assert lengths.tolist() == [8, 9]  # <s>, the words (& unescaped), </s>; zeros after
    assert torch.all(ours.embeds[0, 8:] == 0)


def test_clips_become_normalised_wan_latents_that_the_pipeline_decodes_back(diffusion_builds):
    backbone = DiffusionBackbone(str(diffusion_builds["wan"]))
    model = backbone.build()
    clips = torch.rand(2, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = backbone.encode_images(model, clips)
    assert latents.shape == (2, 4, 3, 4, 4)  # 4n + 1 frames -> n + 1 latent frames, 8x fewer pixels per side
    vae = model.vae
    with torch.no_grad():
        raw = vae.encode(clips).latent_dist.mean
    # WanPipeline decodes latents / (1 / latents_std) + latents_mean: normalising is its inverse
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents / std + torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1), raw)
    with pytest.raises(ValueError, match=r"4n \+ 1 frames, got 8"):
        backbone.encode_images(model, clips[:, :, :8])
    with pytest.raises(ValueError, match=r"encodes clips \(N, 3, F, H, W\).*set the datamodule's frames"):
        backbone.encode_images(model, clips[:, :, 0])


def test_clips_are_read_from_mp4_files_and_film_strips_alike(videos, strips):
    from datamodules.vision_text.video_io import read_video

    from_videos, from_strips = first(videos), first(strips)
    assert from_videos.pixel_values.shape == (8, 3, FRAMES, 32, 32)  # K·B rows: winners, then losers
    assert from_videos.ids == from_strips.ids == ["v0", "v1", "v2", "v3"]
    # the strips hold the rendered frames exactly; the mp4 files their H.264 encoding, close to them
    strip_frames = from_strips.pixel_values
    assert (from_videos.pixel_values - strip_frames).abs().mean() < 0.05
    # the loser is the winner played backwards
    torch.testing.assert_close(strip_frames[4:], strip_frames[:4].flip(2))
    decoded, _ = read_video(videos.parent / "000_good.mp4", FRAMES)
    torch.testing.assert_close(from_videos.pixel_values[0], decoded.permute(3, 0, 1, 2).float() / 127.5 - 1.0)


def test_bad_clips_name_the_record_and_the_file(videos, tmp_path):
    short = write_video_pairs(tmp_path / "short", n=4, frames=5)
    with pytest.raises(BadSampleError, match=r"train\.jsonl:1: video .*000_good\.mp4 has 5 frames, fewer than"):
        first(short)
    records = [json.loads(line) for line in videos.read_text().splitlines()][:4]
    records[2]["image_1"] = "broken.mp4"
    bad = shutil.copytree(videos.parent, tmp_path / "bad") / "train.jsonl"
    (bad.parent / "broken.mp4").write_bytes(b"\x00not a video" * 64)
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(BadSampleError, match=r"train\.jsonl:3: cannot open video .*broken\.mp4"):
        first(bad)
    batch = first(bad, on_bad_sample="skip")
    assert batch.skipped == 1 and batch.ids == ["v0", "v1", "v3"]
    records[1]["image_0"] = "missing.mp4"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(BadSampleError, match=r"train\.jsonl:2: media file not found: .*missing\.mp4"):
        first(bad)
    (tmp_path / "wide").mkdir()
    from PIL import Image

    Image.new("RGB", (100, 32)).save(tmp_path / "wide" / "strip.png")
    wide = tmp_path / "wide" / "train.jsonl"
    wide.write_text(json.dumps({"id": "w", "caption": "a", "image_0": "strip.png", "image_1": "strip.png"}) + "\n")
    wide.write_text(wide.read_text().replace('"image_1"', '"label_0": 1, "image_1"'))
    with pytest.raises(BadSampleError, match=r"train\.jsonl:1: film strip .*strip\.png is 100 px wide.*frames=9"):
        first(wide)


def test_the_statistic_is_the_mean_velocity_error_over_every_latent_element(diffusion_builds, strips):
    backbone = DiffusionBackbone(str(diffusion_builds["wan"]))
    model = backbone.build().eval()
    batch = first(strips)
    draw = NoiseDraw(
        timesteps=torch.tensor([100.0, 400.0, 700.0, 950.0]), noise=torch.randn(4, 4, 3, 4, 4),
        sigmas=torch.tensor([0.1, 0.4, 0.7, 0.95]),
    )  # fmt: skip
    batch.noise_draw = draw
    with torch.no_grad():
        stats = backbone.statistics(model, batch)
        latents = backbone.encode_images(model, batch.pixel_values)  # (8, 4, 3, 4, 4)
        text = backbone.encode_text(model, batch.captions).embeds.repeat(2, 1, 1)  # each group's caption, K rows
        sigma, noise = draw.sigmas.repeat(2).view(8, 1, 1, 1, 1), draw.noise.repeat(2, 1, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise  # both images of a group at the group's (σ, ε)
        out = model.denoiser(
            hidden_states=noisy, timestep=draw.timesteps.repeat(2), encoder_hidden_states=text, return_dict=False
        )[0]
    errors = (out - (noise - latents)).pow(2).mean(dim=(1, 2, 3, 4))
    torch.testing.assert_close(stats.logps, -errors.view(2, 4).T)
    assert stats.logps.shape == (4, 2)


def test_dense_segments_of_a_video_are_its_latent_frames():
    torch.manual_seed(0)
    prediction, target = torch.randn(2, 4, 6, 3, 5), torch.randn(2, 4, 6, 3, 5)
    blocks = segment_errors(prediction, target, 3)
    by_hand = torch.stack(
        [(prediction - target)[:, :, 2 * s : 2 * s + 2].pow(2).mean(dim=(1, 2, 3, 4)) for s in range(3)], 1
    )
    torch.testing.assert_close(blocks, by_hand)
    with pytest.raises(ValueError, match="6 latent frames cannot be cut into 4 equal segments"):
        segment_errors(prediction, target, 4)


def test_diffusion_dpo_trains_a_wan_lora_that_the_wan_pipeline_loads(diffusion_builds, videos, tmp_path):
    from diffusers import WanPipeline

    lora = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=TARGETS)
    module = PreferenceModule(
        DiffusionBackbone(str(diffusion_builds["wan"]), lora=lora), DPOLoss(beta=50.0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), reference="adapter",
        save_dir=str(tmp_path / "lora"), keep_host_memory=False,
    )  # fmt: skip
    record = LossesInMemory()
    trainer = quiet_trainer(devices=1, max_steps=3, callbacks=[record])
    module.configure_model()
    trainer.fit(module, video_data(videos, batch_size=2))
    losses = record.losses
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # a fresh adapter is its reference
    policy = module.policy.eval()
    adapted = [n for n, p in policy.denoiser.named_parameters() if "lora_B" in n]
    assert adapted and all(p.abs().sum() > 0 for n, p in policy.denoiser.named_parameters() if "lora_B" in n)
    pipe = WanPipeline.from_pretrained(diffusion_builds["wan"])
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, enc = torch.randn(1, 4, 3, 4, 4), torch.tensor([500.0]), torch.randn(1, 512, 32)
    with torch.no_grad():
        ours = policy.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=enc, return_dict=False)[0]
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=enc, return_dict=False)[0]
        with module.backbone.adapters_disabled(policy):
            base = policy.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=enc, return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, base)


def test_cached_video_latents_give_the_statistics_of_decoded_clips(diffusion_builds, strips, tmp_path):
    backbone = DiffusionBackbone(str(diffusion_builds["wan"]))
    model = backbone.build().eval()
    cached = video_data(strips, cache_dir=str(tmp_path / "cache"))
    stats = cached.build_cache(**backbone.cache_encoders(model), show_progress=False)
    assert stats["train"].written == 8
    from_cache, from_pixels = next(iter(cached.train_dataloader())), first(strips)
    assert from_cache.latents.shape == (8, 4, 3, 4, 4) and from_cache.pixel_values is None
    draw = model.schedule.draw(4, (4, 3, 4, 4), torch.device("cpu"))
    from_cache.noise_draw = from_pixels.noise_draw = draw
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.statistics(model, from_cache).logps, backbone.statistics(model, from_pixels).logps
        )
    images = DiffusionPreferenceDataModule(train_file=str(strips), resolution=32, cache_dir=str(tmp_path / "cache"))
    images.setup("fit")
    with pytest.raises(Exception, match=re.escape("build_cache with the same data, resolution and encoder_id")):
        next(iter(images.train_dataloader()))  # the same files read as images are other cache entries


def test_unsupported_wan_checkpoints_are_refused_clearly(diffusion_builds, tmp_path):
    from diffusers import WanTransformer3DModel

    from mmpo.backbones.diffusion_text import family_of

    i2v = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1, image_dim=16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="image_dim .image-to-video"):
        family_of(i2v)
    two = tmp_path / "wan22"
    shutil.copytree(diffusion_builds["wan"], two)
    index = json.loads((two / "model_index.json").read_text())
    index["transformer_2"] = index["transformer"]
    (two / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="two transformers .Wan 2.2"):
        DiffusionBackbone(str(two)).build()


def test_a_video_condition_per_latent_frame_reaches_the_transformer(diffusion_builds, strips, tmp_path):
    from diffusers import WanTransformer3DModel

    tiny = shutil.copytree(diffusion_builds["wan"], tmp_path / "wan-conditioned")
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    keys = ("patch_size", "num_attention_heads", "attention_head_dim", "text_dim", "freq_dim", "ffn_dim", "num_layers")
    torch.manual_seed(0)
    WanTransformer3DModel(**{k: config[k] for k in keys}, in_channels=6, out_channels=4).save_pretrained(
        tiny / "transformer"
    )
    records = [json.loads(line) for line in strips.read_text().splitlines()]
    data = shutil.copytree(strips.parent, tmp_path / "data")
    rng = torch.Generator().manual_seed(1)
    for i, r in enumerate(records):  # two channels per latent frame: (2, 3, 4, 4) for 9 frames at 32 px
        np.save(data / f"c{i}.npy", torch.randn(2, 3, 4, 4, generator=rng).numpy())
        r["condition"] = f"c{i}.npy"
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    batch = first(data / "train.jsonl")
    assert batch.condition.shape == (4, 2, 3, 4, 4)
    backbone = DiffusionBackbone(str(tiny))
    model = backbone.build().eval()
    batch.noise_draw = model.schedule.draw(4, (4, 3, 4, 4), torch.device("cpu"))
    with torch.no_grad():
        stats = backbone.statistics(model, batch)
        latents = backbone.encode_images(model, batch.pixel_values)
        draw = batch.noise_draw.rows(2)
        noisy = model.schedule.noisy(latents, draw)
        text = backbone.encode_text(model, batch.captions).embeds.repeat(2, 1, 1)
        inputs = torch.cat([noisy, batch.condition.repeat(2, 1, 1, 1, 1)], dim=1)  # (8, 6, 3, 4, 4)
        out = model.denoiser(hidden_states=inputs, timestep=draw.timesteps, encoder_hidden_states=text)[0]
    by_hand = -(out - model.schedule.target(latents, draw)).pow(2).mean(dim=(1, 2, 3, 4)).view(2, 4).T
    torch.testing.assert_close(stats.logps, by_hand)
