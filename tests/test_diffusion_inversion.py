"""SmPO's / InPO's inversion-based noise: each image's noise estimated by (ReNoise) DDIM inversion with the policy."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from helpers.diffusion import diffusion_config_cli  # noqa: E402

from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs  # noqa: E402
from mmpo.backbones import DiffusionBackbone, LoraSettings  # noqa: E402
from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS  # noqa: E402
from mmpo.backbones.diffusion_inversion import inverted_noise  # noqa: E402
from mmpo.backbones.diffusion_text import TextConditioning  # noqa: E402
from mmpo.losses import DPOLoss, SmPOLoss  # noqa: E402
from mmpo.module import PreferenceModule  # noqa: E402


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return write_diffusion_pairs(tmp_path_factory.mktemp("scored"), n=8, seed=0, image_size=32, score_fraction=1.0)


def first_batch(train_file):
    dm = DiffusionPreferenceDataModule(
        train_file=str(train_file), resolution=32, loader={"batch_size": 4, "shuffle": False}
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def loaded(path, **backbone):
    lora = LoraSettings(r=4, alpha=4, dropout=0.0, target_modules=DIFFUSION_LORA_TARGETS)
    module = PreferenceModule(
        DiffusionBackbone(str(path), lora=lora, **backbone), SmPOLoss(beta=1000.0), keep_host_memory=False
    )
    module.configure_model()
    return module


def official_loop(unet, scheduler, latents, t, embeds, steps, renoise=True):
    """The SmPO script's inversion written out for a batch sharing one timestep t (its `timesteps[0]`)."""
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(steps)
    x = latents.clone()
    with torch.no_grad():
        for s in inverse.timesteps[inverse.timesteps < t]:
            eps = unet(x, s.repeat(x.shape[0]), encoder_hidden_states=embeds).sample
            if renoise:
                x1 = inverse.step(eps, s, x).prev_sample
                eps = (eps + unet(x1, s.repeat(x.shape[0]), encoder_hidden_states=embeds).sample) / 2
            x = inverse.step(eps, s, x).prev_sample
    alpha = scheduler.alphas_cumprod[t]
    return (x - latents * alpha**0.5) / (1 - alpha) ** 0.5


@pytest.mark.parametrize("renoise", [True, False])
def test_inverted_noise_is_the_official_loop(diffusion_builds, scored, renoise):
    module = loaded(diffusion_builds["sd15"])
    model, backbone = module.policy, module.backbone
    batch = first_batch(scored)
    latents = backbone.encode_images(model, batch.pixel_values)  # (K·B, c, h, w)
    text = backbone.encode_text(model, batch.captions).rows(2, torch.float32)
    for t in (650, 401, 202, 1):  # 401 sits on the inversion grid; at t = 1 nothing is inverted
        rows = torch.full((latents.shape[0],), t)
        ours = inverted_noise(lambda x, s, c: backbone.denoise(model, x, s, c), model.scheduler, latents, rows, text,
                              steps=5, renoise=renoise)  # fmt: skip
        want = official_loop(model.denoiser, model.scheduler, latents, t, text.embeds, 5, renoise)
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, torch.zeros_like(ours))  # t = 1: (x0 - sqrt(a) x0) / sqrt(1 - a), not 0


