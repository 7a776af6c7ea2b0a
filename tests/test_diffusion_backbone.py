"""The diffusion backbone: Diffusion-DPO's statistic on tiny SD 1.5 / SDXL / SD3 diffusion_builds, checked by hand.

Every model is a random-init pipeline written by :mod:`mmpo.tiny.diffusion` and loaded back through
``from_pretrained(path, subfolder=...)``; the reference numbers are computed here from the components
loaded independently (or through diffusers' own pipeline methods), not through the backbone.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.losses import DPOLoss, ResponseStats  # noqa: E402
from mmpo.module import reward_metrics  # noqa: E402

RESOLUTION = 32  # 8 × 8 latents through the tiny VAE


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusion-pairs")
    write_diffusion_pairs(root, n=8, seed=0, image_size=RESOLUTION, score_fraction=0.5)
    return root


def pair_batch(pairs, n: int = 4, file: str = "train.jsonl"):
    """A new batch object holding the first ``n`` pairs of ``pairs / file``, in file order."""
    dm = DiffusionPreferenceDataModule(
        train_file=str(pairs / file), data_root=str(pairs), resolution=RESOLUTION, center_crop=True,
        random_flip=False, loader={"batch_size": n, "shuffle": False},
    )  # fmt: skip
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def lora_backbone(path, **kwargs) -> DiffusionBackbone:
    # alpha ≠ r, so a loader that dropped the scaling would give other outputs
    return DiffusionBackbone(
        str(path), lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS), **kwargs
    )


def perturb_adapter(model, seed: int = 0) -> None:
    """Give the fresh (identity) adapter weights that change the denoiser's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_core_dpo_loss_is_diffusion_dpo_in_both_published_conventions():
    # e for 16 pairs: policy winner, policy loser, reference winner, reference loser (differences ~1e-3,
    # so that β·Δ is of order 1 and neither formula saturates)
    g = torch.Generator().manual_seed(0)
    th_w, th_l, ref_w, ref_l = 0.1 + 1e-3 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    beta_official = 5000.0
    # official code: inside = −0.5·β·((e_θ^w − e_θ^l) − (e_ref^w − e_ref^l)), loss = −log σ(inside)
    inside = -0.5 * beta_official * ((th_w - th_l) - (ref_w - ref_l))
    official = -F.logsigmoid(inside)
    # diffusers example: logits = (e_ref^w − e_ref^l) − (e_θ^w − e_θ^l), loss = −log σ(β·logits), β = 2500
    example = -F.logsigmoid(2500.0 * ((ref_w - ref_l) - (th_w - th_l)))
    ones = torch.ones(16, 2, dtype=torch.float64)
    policy = ResponseStats(logps=-torch.stack([th_w, th_l], 1), tokens=ones)
    reference = ResponseStats(logps=-torch.stack([ref_w, ref_l], 1), tokens=ones)
    out = DPOLoss(beta=beta_official / 2)(policy, reference)
    torch.testing.assert_close(out.losses, official, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.losses, example, rtol=1e-12, atol=1e-12)
    accuracy = reward_metrics(out, policy)["rewards/accuracies"]
    assert accuracy.item() == (inside > 0).double().mean().item()
    assert 0 < accuracy.item() < 1  # both signs occur: the comparison can fail


