"""``mmpo diffusion-demo``: Diffusion-DPO raises a tiny text-to-image model's reward, on the CPU, no downloads.

1. The model (:mod:`mmpo.recipes.diffusion_data`): tiny SD 1.5 (random frozen CLIP, UNet over 8 × 8 latents) with a
   VAE trained here to reconstruct the shapes world's 32 px scenes, and DDIM sampling.
2. Pretraining in the framework: the whole UNet by plain denoising training (``SFTLoss`` through
   ``PreferenceModule`` and ``DiffusionBackbone``) on world scenes and their captions, latents and text
   embeddings cached once. One pretrained model is shared by every seed.
3. For each seed: the pretrained model samples ``--samples-per-prompt`` images of each training prompt (DDIM,
   no guidance, noise seeds that depend on the seed); each image is scored by the shapes reward
   (:mod:`datamodules.worlds.shapes_reward`: colour and shape of every named object, read from the pixels);
   every two images of a prompt whose rewards differ by at least ``--min-gap`` become a pair. Diffusion-DPO
   (``DPOLoss`` on −(denoising error)) trains a LoRA adapter on them, the reference being the adapter disabled.
4. Evaluation: the pretrained model and each seed's adapter (loaded as a user loads them: diffusers'
   ``load_lora_weights``) sample held-out prompts (no pair was built from them) and the training prompts, at the
   same fixed noise; mean reward, colour and shape hit rates, mean ± std over seeds. Before/after grids of
   held-out prompts are written as PNGs.

The table is printed and written with every per-seed figure to ``--workdir``/``results.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.core.atomic import atomic_directory
from mmpo.recipes.diffusion_data import WORLD, build_demo_pipeline, prompt_splits, write_pretraining_pairs
from mmpo.recipes.report import publish, spread

__all__ = ["build_pairs", "evaluate", "main", "pretrain", "train_dpo"]

METRICS = ("reward", "color_hits", "shape_hits", "extras", "perfect")
EVAL_NOISE_SEED = 0  # evaluation rows use noise seeds 0.. (pair sampling of seed s starts at 1000 (s + 1))


def _trainer(max_steps: int, root: Path) -> Any:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="cpu",
        logger=CSVLogger(str(root), name="", version=""),  # root/metrics.csv: `mmpo plot` draws it
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_steps=max_steps,
        default_root_dir=str(root),
        log_every_n_steps=10,
    )


def _datamodule(
    train_file: Path,
    batch_size: int,
    seed: int,
    cache_dir: Path | None = None,
    caption_dropout: float = 0.0,
    data: dict[str, Any] | None = None,
) -> Any:
    """The demo's datamodule; ``data`` overrides its arguments (another resolution, ``data_root``, ...)."""
    from datamodules import DiffusionPreferenceDataModule

    return DiffusionPreferenceDataModule(
        train_file=str(train_file),
        **{
            "resolution": WORLD["image_size"],
            "center_crop": True,
            "random_flip": False,  # captions name objects left to right
            "loader": {"batch_size": batch_size, "seed": seed, "num_workers": 0},
            "cache_dir": str(cache_dir) if cache_dir else None,
            "caption_dropout": caption_dropout,
            **(data or {}),
        },
    )


def pretrain(
    pipeline: Path,
    pairs: Path,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    caption_dropout: float,
    data: dict[str, Any] | None = None,
) -> Path:
    """The whole UNet trained by plain denoising on ``pairs``' preferred images (a share of the captions dropped, for
    classifier-free guidance); ``out`` is the pipeline with it. ``data``: datamodule arguments that differ from the
    shapes demo's (:func:`_datamodule`)."""
    import lightning as L

    from mmpo.backbones import DiffusionBackbone
    from mmpo.losses import SFTLoss
    from mmpo.module import PreferenceModule

    stamp = {"pipeline": pipeline.name, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    stamp["caption_dropout"] = caption_dropout
    if data:
        stamp["data"] = data
    if (out / "mmpo_pretrain.json").is_file() and json.loads((out / "mmpo_pretrain.json").read_text()) == stamp:
        return out
    L.seed_everything(seed, verbose=False)
    backbone = DiffusionBackbone(str(pipeline), lora=None)
    cache = out.parent / "pretrain-latents"
    dm = _datamodule(pairs, batch_size, seed, cache, caption_dropout, data)
    dm.build_cache(**backbone.cache_encoders(backbone.build()), batch_size=256)
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=steps, eta_min=lr / 10)
    unet = out.parent / "pretrained-unet"
    module = PreferenceModule(
        backbone, SFTLoss(), optimizer=optimizer, scheduler=scheduler, reference="none", save_dir=str(unet)
    )
    _trainer(steps, out.parent / "pretrain-run").fit(module, datamodule=dm)
    with atomic_directory(out) as tmp:
        shutil.copytree(pipeline, tmp, dirs_exist_ok=True)
        shutil.rmtree(tmp / "unet")
        shutil.copytree(unet, tmp / "unet")
        (tmp / "mmpo_pretrain.json").write_text(json.dumps(stamp))
    return out


