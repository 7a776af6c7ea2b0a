"""``mmpo quickstart``: SFT then DPO of a tiny LLaVA on the shapes world, on the CPU, no downloads.

Steps: generate the shapes world (PNG + JSONL) and a random-init tiny LLaVA checkpoint, run the SFT
warm-up config, measure the DPO validation figures, run the DPO config, measure them again, and
print a before/after table. Everything lands under ``--workdir`` (default ``runs/quickstart``),
which is where ``configs/quickstart_sft.yaml`` and ``configs/quickstart.yaml`` point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["main", "prepare", "run_config"]

_ROWS = [
    ("val/loss", "DPO loss"),
    ("val/rewards/accuracies", "reward accuracy"),
    ("val/rewards/margins", "reward margin"),
    ("val/rewards/chosen", "reward chosen"),
    ("val/rewards/rejected", "reward rejected"),
    ("val/logps/accuracies", "log-prob accuracy"),
    ("val/logps/chosen", "log-prob chosen"),
    ("val/logps/rejected", "log-prob rejected"),
]


def prepare(workdir: Path, n_train: int, n_val: int, seed: int) -> None:
    """Write the shapes world and the tiny LLaVA under ``workdir`` (reused when already there)."""
    from datamodules.worlds.shapes import vocabulary, write_shapes_world
    from mmpo.tiny.llava import build_tiny_llava

    summary = write_shapes_world(workdir / "data", n_train=n_train, n_val=n_val, seed=seed, overwrite=True)
    state = "generated" if summary.get("generated", True) else "reused"
    print(f"[mmpo] shapes world {state}: {n_train} train / {n_val} val pairs in {workdir / 'data'}")
    path = build_tiny_llava(workdir / "tiny-llava", words=vocabulary(), seed=seed)
    print(f"[mmpo] tiny LLaVA checkpoint at {path}")


def run_config(config: Path, workdir: Path, extra: list[str], placeholder: str = "runs/quickstart"):
    """The CLI on a copy of ``config`` whose ``placeholder`` paths point at ``workdir`` (not run)."""
    from mmpo.cli import MMPOCLI

    text = config.read_text().replace(placeholder, str(workdir))
    resolved = workdir / f"{config.stem}.resolved.yaml"
    resolved.write_text(text)
    return MMPOCLI(args=["--config", str(resolved), *extra], run=False)


def _figures(results: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in results[0].items()} if results else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmpo quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="where data, models and results go")
    parser.add_argument(
        "--configs", default="configs", help="directory holding quickstart_sft.yaml and quickstart.yaml"
    )
    parser.add_argument("--n-train", type=int, default=1500, help="training pairs in the shapes world")
    parser.add_argument("--n-val", type=int, default=256, help="validation pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-epochs", type=int, default=None, help="override the SFT config's max_epochs")
    parser.add_argument("--dpo-epochs", type=int, default=None, help="override the DPO config's max_epochs")
    parser.add_argument("--prepare-only", action="store_true", help="only write the data and the tiny model")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    workdir = Path(args.workdir)
    configs = Path(args.configs)
    for name in ("quickstart_sft.yaml", "quickstart.yaml"):
        if not (configs / name).is_file():
            parser.error(f"{configs / name} not found: run from the repository root or pass --configs")
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir, args.n_train, args.n_val, args.seed)
    if args.prepare_only:
        return

    # The stages validate once, where the table needs it (after SFT; before and after DPO), not after
    # every epoch as the configs do when run alone: the figures are the same, the run is shorter.
    once = ["--trainer.check_val_every_n_epoch=1000000", "--trainer.num_sanity_val_steps=0"]
    sft_extra = once + ([f"--trainer.max_epochs={args.sft_epochs}"] if args.sft_epochs else [])
    print("[mmpo] stage 1/2: SFT warm-up (SFTLoss on the chosen answers)")
    sft = run_config(configs / "quickstart_sft.yaml", workdir, sft_extra)
    sft.trainer.fit(sft.model, datamodule=sft.datamodule)
    sft_val = _figures(sft.trainer.validate(sft.model, datamodule=sft.datamodule, verbose=False))

    dpo_extra = once + ([f"--trainer.max_epochs={args.dpo_epochs}"] if args.dpo_epochs else [])
    print("[mmpo] stage 2/2: DPO with LoRA, reference = adapter disabled")
    dpo = run_config(configs / "quickstart.yaml", workdir, dpo_extra)
    before = _figures(dpo.trainer.validate(dpo.model, datamodule=dpo.datamodule, verbose=False))
    dpo.trainer.fit(dpo.model, datamodule=dpo.datamodule)
    after = _figures(dpo.trainer.validate(dpo.model, datamodule=dpo.datamodule, verbose=False))

    elapsed = time.perf_counter() - start
    lines = [
        "",
        f"mmpo quickstart: DPO on the shapes world ({args.n_val} held-out pairs), tiny LLaVA, CPU",
        f"{'metric':<20}{'before DPO':>12}{'after DPO':>12}",
        "-" * 44,
    ]
    for key, label in _ROWS:
        if key in before and key in after:
            lines.append(f"{label:<20}{before[key]:>12.4f}{after[key]:>12.4f}")
    if "val/logps/chosen" in sft_val:
        lines.append(f"(SFT warm-up ended with validation log-prob chosen {sft_val['val/logps/chosen']:.3f})")
    lines.append(f"total time {elapsed:.0f} s; adapter saved to {workdir / 'dpo-adapter'}")
    print("\n".join(lines))
    (workdir / "results.json").write_text(
        json.dumps({"before": before, "after": after, "sft": sft_val, "seconds": elapsed}, indent=1)
    )