@pytest.mark.parametrize("kind", ["sd15", "sd15-v"])
def test_statistic_by_hand_on_a_tiny_unet(kind, diffusion_builds, pairs):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = diffusion_builds[kind]
    backbone = DiffusionBackbone(str(path))  # the plain UNet, trained in full
    batch = pair_batch(pairs)
    stats = backbone.statistics(backbone.build().train(), batch)
    assert stats.logps.shape == (4, 2) and torch.equal(stats.tokens, torch.ones(4, 2))

    # group 1 by hand, from the components loaded on their own
    b, groups, draw = 1, batch.num_groups, batch.noise_draw
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    n = config["num_train_timesteps"]  # scaled_linear betas, as SD writes them
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    with torch.no_grad():
        ids = tokenizer([batch.captions[b]], padding="max_length", max_length=24, truncation=True, return_tensors="pt")
        text = encoder(ids.input_ids).last_hidden_state.expand(2, -1, -1)  # one caption, both images
        pixels = batch.pixel_values[[b, groups + b]]  # winner, loser
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        t, eps = int(draw.timesteps[b]), draw.noise[b]  # one (t, ε) for both images of the pair
        a = alpha_bar[t].float()
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if kind == "sd15" else a.sqrt() * eps - (1 - a).sqrt() * x0  # ε or the velocity
        prediction = unet(noisy, t, encoder_hidden_states=text).sample
    errors = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(stats.logps[b].detach(), -errors, rtol=1e-5, atol=1e-6)


