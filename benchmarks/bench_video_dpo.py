"""Video DPO at 16 frames: VDPO and PaMi-VDPO steps against the naive layout, clips/s and peak memory.

    .venv/bin/python benchmarks/bench_video_dpo.py --frames 16 --steps 4 --warmup 1 --out results.json

One tiny LLaVA-NeXT-Video at realistic proportions (by default 16 frames of 96 pixels in 4-pixel
patches: 24×24 patches, 2×2-pooled to 144 tokens a frame, 2,304 video tokens a clip; a 32,000-word
vocabulary), LoRA r=16 on the language model, the disabled adapter as the reference, real mp4 clips
of the video world. Each framework trains in a fresh child process (its peak RSS its own; on a GPU
the peak allocated CUDA memory):

- ``vdpo``: mmpo, one random candidate clip per record (a pair), ``DPOLoss``: rows run one by one as
  their clips differ, only response positions go through the LM head, the policy's media features are
  reused by the reference pass.
- ``vdpo-naive``: the same pairs in the layout of trainers that run chosen and rejected as separate
  full sequences (ms-swift's ``rejected_videos``): full (N, T, V) logits for policy and reference, and
  each encodes every clip itself.
- ``pami``: mmpo with K candidates per record (``--candidates``), ``PaMiSelector`` keeping
  ``--keep`` of them, ``MultiInstanceVDPOLoss``: the reference runs once over 1 + K rows (scoring and
  reference statistics), the policy over the 1 + M kept rows.
- ``pami-naive``: policy and reference each run the original and all K candidate clips as full
  sequences (the loss over every candidate), as a trainer without the selection would.

"clips/s" counts original clips (records) per second of the timed window (data loading, both models,
backward and optimizer step); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runners import StepClock, peak_memory, rss_now_mb  # noqa: E402

FRAMEWORKS = ("vdpo", "vdpo-naive", "pami", "pami-naive")
PAMI_AUGMENTATIONS = ["reverse", "shuffle", "static", "color_jitter", "crop", "frame_drop", "mask", "blur"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16, help="frames per clip (on disk and sampled)")
    ap.add_argument("--size", type=int, default=96, help="frame side in pixels")
    ap.add_argument("--patch", type=int, default=4, help="vision patch size (size/patch patches a side, 2x2-pooled)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size (filler words pad the world's)")
    ap.add_argument("--width", type=int, default=256, help="language model hidden size")
    ap.add_argument("--layers", type=int, default=4, help="language model layers")
    ap.add_argument("--candidates", type=int, default=4, help="K, PaMi's candidate clips per record")
    ap.add_argument("--keep", type=int, default=1, help="M, candidates PaMi keeps")
    ap.add_argument("--batch", type=int, default=1, help="records per step")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per child (default: cores)")
    ap.add_argument("--workdir", default="runs/bench-video", help="where the model and clips are written")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _build(args: argparse.Namespace) -> tuple[Path, Path]:
    from datamodules.worlds.video import vocabulary, write_video_world
    from mmpo.tiny.llava import build_tiny_llava

    root = Path(args.workdir)
    n = (args.steps + args.warmup) * args.batch
    world = write_video_world(root / "world", n_train=n, n_val=1, num_frames=args.frames, size=args.size, seed=0)
    words = vocabulary()
    words = words + [f"w{i}" for i in range(max(0, args.vocab - len(words)))]
    model = build_tiny_llava(
        root / "model", words, image_size=args.size, patch_size=args.patch, text_width=args.width,
        text_layers=args.layers, video=True,
    )  # fmt: skip
    return model, Path(world["train"])


def _naive_backbone_class():
    from mmpo.backbones import VisionLanguageBackbone
    from mmpo.logprobs import response_logprobs

    class NaiveVideoBackbone(VisionLanguageBackbone):
        """Every row a full sequence through the whole model with full (N, T, V) logits; no shared media."""

        def token_logps(self, model, batch):
            base = self.unwrap(model)
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.row_media()}
            logits = base(**inputs, use_cache=False).logits  # (N, T, V)
            return response_logprobs(logits, batch.input_ids, batch.response_mask, self.logprob_chunk_size)

        def media_shareable(self, model):
            return False

    return NaiveVideoBackbone


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning as L

    from datamodules import VideoVDPODataModule
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.losses import DPOLoss, MultiInstanceVDPOLoss
    from mmpo.module import PreferenceModule
    from mmpo.pami import PaMiSelector

    imports_rss_mb = rss_now_mb()
    framework = args.child
    naive, pami = framework.endswith("-naive"), framework.startswith("pami")
    model_dir, train = _build(args)
    cuda = torch.cuda.is_available()
    if pami:
        negatives = {"augmentations": PAMI_AUGMENTATIONS[: args.candidates], "num_candidates": args.candidates}
        negatives["sampling"] = "fixed"
    else:
        negatives = {"num_candidates": 1}
    dm = VideoVDPODataModule(
        str(model_dir), train_file=str(train), loader={"batch_size": args.batch, "shuffle": False},
        frames={"num_frames": args.frames}, negatives=negatives, max_length=None,
    )  # fmt: skip
    backbone_class = _naive_backbone_class() if naive else VisionLanguageBackbone
    dtype = "bfloat16" if cuda else "float32"
    backbone = backbone_class(str(model_dir), lora=LoraSettings(r=16, alpha=32, dropout=0.0), dtype=dtype)
    torch.manual_seed(0)
    module = PreferenceModule(
        backbone,
        MultiInstanceVDPOLoss(beta=0.1) if pami else DPOLoss(beta=0.1),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.0),
        candidates=PaMiSelector(num_selected=args.keep) if pami and not naive else None,
    )
    clock, seen = StepClock(cuda), {}

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not seen:
                seen.update(rows=int(batch.input_ids.shape[0]), width=int(batch.input_ids.shape[1]))
                seen["prompt_tokens"] = int(batch.prompt_lengths[0])
            clock.step()

    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=args.steps + args.warmup, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        precision="bf16-mixed" if cuda else "32-true",
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    out = clock.summary(args.warmup, args.batch)
    out["clips_per_s"] = out.pop("pairs_per_s")
    out["clips_per_s_median_step"] = out.pop("pairs_per_s_median_step")
    return {"framework": framework, **seen, **out, **peak_memory(cuda, imports_rss_mb)}


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    ratios = {}
    for method in ("vdpo", "pami"):
        mine, naive = results.get(method), results.get(f"{method}-naive")
        if mine and naive:
            ratios[method] = {
                "throughput": mine["clips_per_s"] / naive["clips_per_s"],
                "throughput_median_step": mine["clips_per_s_median_step"] / naive["clips_per_s_median_step"],
                "peak_memory": mine["peak_mb"] / naive["peak_mb"],
                "memory_above_imports": mine.get("above_imports_mb", 0) / max(naive.get("above_imports_mb", 1), 1e-9),
            }
    return ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return {}
    _build(args)  # once, before the children (each then reuses the build)
    results = {}
    for framework in args.frameworks.split(","):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", framework]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            raise RuntimeError(f"{framework} failed:\n{done.stderr[-3000:]}")
        results[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    ratios = _ratios(results)
    header = ("framework", "rows", "width", "clips/s", "median", "peak MB", "above imports")
    print(f"{header[0]:<12} {header[1]:>5} {header[2]:>6} {header[3]:>9} {header[4]:>9} {header[5]:>9} {header[6]:>14}")
    for name, r in results.items():
        print(
            f"{name:<12} {r['rows']:>5} {r['width']:>6} {r['clips_per_s']:>9.3f} {r['clips_per_s_median_step']:>9.3f} "
            f"{r['peak_mb']:>9.0f} {r['above_imports_mb']:>14.0f}"
        )
    for method, r in ratios.items():
        print(
            f"{method}: {r['throughput']:.2f}x the naive clips/s ({r['throughput_median_step']:.2f}x by median step), "
            f"{r['peak_memory']:.2f}x its peak memory ({r['memory_above_imports']:.2f}x above imports)"
        )
    report = {"settings": vars(args), "machine": platform.machine(), "results": results, "ratios": ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
