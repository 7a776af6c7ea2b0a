"""Floating-point operations of one Diffusion-DPO step, per pair, at Stable Diffusion 1.5 and SDXL sizes.

    .venv/bin/python benchmarks/diffusion_step_flops.py
    .venv/bin/python benchmarks/diffusion_step_flops.py --geometry sd15 --resolution 128

What bounds the speed-up of a cache: a step that reads cached latents and text embeddings still runs the
policy (forward and backward) and the reference (forward) over both images of every pair, exactly as the
diffusers example's step does after encoding them; only the VAE encoder and the text encoder(s) go. The ratio
of the two FLOP counts is the speed-up caching can give when every operation runs equally fast; timings
(``bench_diffusion_dpo.py``) then say how far a machine is from it.

Each component is built at the real model's sizes on PyTorch's ``meta`` device (no weights are allocated,
nothing is computed or downloaded) and run under ``torch.utils.flop_counter.FlopCounterMode``, which counts
matrix products, convolutions and attention (the operations that dominate; normalisations and element-wise
operations are not counted). Per pair: the VAE encoder on its two images, the text encoder(s) on its one
caption (77 tokens), the LoRA policy UNet (rank 4 on ``to_q, to_k, to_v, to_out.0``, base frozen) forward and
backward over the two latents, the reference (the same UNet without the adapter) forward over them.

Steps compared (as in ``bench_diffusion_dpo.py``):

- ``diffusers``: the example's step, everything above;
- ``mmpo``: latents and text embeddings from the cache (the policy and the reference);
- ``mmpo-cached-ref``: the reference's statistics cached too (the policy only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GEOMETRIES = {"sd15": 512, "sdxl": 1024}


def _unet(geometry: str, resolution: int):
    from diffusers import UNet2DConditionModel

    if geometry == "sd15":
        return UNet2DConditionModel(sample_size=resolution // 8, cross_attention_dim=768, attention_head_dim=8)
    return UNet2DConditionModel(  # SDXL base 1.0's UNet configuration
        sample_size=resolution // 8,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _text_encoders(geometry: str) -> list:
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    if geometry == "sd15":
        return [CLIPTextModel(clip_l)]
    big_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
    return [CLIPTextModel(clip_l), CLIPTextModel(big_g)]


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # SD 1.5's and SDXL's VAE (the same architecture)
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    )


def count(geometry: str, resolution: int, rank: int = 4) -> dict[str, float]:
    """TFLOPs per pair of each component of a Diffusion-DPO step (see the module docstring)."""
    import torch
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    side = resolution // 8
    with torch.device("meta"):
        vae, encoders, unet = _vae(), _text_encoders(geometry), _unet(geometry, resolution)
        pixels = torch.randn(2, 3, resolution, resolution)
        latents = torch.randn(2, 4, side, side)
        ids = torch.zeros(1, 77, dtype=torch.long)
        width = 768 if geometry == "sd15" else 2048
        context = torch.randn(2, 77, width)
        timesteps = torch.zeros(2, dtype=torch.long)
        extra = {}
        if geometry == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": torch.zeros(2, 6)}}
    unet.requires_grad_(False)
    out = {"vae_encoder": flops(lambda: vae.encode(pixels).latent_dist.sample())}
    out["text_encoders"] = sum(flops(lambda m=m: m(ids)) for m in encoders)
    out["reference_forward"] = flops(lambda: unet(latents, timesteps, context, **extra).sample)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))

    def policy():
        unet(latents, timesteps, context, **extra).sample.float().square().mean().backward()

    out["policy_forward_backward"] = flops(policy)
    return out


def steps(parts: dict[str, float]) -> dict[str, float]:
    """TFLOPs per pair of each framework's step."""
    unet = parts["policy_forward_backward"] + parts["reference_forward"]
    return {
        "diffusers": parts["vae_encoder"] + parts["text_encoders"] + unet,
        "mmpo": unet,
        "mmpo-cached-ref": parts["policy_forward_backward"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=(*GEOMETRIES, "both"), default="both")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default: 512 for sd15, 1024 for sdxl)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    geometries = list(GEOMETRIES) if args.geometry == "both" else [args.geometry]
    report: dict[str, Any] = {}
    for geometry in geometries:
        resolution = args.resolution or GEOMETRIES[geometry]
        parts = count(geometry, resolution, args.rank)
        totals = steps(parts)
        report[f"{geometry}@{resolution}"] = {"components": parts, "steps": totals}
        print(f"\n{geometry} at {resolution} px, TFLOPs per pair (2 images, 1 caption)")
        for name, value in parts.items():
            print(f"  {name:<26}{value:>9.3f}")
        print(f"  {'step':<26}{'TFLOPs':>9}{'diffusers / step':>18}")
        for name, value in totals.items():
            print(f"  {name:<26}{value:>9.3f}{totals['diffusers'] / value:>18.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