def _score(images: torch.Tensor, prompts: list[str]) -> list[Any]:
    """Shapes rewards of (N, 3, H, W) images in [0, 1] against their prompts."""
    from datamodules.worlds.shapes_reward import caption_reward

    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [caption_reward(p, c) for p, c in zip(pixels, prompts, strict=True)]


def _sample(
    pipe: Any, prompts: list[str], seed: int, rows: int, steps: int, guidance: float, desc: str
) -> torch.Tensor:
    """(rows, P, 3, R, R) DDIM samples with classifier-free ``guidance``, noise of prompt p in row r from seed + r."""
    from mmpo.sampling import SampleSettings, sample_grid

    chunks = [prompts[i : i + 128] for i in range(0, len(prompts), 128)]
    grids = [
        sample_grid(
            pipe, chunk, SampleSettings(seed=seed, rows=rows, num_inference_steps=steps, guidance_scale=guidance)
        )
        for chunk in tqdm(chunks, desc=desc, unit="batch", leave=False)
    ]
    return torch.cat(grids, dim=1)


def build_pairs(
    pipe: Any, prompts: list[str], out: Path, seed: int, k: int, min_gap: float, steps: int, guidance: float
) -> dict:
    """Sample ``k`` images per prompt, score them, write ``out/pairs.jsonl`` (winner first, both scores).

    Every two images of a prompt whose rewards differ by at least ``min_gap`` make a pair.
    """
    from datamodules.core.atomic import atomic_file, atomic_write_text
    from mmpo.sampling import grid_image

    grid = _sample(pipe, prompts, 1000 * (seed + 1), k, steps, guidance, "sampling pair candidates")  # (k, P, 3, R, R)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines, rewards = [], []
    for p, prompt in enumerate(prompts):
        scores = [r.score for r in _score(grid[:, p], [prompt] * k)]
        rewards += scores
        ordered = [
            (w, lose) if scores[w] > scores[lose] else (lose, w)
            for w, lose in itertools.combinations(range(k), 2)
            if abs(scores[w] - scores[lose]) >= min_gap
        ]
        for i in sorted({i for pair in ordered for i in pair}):  # each image of a pair written once
            with atomic_file(out / f"images/p{p:04d}-s{i}.png") as tmp:
                grid_image(grid[i : i + 1, p : p + 1]).save(tmp, format="PNG")
        for w, lose in ordered:
            record = {"id": f"p{p:04d}-{w}-{lose}", "caption": prompt}
            record |= {"image_0": f"images/p{p:04d}-s{w}.png", "image_1": f"images/p{p:04d}-s{lose}.png"}
            lines.append(json.dumps(record | {"label_0": 1.0, "scores": [scores[w], scores[lose]]}) + "\n")
    atomic_write_text(out / "pairs.jsonl", "".join(lines))
    return {"pairs": len(lines), "candidates": len(rewards), "candidate_reward": float(np.mean(rewards))}


def train_dpo(base: Path, pairs: Path, out: Path, args: argparse.Namespace, seed: int) -> Path:
    """Diffusion-DPO of the pretrained UNet: a LoRA adapter (reference: the adapter disabled) or, with
    ``--lora-rank 0``, the whole UNet (reference: a frozen copy, as the official Diffusion-DPO code). Returns the
    folder the adapter or the UNet is saved in."""
    import lightning as L

    from mmpo.backbones import DiffusionBackbone, LoraSettings
    from mmpo.losses import DPOLoss
    from mmpo.module import PreferenceModule

    L.seed_everything(seed, verbose=False)
    lora = None
    if args.lora_rank:
        lora = LoraSettings(r=args.lora_rank, alpha=args.lora_rank, dropout=0.0, target_modules=args.lora_targets)
    backbone = DiffusionBackbone(str(base), lora=lora)
    optimizer = functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    module = PreferenceModule(
        backbone, DPOLoss(beta=args.beta), optimizer=optimizer, reference="adapter" if lora else "copy",
        save_dir=str(out),
    )  # fmt: skip
    _trainer(args.dpo_steps, out.parent / "dpo-run").fit(module, datamodule=_datamodule(pairs, args.batch_size, seed))
    return out


