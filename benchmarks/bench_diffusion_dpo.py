"""Diffusion-DPO training throughput and peak memory: mmpo against the diffusers example's training step.

    .venv/bin/python benchmarks/bench_diffusion_dpo.py --steps 10 --warmup 2 --repeats 2 --threads 1

Frameworks, each in a fresh child process (so its peak RSS is its own), on the same pipeline
(``--geometry tiny``: ``mmpo.tiny.diffusion.build_tiny_sd``; ``sd15``: random weights at Stable Diffusion
1.5's sizes, so the VAE, text encoder and UNet cost what they cost in the real model), the same synthetic
pairs, batch, LoRA (rank r, alpha r, on ``to_q, to_k, to_v, to_out.0``), AdamW at a constant learning
rate, gradient clipping at 1.0, sigmoid Diffusion-DPO with beta 2500 (the diffusers example's convention,
no 0.5 factor), the disabled adapter as the reference, centre crop and no flip:

- ``diffusers``: a re-implementation of one step of diffusers'
  ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` in a plain loop: the images of both
  sides read and transformed, encoded by the VAE (``latent_dist.sample()``), the captions tokenised and
  encoded by the text encoder, every step; one noise draw and timestep per pair; the policy and the
  reference (adapters disabled, no gradient) each run once over winners and losers together.
- ``mmpo``: ``PreferenceModule`` with ``DiffusionBackbone`` through a Lightning ``Trainer``, latents and
  text embeddings read from the on-disk cache (built before training, timed on its own).
- ``mmpo-uncached``: the same, encoding the images and captions on the fly each step.
- ``mmpo-cached-ref``: ``mmpo`` with ``reference: cached`` (each record's (t, ε) drawn from its id,
  ``noise_per_record``): the reference's statistics computed once before training (outside the timed window,
  like the latent cache), so a step runs the policy only.

The timed window runs from the end of the last warm-up step to the end of the last step (data loading,
encoding, both passes, backward and optimizer step). The parent prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runners import StepClock, peak_memory, rss_now_mb  # noqa: E402

FRAMEWORKS = ("mmpo", "mmpo-uncached", "mmpo-cached-ref", "diffusers")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
BETA = 2500.0
LEARNING_RATE = 1e-4


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank, as the diffusers example)")
    ap.add_argument(
        "--geometry", choices=("tiny", "sd15"), default="tiny",
        help="tiny: mmpo.tiny's SD 1.5-style pipeline; sd15: random init at SD 1.5's sizes (about 4 GB on disk)",
    )  # fmt: skip
    ap.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of " + ",".join(FRAMEWORKS)
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: cores)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per framework, interleaved; the best is reported")
    ap.add_argument("--workdir", default="runs/bench-diffusion", help="where the model and the pairs are written")
    ap.add_argument(
        "--release-host-memory", action="store_true",
        help="mmpo's runs leave the host allocator alone (keep_host_memory=False), as the example's loop does",
    )  # fmt: skip
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one framework's run
    return ap.parse_args(argv)


def build_sd15_geometry(out: Path, words: list[str]) -> Path:
    """A random-init pipeline with Stable Diffusion 1.5's component sizes (UNet 860M, VAE 84M, CLIP ViT-L/14
    text encoder 123M), a word tokenizer over ``words`` (77 tokens), PNDM as SD 1.5: its compute balance
    between VAE, text encoder and UNet is the real one, with nothing downloaded."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mmpo.tiny.diffusion import diffusion_word_tokenizer

    if (out / "model_index.json").exists():
        return out
    tokenizer = diffusion_word_tokenizer(words, max_length=77)
    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        scaling_factor=0.18215,
    )  # fmt: skip
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's blocks
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**schedule, skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(out)
    return out


def _prepare(root: Path, n_pairs: int, resolution: int, geometry: str = "tiny") -> tuple[Path, Path]:
    from datamodules.diffusion.module import write_diffusion_pairs
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.diffusion import build_tiny_sd

    if geometry == "sd15":
        model = build_sd15_geometry(root / "model-sd15", vocabulary())
    else:
        model = build_tiny_sd(root / "model", words=vocabulary(), seed=0)
    pairs = write_diffusion_pairs(root / f"pairs-{n_pairs}-{resolution}px", n=n_pairs, seed=0, image_size=resolution)
    return model, pairs


