"""``mmpo sample``: a grid of images from a diffusion checkpoint, with the adapter or denoiser a run saved.

The pipeline is loaded with diffusers' ``DiffusionPipeline.from_pretrained`` (hub id or local folder), the
LoRA adapter that :meth:`mmpo.backbones.DiffusionBackbone.save` wrote with the pipeline's own
``load_lora_weights``, and a fully fine-tuned denoiser with its class's ``from_pretrained``: the ways a user
of the trained weights loads them. Images are drawn as during training (:func:`mmpo.sampling.sample_grid`),
so the same prompts, seed and settings give the grid ``DiffusionSamples`` drew.

Example:
    mmpo sample stable-diffusion-v1-5/stable-diffusion-v1-5 --lora runs/sd15-diffusion-dpo/lora \\
        "a red circle above a blue square" "a green triangle" --rows 2 --out samples.png
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import torch

from mmpo.sampling import SampleSettings, sample_grid, save_grid

__all__ = ["load_pipeline", "main", "read_prompts"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(
    model: str,
    lora: str | None = None,
    denoiser: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
) -> Any:
    """The checkpoint's diffusers pipeline, with a saved LoRA adapter or a fine-tuned denoiser in place.

    Args:
        model: hub id or folder with ``model_index.json``.
        lora: a folder with ``pytorch_lora_weights.safetensors`` (a run's ``save_dir`` with LoRA).
        denoiser: a folder with a denoiser written by ``save_pretrained`` (a run's ``save_dir`` without LoRA).
        dtype: the weights' dtype.
        revision: hub revision of ``model``.
    """
    from diffusers import DiffusionPipeline

    if lora and denoiser:
        raise ValueError("give a LoRA adapter or a fine-tuned denoiser, not both")
    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    if dtype != "float32":  # float32 is the default; passed only when needed, as diffusers 0.42 deprecates torch_dtype
        kwargs["torch_dtype"] = _DTYPES[dtype]
    if denoiser:
        index = DiffusionPipeline.load_config(model, revision=revision)
        name = "unet" if index.get("unet", [None])[0] else "transformer"
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        kwargs[name] = cls.from_pretrained(denoiser, **{k: v for k, v in kwargs.items() if k == "torch_dtype"})
    pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    if lora:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The prompts given as arguments, then the non-empty lines of ``prompts_file``."""
    found = list(prompts)
    if prompts_file:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        found += [line.strip() for line in lines if line.strip()]
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mmpo sample",
        description="Draw a grid of images (rows: seeds, columns: prompts) from a diffusion checkpoint, "
        "optionally with the LoRA adapter or the fine-tuned denoiser a run saved.",
    )
    parser.add_argument("model", help="diffusers pipeline: hub id or folder with model_index.json")
    parser.add_argument("prompts", nargs="*", help="prompts (grid columns)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (after the arguments)")
    parser.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors (a run's save_dir)")
    parser.add_argument("--denoiser", help="folder with a fully fine-tuned denoiser (a run's save_dir without LoRA)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first row (row r: seed + r)")
    parser.add_argument("--rows", type=int, default=1, help="images per prompt (grid rows)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--revision", help="hub revision of MODEL")
    parser.add_argument("-o", "--out", default="samples.png", help="the PNG to write (prompts beside it, .txt)")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts, args.prompts_file)
    if not prompts:
        parser.error("no prompts: give them as arguments or with --prompts-file")
    pipe = load_pipeline(args.model, args.lora, args.denoiser, args.dtype, args.revision).to(args.device)
    settings = SampleSettings(args.seed, args.rows, args.steps, args.guidance, args.resolution)
    path = save_grid(sample_grid(pipe, prompts, settings), args.out, prompts)
    print(f"wrote {path} ({args.rows} × {len(prompts)} images)")


if __name__ == "__main__":
    main()