def evaluate(pipe: Any, prompts: list[str], args: argparse.Namespace) -> tuple[dict[str, float], torch.Tensor]:
    """Mean figures of ``args.eval_rows`` samples per prompt at the evaluation noise, and the samples."""
    rows = args.eval_rows
    grid = _sample(pipe, prompts, EVAL_NOISE_SEED, rows, args.sampling_steps, args.guidance, "evaluation")
    found = _score(grid.flatten(0, 1), [p for _ in range(rows) for p in prompts])
    named = [len(r.named) for r in found]
    figures = {
        "reward": float(np.mean([r.score for r in found])),
        "color_hits": float(sum(r.color_hits for r in found) / sum(named)),
        "shape_hits": float(sum(r.shape_hits for r in found) / sum(named)),
        "extras": float(np.mean([r.extras for r in found])),
        "perfect": float(np.mean([r.score == 1.0 for r in found])),
    }
    return figures, grid


def _table(results: dict) -> list[str]:
    lines = [f"{'prompts / metric':<24}{'pretrained':>12}{'Diffusion-DPO':>18}"]
    for split in ("held_out", "train"):
        for metric in METRICS:
            before = results["before"][split][metric]
            after = [run[split][metric] for run in results["after"]]
            lines.append(f"{split + ' ' + metric:<24}{before:>12.3f}{spread(after):>18}")
    return lines