def test_rows_at_different_timesteps_invert_as_they_would_alone(diffusion_builds, scored):
    module = loaded(diffusion_builds["sd15"])
    model, backbone = module.policy, module.backbone
    batch = first_batch(scored)
    latents = backbone.encode_images(model, batch.pixel_values)[:3]
    text = backbone.encode_text(model, batch.captions[:3])
    timesteps = torch.tensor([999, 150, 500])
    together = inverted_noise(lambda x, s, c: backbone.denoise(model, x, s, c), model.scheduler, latents, timesteps,
                              text, steps=5)  # fmt: skip
    for i in range(3):
        alone = inverted_noise(
            lambda x, s, c: backbone.denoise(model, x, s, c), model.scheduler, latents[i : i + 1],
            timesteps[i : i + 1], TextConditioning(text.embeds[i : i + 1]), steps=5,
        )  # fmt: skip
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_the_backbone_inverts_once_and_the_reference_reads_the_same_noise(diffusion_builds, scored):
    module = loaded(diffusion_builds["sd15"], noise="inversion", inversion_steps=5)
    batch = first_batch(scored)
    calls = {"n": 0}
    denoise = module.backbone.denoise

    def counting(*args, **kwargs):
        calls["n"] += 1
        return denoise(*args, **kwargs)

    module.backbone.denoise = counting
    out, policy, reference = module.compute(batch)
    draw = batch.noise_draw
    assert draw.row_noise is not None and draw.row_noise.shape[0] == 8  # K·B rows: each image its own noise
    assert not torch.allclose(draw.row_noise[:4], draw.row_noise[4:])  # winner and loser differ at the same t
    inversion_calls = calls["n"] - 2  # minus the policy's and the reference's training passes
    assert 0 < inversion_calls <= 2 * 5  # at most 5 inversion steps, two predictions each (ReNoise)
    torch.testing.assert_close(policy.logps.detach(), reference.logps)  # the fresh adapter: same noise, same error
    torch.testing.assert_close(out.losses.detach(), torch.full((4,), math.log(2)))
    # the statistic is the error against the estimated noise at x_t = sqrt(a) x0 + sqrt(1 - a) eps
    model = module.policy
    latents = module.backbone.encode_images(model, batch.pixel_values)
    rows = draw.rows(2)
    alpha = model.scheduler.alphas_cumprod[rows.timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * rows.noise
    text = module.backbone.encode_text(model, batch.captions).rows(2, torch.float32)
    with torch.no_grad():
        errors = (denoise(model, noisy, rows.timesteps, text) - rows.noise).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(-policy.logps.detach().T.reshape(-1), errors, rtol=1e-5, atol=1e-6)


def test_a_step_with_inverted_noise_lowers_the_loss_at_the_same_draw(diffusion_builds, scored):
    module = loaded(diffusion_builds["sd15"], noise="inversion")
    module.loss = DPOLoss(beta=2500.0)
    batch = first_batch(scored)
    out, _, _ = module.compute(batch)
    out.losses.mean().backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p -= 0.1 * p.grad / max(p.grad.norm().item(), 1e-12)
    after, _, _ = module.compute(batch)  # the draw (and its inverted noise) is the batch's: the same
    assert after.losses.mean().item() < math.log(2) - 1e-4


def test_inversion_is_refused_for_flow_matching_and_bad_settings(diffusion_builds, scored):
    module = loaded(diffusion_builds["sd3"], noise="inversion")
    with pytest.raises(ValueError, match="DDPM-family"):
        module.compute(first_batch(scored))
    with pytest.raises(ValueError, match="noise must be"):
        DiffusionBackbone("x", noise="ddim")
    with pytest.raises(ValueError, match="inversion_steps"):
        DiffusionBackbone("x", inversion_steps=0)


def test_the_smpo_config_inverts(diffusion_builds, scored, monkeypatch):
    cli = diffusion_config_cli("sd15_smpo_lora.yaml", diffusion_builds["sd15"], scored, monkeypatch)
    backbone = cli.model.backbone
    assert (backbone.noise, backbone.inversion_steps, backbone.renoise) == ("inversion", 5, True)
    assert isinstance(cli.model.loss, SmPOLoss) and cli.model.loss.beta == 1000.0


def inpo_loop(unet, scheduler, latents, t, embeds, steps, eta, generator):
    """InPO's stochastic inversion written out (its script: no ReNoise, η·σ·z after each step, σ² from
    ``DDIMScheduler._get_variance(s + T/n, s)``), for a batch sharing one timestep t."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(steps)
    variance = DDIMScheduler.from_config(scheduler.config)._get_variance
    x = latents.clone()
    with torch.no_grad():
        for s in inverse.timesteps[inverse.timesteps < t]:
            eps = unet(x, s.repeat(x.shape[0]), encoder_hidden_states=embeds).sample
            x = inverse.step(eps, s, x).prev_sample
            upper = min(int(s) + 1000 // steps, 999)  # the script reads past the schedule at the last level
            x = x + eta * torch.randn(x.shape, generator=generator) * variance(upper, int(s)) ** 0.5
    alpha = scheduler.alphas_cumprod[t]
    return (x - latents * alpha**0.5) / (1 - alpha) ** 0.5


def test_inpo_stochastic_inversion_is_the_official_loop(diffusion_builds, scored):
    module = loaded(diffusion_builds["sd15"])
    model, backbone = module.policy, module.backbone
    batch = first_batch(scored)
    latents = backbone.encode_images(model, batch.pixel_values)
    text = backbone.encode_text(model, batch.captions).rows(2, torch.float32)
    for t in (650, 999):  # at 999 the last level (901) is lifted past the end of the schedule
        rows = torch.full((latents.shape[0],), t)
        ours = inverted_noise(lambda x, s, c: backbone.denoise(model, x, s, c), model.scheduler, latents, rows, text,
                              steps=10, renoise=False, eta=0.1, generator=torch.Generator().manual_seed(3))  # fmt: skip
        want = inpo_loop(
            model.denoiser, model.scheduler, latents, t, text.embeds, 10, 0.1, torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        plain = inverted_noise(lambda x, s, c: backbone.denoise(model, x, s, c), model.scheduler, latents, rows, text,
                               steps=10, renoise=False)  # fmt: skip
        assert not torch.allclose(ours, plain)  # the stochastic term moved it
    with pytest.raises(ValueError, match="inversion_eta"):
        DiffusionBackbone("x", inversion_eta=-0.1)


def test_stochastic_inversion_draws_the_same_noise_per_record_in_evaluation(diffusion_builds, scored):
    module = loaded(diffusion_builds["sd15"], noise="inversion", renoise=False, inversion_eta=0.1)
    module.eval()
    first = module.compute(first_batch(scored))[1].logps
    again = module.compute(first_batch(scored))[1].logps  # a new batch object: drawn again, from the records' ids
    torch.testing.assert_close(first, again)


def test_the_inpo_snippet_in_the_docs_builds_its_backbone_and_loss():
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[1] / "docs" / "diffusion.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "inversion_eta" in b]
    snippet = yaml.safe_load(block)
    backbone = DiffusionBackbone(**snippet["backbone"]["init_args"])
    assert (backbone.noise, backbone.inversion_steps, backbone.renoise, backbone.inversion_eta) == (
        "inversion", 10, False, 0.1,
    )  # fmt: skip
    assert snippet["loss"]["class_path"] == "mmpo.losses.DPOLoss"
    assert DPOLoss(**snippet["loss"]["init_args"]).beta == 1000.0
