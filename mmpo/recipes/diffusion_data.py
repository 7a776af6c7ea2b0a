"""Data and model of ``mmpo diffusion-demo``: shapes-world scenes, prompt splits, a trained tiny VAE.

The demonstration's text-to-image model is the tiny SD 1.5-style pipeline of :func:`mmpo.tiny.diffusion.build_tiny_sd`
(random CLIP text encoder, frozen; a UNet over 8 × 8 latents) with two changes made here:

- its VAE is *trained* to reconstruct the world's 32 px scenes (:func:`train_autoencoder`: L1 + L2 reconstruction
  and a 1e-6 KL term, no attention in its middle block), and its ``scaling_factor`` is set from the trained
  latents' standard deviation as Stable Diffusion's was, so that samples decode into images a reward can read;
- its sampling scheduler is DDIM (deterministic given the initial noise), with SD's betas.

Captions are the world's own ("a red circle and a blue square ."): one or two objects of 6 colours × 4 shapes.
Prompts for preference pairs and held-out prompts for evaluation are disjoint sets of captions
(:func:`prompt_splits`); the pretraining scenes are drawn from the whole world, held-out captions included, so
"held-out" means no preference pair was built from that caption.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.core.atomic import atomic_directory, atomic_file, atomic_write_text
from datamodules.worlds.shapes import COLORS, ShapeObject, caption_for, render_scene, sample_scene, vocabulary
from datamodules.worlds.shapes_reward import batch_rewards

__all__ = [
    "WORLD",
    "build_demo_pipeline",
    "fit_autoencoder",
    "prompt_splits",
    "render_scenes",
    "train_autoencoder",
    "write_pretraining_pairs",
]

#: 32 px scenes of one or two objects: 24 single-object captions and 552 two-object ones
WORLD = {"image_size": 32, "max_objects": 2}
_VAE = {"block_out_channels": (16, 32, 32), "latent_channels": 4}  # 3 levels: 32 px -> 8 x 8 latents


def _scene(seed: int, split: str, index: int) -> list[ShapeObject]:
    rng = random.Random(f"diffusion-demo:{seed}:{split}:{index}")
    return sample_scene(rng, max_objects=WORLD["max_objects"], image_size=WORLD["image_size"])


def render_scenes(seed: int, split: str, n: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` scenes of ``split``: (H, W, 3) uint8 renderings and their captions."""
    scenes = [_scene(seed, split, i) for i in range(n)]
    return [np.asarray(render_scene(s, WORLD["image_size"])) for s in scenes], [caption_for(s) for s in scenes]


def write_pretraining_pairs(root: Path, n: int, seed: int) -> Path:
    """``root/pretrain.jsonl``: ``n`` scenes as pairs (the rendering, the same shapes in colours the caption does
    not name), ``label_0`` 1. Plain denoising training (``SFTLoss``) learns the first image only; the second makes
    the pretraining's reward metrics (chosen vs rejected denoising error) say whether colour is being learned."""
    out = root / "pretrain.jsonl"
    if out.is_file() and len(out.read_text().splitlines()) == n:
        return out
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    lines = []
    for i in tqdm(range(n), desc="pretraining scenes", unit="scene", mininterval=2):
        scene = _scene(seed, "pretrain", i)
        rng = random.Random(f"diffusion-demo:{seed}:pretrain-wrong:{i}")
        unused = [c for c in colors if c not in {o.color for o in scene}]
        wrong = [ShapeObject(o.shape, rng.choice(unused), o.bbox) for o in scene]
        names = []
        for k, objects in enumerate((scene, wrong)):
            name = f"images/pretrain-{i:06d}-{k}.png"
            with atomic_file(root / name) as tmp:
                render_scene(objects, WORLD["image_size"]).save(tmp, format="PNG")
            names.append(name)
        record = {"id": f"pretrain-{i:06d}", "caption": caption_for(scene), "image_0": names[0], "image_1": names[1]}
        lines.append(json.dumps(record | {"label_0": 1.0}) + "\n")
    atomic_write_text(out, "".join(lines))
    return out