def test_flow_matching_statistic_by_hand_on_a_tiny_sd3(diffusion_builds, pairs):
    from diffusers import StableDiffusion3Pipeline

    path = diffusion_builds["sd3"]
    backbone = DiffusionBackbone(str(path))
    batch = pair_batch(pairs)
    stats = backbone.statistics(backbone.build().train(), batch)
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    b, groups, draw = 2, batch.num_groups, batch.noise_draw
    sigma, t = float(draw.sigmas[b]), float(draw.timesteps[b])
    # SD3's training grid: σ = s·u / (1 + (s − 1)·u) with shift s = 3 and u = i / N, and timestep = σ·N
    u = sigma / (3.0 - 2.0 * sigma)
    assert abs(u * 1000 - round(u * 1000)) < 1e-3 and t == pytest.approx(sigma * 1000, rel=1e-6)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=batch.captions[b], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
        )
        mean = pipe.vae.encode(batch.pixel_values[[b, groups + b]]).latent_dist.mean
        x0 = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        eps = draw.noise[b]
        noisy = (1 - sigma) * x0 + sigma * eps
        prediction = pipe.transformer(
            hidden_states=noisy, timestep=torch.tensor([t, t]), encoder_hidden_states=embeds.expand(2, -1, -1),
            pooled_projections=pooled.expand(2, -1),
        ).sample  # fmt: skip
    errors = ((prediction - (eps - x0)) ** 2).mean(dim=(1, 2, 3))  # the velocity noise − latents
    torch.testing.assert_close(stats.logps[b].detach(), -errors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_text_conditioning_equals_the_pipelines_encode_prompt(kind, diffusion_builds):
    import diffusers

    backbone = DiffusionBackbone(str(diffusion_builds[kind]))
    model = backbone.build()
    pipe = getattr(diffusers, model.pipeline_class).from_pretrained(diffusion_builds[kind])
    captions = ["a red circle .", "a blue square and a green triangle ."]
    ours = backbone.encode_text(model, captions)
    with torch.no_grad():
        if kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False)
        elif kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        else:
            (embeds, _), pooled = pipe.encode_prompt(captions, "cpu", 1, do_classifier_free_guidance=False), None
    torch.testing.assert_close(ours.embeds, embeds, rtol=0, atol=0)
    assert (ours.pooled is None) == (pooled is None)
    if pooled is not None:
        torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_sdxl_unet_gets_the_pooled_embedding_and_size_ids(diffusion_builds, pairs):
    backbone = DiffusionBackbone(str(diffusion_builds["sdxl"]))
    model = backbone.build()
    seen = {}
    model.denoiser.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = pair_batch(pairs)
    backbone.statistics(model, batch)
    added = seen["added_cond_kwargs"]
    # original size, crop corner, target size of the square crop, in pixels, for each of the K·B rows
    torch.testing.assert_close(added["time_ids"], torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(8, -1))
    pooled = backbone.encode_text(model, batch.captions).pooled  # (B, P), one per caption
    torch.testing.assert_close(added["text_embeds"], torch.cat([pooled, pooled]))


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_policy_and_reference_denoise_each_group_at_one_draw(reference, diffusion_builds, pairs):
    backbone = lora_backbone(diffusion_builds["sd15"])
    model = backbone.build().train()
    ref_model = backbone.frozen_copy(model) if reference == "copy" else model  # taken before training
    perturb_adapter(model)  # as training would move it
    seen = []

    def record(module, args, kwargs):
        seen.append((args[0].detach().clone(), args[1].clone()))  # (noisy latents, timesteps) of one forward

    model.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    if ref_model is not model:
        ref_model.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    batch, groups = pair_batch(pairs), 4
    adapter = reference == "adapter"
    with backbone.media_reuse(model) if adapter else contextlib.nullcontext():  # as the module runs them
        policy = backbone.statistics(model, batch)
        with torch.no_grad(), backbone.adapters_disabled(model) if adapter else contextlib.nullcontext():
            ref = backbone.statistics(ref_model, batch)
    (x_policy, t_policy), (x_ref, t_ref) = seen
    assert torch.equal(t_policy, t_ref) and torch.equal(t_policy[:groups], t_policy[groups:])
    assert torch.equal(x_policy, x_ref)  # the reference denoises exactly the policy's input
    # the noise of each row, recovered from its input: ε = (x_t − √ᾱ·x₀) / √(1 − ᾱ)
    x0 = backbone.encode_images(model, batch.pixel_values)
    alpha_bar = model.scheduler.alphas_cumprod[t_policy].view(-1, 1, 1, 1)
    eps = (x_policy - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    torch.testing.assert_close(eps[:groups], eps[groups:], rtol=1e-4, atol=1e-4)  # winner and loser alike
    torch.testing.assert_close(eps[:groups], batch.noise_draw.noise, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(policy.logps, ref.logps)  # the adapter acts: the two passes differ by it alone
    # the next step's batch (a new object, the same records) gets a new draw: nothing leaks into it
    backbone.statistics(model, pair_batch(pairs))
    x_next, t_next = seen[2]
    assert not torch.equal(t_next, t_policy) and not torch.allclose(x_next, x_policy)


def test_evaluation_draws_follow_the_record_and_training_draws_do_not(diffusion_builds, pairs, tmp_path):
    lines = (pairs / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "swapped.jsonl").write_text("".join([lines[1], lines[0], *lines[2:]]))  # records 0 and 1 swapped
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]), eval_seed=7)
    model = backbone.build().eval()
    first, again = pair_batch(pairs), pair_batch(pairs)
    swapped = pair_batch(pairs, file=str(tmp_path / "swapped.jsonl"))
    with torch.no_grad():
        for batch in (first, again, swapped):
            backbone.statistics(model, batch)
        model.train()
        one, two = pair_batch(pairs), pair_batch(pairs)
        backbone.statistics(model, one)
        backbone.statistics(model, two)
    assert torch.equal(first.noise_draw.noise, again.noise_draw.noise)
    assert torch.equal(first.noise_draw.timesteps, again.noise_draw.timesteps)
    assert swapped.ids[:2] == first.ids[1::-1]
    assert torch.equal(swapped.noise_draw.noise[[1, 0, 2, 3]], first.noise_draw.noise)  # the draw follows the record
    assert not torch.equal(one.noise_draw.noise, two.noise_draw.noise)
    assert not torch.equal(one.noise_draw.noise, first.noise_draw.noise)


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_disabled_adapter_is_exactly_the_base_denoiser(kind, diffusion_builds, pairs):
    backbone = lora_backbone(diffusion_builds[kind])
    model = backbone.build()
    perturb_adapter(model)
    plain = DiffusionBackbone(str(diffusion_builds[kind]))  # the checkpoint loaded again, no adapter
    batch = pair_batch(pairs)
    with torch.no_grad():
        adapted = backbone.statistics(model, batch)
        with backbone.adapters_disabled(model):
            disabled = backbone.statistics(model, batch)
        base = plain.statistics(plain.build(), batch)  # the same batch: the same draw
        restored = backbone.statistics(model, batch)
    assert torch.equal(disabled.logps, base.logps)
    assert not torch.allclose(adapted.logps, base.logps)
    assert torch.equal(restored.logps, adapted.logps)  # the adapter is back after the block


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_saved_adapter_loads_through_diffusers_load_lora_weights(kind, diffusion_builds, pairs, tmp_path):
    import diffusers
    from safetensors.torch import load_file

    backbone = lora_backbone(diffusion_builds[kind])
    model = backbone.build()
    perturb_adapter(model)
    backbone.save(model, tmp_path / "lora")
    tensors = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    prefix = f"{model.denoiser_name}."
    assert tensors and all(k.startswith(prefix) for k in tensors)
    assert {k.rsplit(".", 2)[-2] for k in tensors} == {"lora_A", "lora_B"}  # PEFT's names
    pipe = getattr(diffusers, model.pipeline_class).from_pretrained(diffusion_builds[kind])
    base = model.with_denoiser(getattr(pipe, model.denoiser_name))
    batch = pair_batch(pairs)
    with torch.no_grad():
        before = backbone.statistics(base, batch)
        pipe.load_lora_weights(tmp_path / "lora")
        loaded = backbone.statistics(base, batch)
        trained = backbone.statistics(model, batch)
    torch.testing.assert_close(loaded.logps, trained.logps, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(before.logps, trained.logps)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_cached_latents_and_embeddings_give_the_same_statistics(kind, diffusion_builds, pairs, tmp_path):
    backbone = DiffusionBackbone(str(diffusion_builds[kind]))
    model = backbone.build()
    cached = DiffusionPreferenceDataModule(
        train_file=str(pairs / "train.jsonl"), resolution=RESOLUTION, center_crop=True, random_flip=False,
        loader={"batch_size": 4, "shuffle": False}, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    stats = cached.build_cache(**backbone.cache_encoders(model), show_progress=False)
    assert stats["train"].written == 8
    from_cache, from_pixels = next(iter(cached.train_dataloader())), pair_batch(pairs)
    assert from_cache.pixel_values is None and from_cache.latents is not None
    assert (kind == "sd15") == ("pooled" not in from_cache.text_extra)
    with torch.no_grad():
        on_the_fly = backbone.statistics(model, from_pixels)
        from_cache.noise_draw = from_pixels.noise_draw
        read = backbone.statistics(model, from_cache)
    torch.testing.assert_close(read.logps, on_the_fly.logps, rtol=1e-5, atol=1e-6)


def test_batch_meets_the_group_contract(pairs):
    batch = pair_batch(pairs, n=8)
    assert (batch.num_groups, batch.group_size, batch.truncated) == (8, 2, 0)
    side = batch.side_info()
    assert torch.equal(side["soft_labels"], batch.label)  # P(image 0, the winner, is preferred)
    assert "scores" not in side and batch.scores.isnan().any()  # some pairs carry a label only
    scored = [i for i in range(8) if not batch.scores[i].isnan().any()]
    assert scored and all(batch.scores[i, 0] > batch.scores[i, 1] for i in scored)  # winner first
    batch.noise_draw = object()
    assert batch.to("cpu").noise_draw is None  # a moved copy draws afresh


def test_lora_targets_that_match_nothing_are_refused_with_the_right_names(diffusion_builds):
    backbone = DiffusionBackbone(str(diffusion_builds["sd15"]), lora=LoraSettings())  # the VLM's default targets
    with pytest.raises(ValueError, match=r"to_q.*to_out\.0"):
        backbone.build()


def test_describe_names_the_denoiser_and_its_target(diffusion_builds):
    backbone = lora_backbone(diffusion_builds["sd3"])
    model = backbone.build()
    line = backbone.describe(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert line.startswith("sd3: LoRA r=4 on the SD3Transformer2DModel (flow matching)")
    assert f"{trainable:,} trainable" in line and trainable > 0
    assert math.isclose(trainable, sum(p.numel() for n, p in model.denoiser.named_parameters() if "lora_" in n))