def run_mmpo(
    args: argparse.Namespace, model_dir: Path, pairs: Path, cached: bool, cached_reference: bool = False
) -> dict[str, Any]:
    import shutil
    import tempfile

    import lightning as L
    import torch

    from datamodules.diffusion.module import DiffusionPreferenceDataModule
    from mmpo.backbones import DiffusionBackbone, LoraSettings
    from mmpo.losses import DPOLoss
    from mmpo.module import PreferenceModule

    imports_rss_mb = rss_now_mb()
    clock = StepClock(cuda=False)

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step()

    lora = LoraSettings(r=args.rank, alpha=args.rank, dropout=0.0, target_modules=TARGETS)
    backbone = DiffusionBackbone(str(model_dir), lora=lora, noise_per_record=cached_reference)
    optimizer = functools.partial(torch.optim.AdamW, lr=LEARNING_RATE)
    cache_dir = tempfile.mkdtemp(prefix="mmpo-bench-latents-") if cached else None
    reference = "cached" if cached_reference else "adapter"
    module = PreferenceModule(
        backbone, DPOLoss(beta=BETA), optimizer=optimizer, reference=reference,
        reference_cache_dir=None if cache_dir is None else str(Path(cache_dir) / "reference"),
        keep_host_memory=not args.release_host_memory,
    )  # fmt: skip
    dm = DiffusionPreferenceDataModule(
        train_file=str(pairs),
        resolution=args.resolution,
        center_crop=True,
        random_flip=False,
        cache_dir=cache_dir,
        loader={"batch_size": args.batch, "num_workers": 0, "seed": 0},
    )
    extra: dict[str, Any] = {}
    try:
        if cached:  # with the policy's own encoders, before training and outside the timed window
            module.configure_model()
            t0 = clock._now()
            dm.build_cache(**backbone.cache_encoders(module.policy), show_progress=False)
            extra["cache_seconds"] = clock._now() - t0
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=args.warmup + args.steps,
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Timer()],
        )
        L.seed_everything(0, verbose=False)
        trainer.fit(module, datamodule=dm)
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        **extra,
        **clock.summary(args.warmup, args.batch),
        **peak_memory(False, imports_rss_mb),
        "loss": float(trainer.callback_metrics.get("train/loss_step", float("nan"))),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def run_diffusers_example(args: argparse.Namespace, model_dir: Path, pairs: Path) -> dict[str, Any]:
    """The diffusers example's training step (see the module docstring), in a plain loop."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from torchvision import transforms
    from transformers import CLIPTextModel, CLIPTokenizer

    imports_rss_mb = rss_now_mb()
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    to_tensor = transforms.Compose(
        [
            transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(args.resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    root = pairs.parent
    records = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]

    def example(record: dict[str, Any]) -> tuple[torch.Tensor, list[int]]:
        images = [to_tensor(Image.open(root / record[k]).convert("RGB")) for k in ("image_0", "image_1")]
        if float(record["label_0"]) == 0:  # winner first, on the channel axis
            images = images[::-1]
        ids = tokenizer(record["caption"], max_length=tokenizer.model_max_length, padding="max_length", truncation=True)
        return torch.cat(images, dim=0), ids.input_ids

    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(records), generator=generator).tolist()
    clock = StepClock(cuda=False)
    unet.train()
    clock.begin()
    loss = torch.tensor(float("nan"))
    for step in range(args.warmup + args.steps):
        start = (step * args.batch) % len(records)
        rows = [example(records[order[(start + i) % len(records)]]) for i in range(args.batch)]
        pixel_values = torch.stack([r[0] for r in rows]).float()
        input_ids = torch.tensor([r[1] for r in rows])
        feed = torch.cat(pixel_values.chunk(2, dim=1))  # (2B, 3, R, R): winners, then losers
        with torch.no_grad():
            latents = vae.encode(feed).latent_dist.sample() * vae.config.scaling_factor
            encoder_hidden_states = text_encoder(input_ids)[0].repeat(2, 1, 1)
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), dtype=torch.long).repeat(2)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        model_pred = unet(noisy, timesteps, encoder_hidden_states).sample
        model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        model_w, model_l = model_losses.chunk(2)
        unet.disable_adapters()
        with torch.no_grad():
            ref_pred = unet(noisy, timesteps, encoder_hidden_states).sample
            ref_losses = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            ref_w, ref_l = ref_losses.chunk(2)
        unet.enable_adapters()
        logits = (ref_w - ref_l) - (model_w - model_l)
        loss = -F.logsigmoid(BETA * logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        clock.step()
    return {
        **clock.summary(args.warmup, args.batch),
        **peak_memory(False, imports_rss_mb),
        "loss": float(loss),
        "trainable_params": sum(p.numel() for p in params),
    }


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.workdir)
    model_dir, pairs = _prepare(root, args.batch * (args.warmup + args.steps), args.resolution, args.geometry)
    if args.child == "diffusers":
        result = run_diffusers_example(args, model_dir, pairs)
    else:
        result = run_mmpo(args, model_dir, pairs, cached=args.child != "mmpo-uncached",
                          cached_reference=args.child == "mmpo-cached-ref")  # fmt: skip
    result["torch_threads"] = torch.get_num_threads()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _run_child(args: argparse.Namespace, framework: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--child={framework}"]
    for name in ("steps", "warmup", "batch", "resolution", "rank", "geometry", "threads", "workdir"):
        cmd.append(f"--{name}={getattr(args, name)}")
    if args.release_host_memory:
        cmd.append("--release-host-memory")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{framework} failed:\n{tail}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.child:
        _child(args)
        return {}
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if unknown := set(frameworks) - set(FRAMEWORKS):
        raise SystemExit(f"unknown framework(s) {sorted(unknown)}; choose from {FRAMEWORKS}")
    load_before = os.getloadavg()[0]
    _prepare(Path(args.workdir), args.batch * (args.warmup + args.steps), args.resolution, args.geometry)  # once
    best: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[float]] = {fw: [] for fw in frameworks}
    for rep in range(args.repeats):
        for fw in frameworks:
            r = _run_child(args, fw)
            print(f"  [run {rep + 1}] {fw}: {r['pairs_per_s']:.3f} pairs/s, {r['peak_mb']:.0f} MB", flush=True)
            runs[fw].append(r["pairs_per_s"])
            if fw not in best or r["pairs_per_s"] > best[fw]["pairs_per_s"]:
                best[fw] = r
    base = best.get("diffusers")
    rows = []
    for fw in frameworks:
        r = best[fw]
        paired = [a / b for a, b in zip(runs[fw], runs["diffusers"], strict=True)] if base else None
        rows.append(
            {
                "framework": fw,
                **r,
                "runs_pairs_per_s": runs[fw],
                "speedup_vs_diffusers": r["pairs_per_s"] / base["pairs_per_s"] if base else None,
                "memory_vs_diffusers": r["peak_mb"] / base["peak_mb"] if base else None,
                "above_imports_vs_diffusers": r["above_imports_mb"] / base["above_imports_mb"] if base else None,
                "paired_speedups_vs_diffusers": paired,
                "median_paired_speedup_vs_diffusers": statistics.median(paired) if paired else None,
            }
        )
    head = f"{'framework':<15}{'pairs/s':>9}{'× diffusers':>13}{'peak MB':>10}{'mem ×':>7}{'train MB':>10}{'×':>6}"
    print(
        f"\nDiffusion-DPO, {args.geometry} SD 1.5 ({args.resolution} px, {args.batch} pairs/step, LoRA r={args.rank}); "
        f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads, load {load_before:.1f} at start"
    )
    print(head + "\n" + "-" * len(head))
    for row in rows:
        cells = [f"{row['framework']:<15}{row['pairs_per_s']:>9.3f}"]
        for key, width in (("speedup_vs_diffusers", 13),):
            cells.append(f"{row[key]:>{width}.2f}" if row[key] else f"{'-':>{width}}")
        cells.append(f"{row['peak_mb']:>10.0f}")
        cells.append(f"{row['memory_vs_diffusers']:>7.2f}" if row["memory_vs_diffusers"] else f"{'-':>7}")
        cells.append(f"{row['above_imports_mb']:>10.0f}")
        above = row["above_imports_vs_diffusers"]
        cells.append(f"{above:>6.2f}" if above else f"{'-':>6}")
        print("".join(cells))
    for row in rows:
        if row.get("paired_speedups_vs_diffusers") and args.repeats > 1:
            ratios = ", ".join(f"{x:.2f}" for x in row["paired_speedups_vs_diffusers"])
            median = row["median_paired_speedup_vs_diffusers"]
            print(f"{row['framework']}: × diffusers run by run: {ratios} (median {median:.2f})")
        if "cache_seconds" in row:
            print(f"{row['framework']}: the latent cache took {row['cache_seconds']:.2f} s, outside the timed window")
    report = {"settings": {k: v for k, v in vars(args).items() if k != "child"}, "load_at_start": load_before}
    report["results"] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