def save_comparison(before: torch.Tensor, after: torch.Tensor, prompts: list[str], path: Path, title: str) -> Path:
    """Before (top) and after (bottom) grids of the same prompts and noise, prompts as column titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datamodules.core.atomic import atomic_file
    from mmpo.sampling import grid_image

    rows = before.shape[0]
    fig, axes = plt.subplots(2, 1, figsize=(1.3 * len(prompts) + 0.5, 2.8 * rows * 0.5 + 1.6))
    for ax, grid, name in zip(axes, (before, after), ("pretrained model", title), strict=True):
        ax.imshow(np.asarray(grid_image(grid)), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_yticks([])
        side = grid.shape[-1]
        ax.set_xticks([side * (i + 0.5) for i in range(len(prompts))])
        ax.set_xticklabels([p.rstrip(" .").replace(" and ", "\n+ ") for p in prompts], fontsize=6)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="mmpo diffusion-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/diffusion_demo", help="where data, models and results go")
    parser.add_argument("--seeds", type=int, default=3, help="Diffusion-DPO runs (seeds 0..n-1)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world, the VAE and the pretraining")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--n-pretrain", type=int, default=3000, help="pretraining scenes")
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument(
        "--caption-dropout", type=float, default=0.1, help="share of pretraining captions dropped (for guidance)"
    )
    parser.add_argument("--n-prompts", type=int, default=200, help="training prompts (pairs are built from them)")
    parser.add_argument("--n-eval", type=int, default=100, help="held-out prompts")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="candidates sampled per training prompt")
    parser.add_argument("--min-gap", type=float, default=0.25, help="smallest reward difference of a pair")
    parser.add_argument("--eval-rows", type=int, default=4, help="samples per prompt in the evaluation")
    parser.add_argument("--sampling-steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale of every sample")
    parser.add_argument("--dpo-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per Diffusion-DPO step")
    parser.add_argument("--beta", type=float, default=500.0, help="DPOLoss beta (no 0.5 factor: official / 2)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA adapter")
    parser.add_argument("--lora-rank", type=int, default=8, help="0: train the whole UNet against a frozen copy")
    parser.add_argument(
        "--lora-targets", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"], help="UNet modules with LoRA"
    )
    parser.add_argument("--grid-prompts", type=int, default=8, help="held-out prompts drawn in the PNG grids")
    args = parser.parse_args(argv)

    from mmpo.recipes.sample import load_pipeline

    start, seconds = time.perf_counter(), {}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print("[mmpo] stage 1/4: the model (tiny SD 1.5, VAE trained on the world)")
    t0 = time.perf_counter()
    pipeline, vae = build_demo_pipeline(workdir / "untrained", args.world_seed, args.vae_steps)
    print(f"[mmpo] VAE: held-out reconstructions read back with reward {vae['reconstruction_reward']:.3f}")
    seconds["model"] = round(time.perf_counter() - t0, 1)

    print(f"[mmpo] stage 2/4: pretraining the UNet ({args.pretrain_steps} steps of plain denoising)")
    t0 = time.perf_counter()
    pairs = write_pretraining_pairs(workdir / "pretrain-data", args.n_pretrain, args.world_seed)
    base = pretrain(
        pipeline, pairs, workdir / "pretrained", args.pretrain_steps, args.pretrain_batch_size, args.pretrain_lr,
        args.world_seed, args.caption_dropout,
    )  # fmt: skip
    seconds["pretrain"] = round(time.perf_counter() - t0, 1)

    train_prompts, eval_prompts = prompt_splits(args.world_seed, args.n_prompts, args.n_eval)
    base_pipe = load_pipeline(str(base))
    t0 = time.perf_counter()
    before = {}
    before["held_out"], before_grid = evaluate(base_pipe, eval_prompts, args)
    before["train"], _ = evaluate(base_pipe, train_prompts, args)
    seconds["evaluate pretrained"] = round(time.perf_counter() - t0, 1)
    print(f"[mmpo] pretrained model: held-out reward {before['held_out']['reward']:.3f}")

    after, counts = [], []
    shown = eval_prompts[: args.grid_prompts]
    for seed in range(args.seeds):
        run = workdir / f"seed-{seed}"
        print(f"[mmpo] stage 3/4: seed {seed}: pairs from the pretrained model's samples")
        t0 = time.perf_counter()
        built = build_pairs(
            base_pipe, train_prompts, run / "pairs", seed, args.samples_per_prompt, args.min_gap, args.sampling_steps,
            args.guidance,
        )  # fmt: skip
        counts.append(built)
        print(
            f"[mmpo] {built['pairs']} pairs from {built['candidates']} samples "
            f"(mean reward {built['candidate_reward']:.3f})"
        )
        if built["pairs"] == 0:
            raise RuntimeError(f"no two samples of a prompt differ by --min-gap {args.min_gap}: no pairs to train on")
        seconds[f"pairs seed {seed}"] = round(time.perf_counter() - t0, 1)
        print(f"[mmpo] stage 4/4: seed {seed}: Diffusion-DPO ({args.dpo_steps} steps)")
        t0 = time.perf_counter()
        trained = train_dpo(
            base, run / "pairs" / "pairs.jsonl", run / ("lora" if args.lora_rank else "unet"), args, seed
        )
        seconds[f"dpo seed {seed}"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        pipe = load_pipeline(str(base), **{("lora" if args.lora_rank else "denoiser"): str(trained)})
        figures = {}
        figures["held_out"], grid = evaluate(pipe, eval_prompts, args)
        figures["train"], _ = evaluate(pipe, train_prompts, args)
        after.append(figures)
        save_comparison(
            before_grid[:2, : len(shown)], grid[:2, : len(shown)], shown, run / "before_after.png",
            f"after Diffusion-DPO (seed {seed}, {args.dpo_steps} steps)",
        )  # fmt: skip
        seconds[f"evaluate seed {seed}"] = round(time.perf_counter() - t0, 1)
        print(
            f"[mmpo] seed {seed}: held-out reward {before['held_out']['reward']:.3f} "
            f"-> {figures['held_out']['reward']:.3f}"
        )

    total = round(time.perf_counter() - start, 1)
    results = {
        "before": before,
        "after": after,
        "pairs": counts,
        "vae": vae,
        "prompts": {"train": len(train_prompts), "held_out": len(eval_prompts)},
        "settings": vars(args),
        "seconds": seconds,
        "total_seconds": total,
    }
    lines = [
        "",
        f"mmpo diffusion-demo: shapes reward of {args.eval_rows} samples per prompt ({len(eval_prompts)} held-out, "
        f"{len(train_prompts)} training prompts),",
        f"pretrained model and after {args.dpo_steps} Diffusion-DPO steps, mean ± std over {args.seeds} seed(s)",
        "",
        *_table(results),
        "",
        f"pairs per seed: {[c['pairs'] for c in counts]}; stage seconds: {seconds}; total {total:.0f} s",
    ]
    return publish(workdir, lines, results)


if __name__ == "__main__":
    main()
