"""Soak run: thousands of DPO steps on the tiny LLaVA, with the process's memory sampled as it goes.

    .venv/bin/python benchmarks/soak.py --steps 3000 --out runs/soak.json

Reports the resident memory (RSS) after warm-up and at the end, its growth per 1,000 steps (a
least-squares slope over the second half of the run), and the peak. Uses the shapes world, LoRA DPO
with the disabled adapter as reference, validation every 500 steps and checkpoints every 500 steps,
so the loops, logging, checkpointing and data loading all run many times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import lightning as L


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryProbe(L.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.samples = every, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self.samples.append((trainer.global_step, _rss_mb(), time.perf_counter()))


def _slope(points: list[tuple[int, float, float]]) -> float:
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workdir", default="runs/soak")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--system-allocator",
        action="store_true",
        help="keep_host_memory=False: leave glibc's thresholds alone (to compare memory growth)",
    )
    args = ap.parse_args(argv)

    from datamodules import ImagePreferenceDataModule
    from datamodules.worlds.shapes import vocabulary, write_shapes_world
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.checkpoint_io import AtomicCheckpointIO
    from mmpo.losses import DPOLoss
    from mmpo.module import PreferenceModule
    from mmpo.tiny.llava import build_tiny_llava

    root = Path(args.workdir)
    world = write_shapes_world(root / "data", n_train=1000, n_val=64, seed=0)
    model = build_tiny_llava(root / "tiny-llava", vocabulary(), seed=0)
    L.seed_everything(0, verbose=False)  # the same adapter init and data order in every run
    module = PreferenceModule(
        VisionLanguageBackbone(str(model), lora=LoraSettings(r=8)),
        DPOLoss(beta=0.1),
        keep_host_memory=not args.system_allocator,
    )
    dm = ImagePreferenceDataModule(
        str(model),
        train_file=world["train"],
        val_file=world["val"],
        loader={"batch_size": args.batch_size, "num_workers": 1},
    )
    probe = MemoryProbe(every=50)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        val_check_interval=500,
        check_val_every_n_epoch=None,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe, L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=500)],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(root),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    warm = [p for p in probe.samples if p[0] >= 200]
    second_half = [p for p in probe.samples if p[0] >= args.steps // 2]
    result = {
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "steps_per_s": round(args.steps / seconds, 2),
        "rss_mb_after_warmup": round(warm[0][1], 1),
        "rss_mb_end": round(probe.samples[-1][1], 1),
        "growth_mb_per_1000_steps_second_half": round(_slope(second_half) * 1000, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_train_loss": float(trainer.callback_metrics.get("train/loss_step", float("nan"))),
        "samples": [(s, round(m, 1)) for s, m, _ in probe.samples],
    }
    print({k: v for k, v in result.items() if k != "samples"})
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
