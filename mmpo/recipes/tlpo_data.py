"""Data and model of ``mmpo tlpo-demo``: a tiny audio-conditioned talking-portrait diffusion model.

The model generates a clip of the portrait world (`datamodules.worlds.portrait`) as one *film strip*, the T
frames side by side (``(H, T·W)``), so that an image denoiser sees every frame at once and its convolutions
and attention relate neighbouring frames (a frame-sequence model, not a 3-D video UNet):

- the VAE is an ``AutoencoderKL`` trained here on single frames (:func:`train_portrait_vae`); being
  convolutional it encodes a strip frame by frame in effect, so a strip of eight 32 px frames becomes
  latents of 4 × 8 × 64;
- the denoiser is a ``UNet2DConditionModel`` whose input is the noisy latents followed by the clip's
  *condition* channels (:func:`clip_condition`): the reference face's latents repeated under every frame,
  the frame's audio loudness envelope and its mel-band powers, each constant over its frame's columns. The
  conditioning enters by concatenation, as image-to-video denoisers take a reference frame; the caption is
  one fixed phrase (:data:`CAPTION`) for the frozen text encoder the pipeline carries;
- sampling is DDIM with SD's betas (:func:`mmpo.conditioned_sampling.sample_conditioned`).

Records for the datamodule (:func:`write_clip_records`) name the strip as both images of a pair (the plain
denoising stage trains on image 0 only) and the condition as a ``.npy`` file.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.core.atomic import atomic_directory, atomic_file, atomic_write_text
from datamodules.worlds.portrait import load_portrait_clip, write_portrait_world
from mmpo.recipes.diffusion_data import fit_autoencoder

__all__ = [
    "CAPTION",
    "PORTRAIT",
    "build_portrait_pipeline",
    "clip_condition",
    "condition_channels",
    "film_strip",
    "mel_statistics",
    "read_split",
    "strip_frames",
    "strip_pixels",
    "train_portrait_vae",
    "write_clip_records",
    "write_world",
]

#: clips of eight 32 px frames at 8 fps (one second of 8 kHz audio), 8 mel bands
PORTRAIT = {"num_frames": 8, "size": 32, "fps": 8, "sample_rate": 8000, "n_mels": 8}
#: the one caption every clip is conditioned on (the pipeline's text encoder needs one)
CAPTION = "a face talking"
_VAE = {"block_out_channels": (16, 32, 32), "latent_channels": 4}  # 3 levels: 32 px -> 8 x 8 latents per frame
#: the denoiser: three levels over the 8 x 64 strip latents, cross-attention (to the caption) below the top
_UNET = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}


def condition_channels() -> int:
    """Channels of a clip's condition: the reference latents, the envelope and the mel bands."""
    return _VAE["latent_channels"] + 1 + PORTRAIT["n_mels"]


def write_world(root: Path, n_train: int, n_val: int, seed: int) -> dict:
    """The demo's portrait world under ``root`` (reused when it exists with these settings)."""
    settings = {k: PORTRAIT[k] for k in ("num_frames", "size", "fps", "sample_rate", "n_mels")}
    return write_portrait_world(root, n_train=n_train, n_val=n_val, seed=seed, **settings)


def read_split(root: Path, split: str) -> list[dict]:
    """The records of ``split`` (``train`` / ``val``) of a written world."""
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def film_strip(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, C) frames -> (H, T·W, C): side by side, as the world writes clips (its ``read_film_strip`` inverse)."""
    t, h, w, c = frames.shape
    return frames.permute(1, 0, 2, 3).reshape(h, t * w, c)


def strip_pixels(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (3, H, T·W) film strip in [-1, 1]."""
    return film_strip(frames).permute(2, 0, 1).float() / 127.5 - 1


def strip_frames(images: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(N, 3, H, T·W) strips in [0, 1] -> (N, T, H, W, 3) uint8 frames."""
    n, _, h, width = images.shape
    w = width // num_frames
    frames = images.reshape(n, 3, h, num_frames, w).permute(0, 3, 2, 4, 1)
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


def _encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled posterior means of (N, 3, H, W) pixels in [-1, 1]."""
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


def train_portrait_vae(world: Path, seed: int, steps: int, batch_size: int = 16) -> tuple[Any, dict]:
    """The demo VAE trained on every frame of the training clips and reference faces, and how well it does.

    Measured on the validation clips (held-out identities): each strip encoded and decoded whole, then read by
    the critics (:mod:`mmpo.portrait_critics`) beside the original clip's scores.
    """
    from mmpo.portrait_critics import score_clip

    start = time.perf_counter()
    frames = [load_portrait_clip(world, r, r["id"])["frames"] for r in read_split(world, "train")]
    x = torch.cat([f.permute(0, 3, 1, 2) for f in frames]).float() / 127.5 - 1  # (N·T, 3, H, W)
    vae = fit_autoencoder(x, seed, steps, batch_size, block_out_channels=_VAE["block_out_channels"])
    originals, rebuilt = [], []
    for record in read_split(world, "val")[:50]:
        clip = load_portrait_clip(world, record, record["id"])
        strip = strip_pixels(clip["frames"])[None]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(strip).latent_dist.mean).sample
        back = strip_frames((decoded + 1) / 2, PORTRAIT["num_frames"])[0]
        originals.append(score_clip(clip["frames"], clip["envelope"], clip["reference"]))
        rebuilt.append(score_clip(back, clip["envelope"], clip["reference"]))
    report = {
        "steps": steps,
        "scaling_factor": vae.config.scaling_factor,
        "seconds": round(time.perf_counter() - start, 1),
        **{f"original_{k}": float(np.mean([s[k] for s in originals])) for k in originals[0]},
        **{f"reconstructed_{k}": float(np.mean([s[k] for s in rebuilt])) for k in rebuilt[0]},
    }
    return vae, report