def prompt_splits(seed: int, n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Disjoint caption lists: ``n_train`` prompts to build preference pairs from, ``n_eval`` held out.

    Captions are drawn from the world's scene distribution (so both lists mix one- and two-object
    captions as the world does) and deduplicated in order of appearance.
    """
    seen: dict[str, None] = {}
    index = 0
    while len(seen) < n_train + n_eval:
        seen.setdefault(caption_for(_scene(seed, "prompts", index)), None)
        index += 1
        if index > 100 * (n_train + n_eval):
            raise ValueError(f"the world has fewer than {n_train + n_eval} distinct captions")
    captions = list(seen)
    return captions[:n_train], captions[n_train : n_train + n_eval]


def _to_pixels(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def fit_autoencoder(
    x: torch.Tensor,
    seed: int,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    block_out_channels: tuple[int, ...] = _VAE["block_out_channels"],
    latent_channels: int = _VAE["latent_channels"],
    desc: str = "VAE",
) -> Any:
    """An ``AutoencoderKL`` (no attention in its middle block) trained to reconstruct images ``x`` (N, 3, H, W) in
    [-1, 1]: one-cycle learning rate, L1 + L2 reconstruction of a posterior sample, KL weight 1e-6. Its
    ``scaling_factor`` is set to 1 / std of the posterior means of ``x``, as Stable Diffusion's was."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=x.shape[-1],
            mid_block_add_attention=False,
        )
        optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        order = torch.Generator().manual_seed(seed)
        vae.train()
        bar = tqdm(range(steps), desc=desc, unit="step", mininterval=2)
        for _ in bar:
            batch = x[torch.randint(0, len(x), (batch_size,), generator=order)]
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            error = reconstruction - batch
            loss = error.abs().mean() + error.pow(2).mean() + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


def train_autoencoder(seed: int, n_images: int, steps: int, batch_size: int = 16, lr: float = 3e-3) -> tuple[Any, dict]:
    """The demo's VAE (:func:`fit_autoencoder`) trained on the world's scenes, and how well it does.

    Trained on ``n_images`` renderings of the ``vae`` split; measured on 200 renderings of another split by the
    shapes reward of the reconstruction (1.0: every named object read back with its colour and shape).
    """
    start = time.perf_counter()
    images, _ = render_scenes(seed, "vae", n_images)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = fit_autoencoder(x, seed, steps, batch_size, lr)
    with torch.no_grad():
        held_out, captions = render_scenes(seed, "vae-check", 200)
        h = torch.tensor(np.stack(held_out)).permute(0, 3, 1, 2).float() / 127.5 - 1
        reconstructed = _to_pixels(vae.decode(vae.encode(h).latent_dist.mean).sample)
    report = {
        "reconstruction_reward": float(np.mean(batch_rewards(list(reconstructed), captions))),
        "reconstruction_mse": float(
            ((torch.tensor(reconstructed).float() / 127.5 - 1) - h.permute(0, 2, 3, 1)).pow(2).mean()
        ),
        "scaling_factor": vae.config.scaling_factor,
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return vae, report


def build_demo_pipeline(out: Path, seed: int, vae_steps: int, vae_images: int = 3000) -> tuple[Path, dict]:
    """The demo's untrained text-to-image pipeline: tiny SD 1.5 with a trained VAE and DDIM sampling.

    Reused when ``out`` holds one built with the same settings (its ``mmpo_demo.json`` stamp).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mmpo.tiny.diffusion import build_tiny_sd

    settings = {
        "seed": seed,
        "vae_steps": vae_steps,
        "vae_images": vae_images,
        "world": WORLD,
        "vae": list(_VAE.items()),
    }
    stamp = out / "mmpo_demo.json"
    if stamp.is_file():
        found = json.loads(stamp.read_text())
        if found.get("settings") == json.loads(json.dumps(settings)):
            return out, found["vae"]
    scratch = out.parent / f".{out.name}-tiny"
    build_tiny_sd(scratch, words=vocabulary(), seed=seed, overwrite=True)
    pipe = StableDiffusionPipeline.from_pretrained(scratch, safety_checker=None, requires_safety_checker=False)
    vae, report = train_autoencoder(seed, vae_images, vae_steps)
    if not math.isfinite(report["reconstruction_mse"]):
        raise RuntimeError(f"the demo VAE did not train: {report}")
    # DDIM with SD's betas: sampling is a deterministic function of the initial noise
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.register_modules(vae=vae, scheduler=scheduler)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "mmpo_demo.json").write_text(json.dumps({"settings": settings, "vae": report}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return out, report