def mel_statistics(world: Path) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation of the training clips' mel features (the condition's normalisation)."""
    mel = np.concatenate([np.asarray(r["mel"], dtype=np.float64) for r in read_split(world, "train")])
    return mel.mean(0).tolist(), np.maximum(mel.std(0), 1e-6).tolist()


def clip_condition(
    vae: Any, reference: torch.Tensor, envelope: torch.Tensor, mel: torch.Tensor, mel_stats: tuple[list, list]
) -> torch.Tensor:
    """A clip's condition channels (4 + 1 + n_mels, h, T·w) float32 at the strip latents' size.

    Args:
        vae: the demo VAE.
        reference: (H, W, 3) uint8 reference face; its scaled latents repeat under every frame.
        envelope: (T,) loudness in [0, 1], as ``2·envelope − 1`` over each frame's columns.
        mel: (T, n_mels) log10 mel powers, standardised by ``mel_stats`` (mean, std per band).
        mel_stats: from :func:`mel_statistics`.
    """
    ref = _encode(vae, reference.permute(2, 0, 1)[None].float() / 127.5 - 1)[0]  # (c, h, w)
    t = envelope.shape[0]
    c, h, w = ref.shape
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in mel_stats)
    per_frame = torch.cat([2 * envelope.float()[:, None] - 1, (mel.float() - mean) / std], dim=1)  # (T, 1 + M)
    audio = per_frame.T[:, None, :, None].expand(-1, h, t, w).reshape(-1, h, t * w)
    return torch.cat([ref.repeat(1, 1, t), audio])


def build_portrait_pipeline(out: Path, world: Path, seed: int, vae_steps: int) -> tuple[Path, dict]:
    """The demo's untrained model: tiny SD 1.5 pieces (frozen random CLIP for :data:`CAPTION`), the VAE trained
    here, a UNet over strip latents with the condition channels, DDIM sampling. Reused when ``out`` holds one
    built with the same settings (its ``mmpo_demo.json`` stamp)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from mmpo.tiny.diffusion import build_tiny_sd

    settings = {"seed": seed, "vae_steps": vae_steps, "portrait": PORTRAIT, "vae": _VAE, "unet": _UNET}
    settings = json.loads(json.dumps(settings))
    stamp = out / "mmpo_demo.json"
    if stamp.is_file() and (found := json.loads(stamp.read_text())).get("settings") == settings:
        return out, found["vae"]
    scratch = out.parent / f".{out.name}-tiny"
    build_tiny_sd(scratch, words=CAPTION.split(), seed=seed, overwrite=True)
    pipe = StableDiffusionPipeline.from_pretrained(scratch, safety_checker=None, requires_safety_checker=False)
    vae, report = train_portrait_vae(world, seed, vae_steps)
    if not math.isfinite(report["scaling_factor"]):
        raise RuntimeError(f"the demo VAE did not train: {report}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=(PORTRAIT["size"] // 4, PORTRAIT["num_frames"] * PORTRAIT["size"] // 4),
            in_channels=_VAE["latent_channels"] + condition_channels(),
            out_channels=_VAE["latent_channels"],
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=8,
            cross_attention_dim=pipe.text_encoder.config.hidden_size,
            **_UNET,
        )
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    pipe.register_modules(vae=vae, unet=unet, scheduler=scheduler)
    with atomic_directory(out) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "mmpo_demo.json").write_text(json.dumps({"settings": settings, "vae": report}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
    return out, report


def write_clip_records(root: Path, world: Path, pipeline: Path, split: str, limit: int | None = None) -> Path:
    """``root/<split>-clips.jsonl``: each clip of ``world``'s ``split`` as a record of the diffusion datamodule
    (its strip as image 0 and image 1, ``condition`` a ``.npy`` under ``root/conditions``), paths relative to
    ``root``, which must contain ``world``. The condition is computed with ``pipeline``'s VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline, subfolder="vae").eval()
    stats = mel_statistics(world)
    (root / "conditions").mkdir(parents=True, exist_ok=True)
    lines = []
    records = read_split(world, split)[:limit]
    for record in tqdm(records, desc=f"conditions ({split})", unit="clip", mininterval=2):
        clip = load_portrait_clip(world, record, record["id"], PORTRAIT["n_mels"])
        condition = clip_condition(vae, clip["reference"], clip["envelope"], clip["mel"], stats)
        name = f"conditions/{record['id']}.npy"
        with atomic_file(root / name) as tmp, open(tmp, "wb") as f:
            np.save(f, condition.numpy())
        strip = str((world / record["frames"][0]).relative_to(root))
        entry = {"id": record["id"], "caption": CAPTION, "image_0": strip, "image_1": strip, "label_0": 1.0}
        lines.append(json.dumps(entry | {"condition": name}) + "\n")
    out = root / f"{split}-clips.jsonl"
    atomic_write_text(out, "".join(lines))
    return out
