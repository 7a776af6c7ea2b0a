"""Record a short training run's every number, exactly, to compare two versions of mmpo.

Trains a tiny LLaVA on the shapes world for a few steps in several configurations (shared prompt
pass packed and repeated, naive, cached reference, full fine-tuning with a frozen copy, and a
pair loss of each family) and writes, per configuration and step, the loss, every logged metric
and a digest of every gradient, as exact hexadecimal floats, plus the trained weights' digest.
Two versions of the code are equal when their JSON files are equal::

    python benchmarks/trace_run.py --workdir runs/trace --out new.json
    PYTHONPATH=<other checkout> python benchmarks/trace_run.py --workdir runs/trace --out old.json
    python benchmarks/trace_run.py --compare old.json new.json

Only public APIs that both versions share are used. The model and data are written once to
``--workdir`` and reused, so both runs read the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

CONFIGS = {
    # name: (loss class, loss kwargs, lora, backbone kwargs, reference)
    "dpo-packed": ("DPOLoss", {"beta": 0.1}, True, {"pack_responses": True}, "auto"),
    "dpo-repeated": ("DPOLoss", {"beta": 0.1}, True, {"pack_responses": False}, "auto"),
    "dpo-naive": ("DPOLoss", {"beta": 0.1}, True, {"shared_prefix": False}, "auto"),
    "dpo-cached": ("DPOLoss", {"beta": 0.1}, True, {}, "cached"),
    "dpo-full-copy": ("DPOLoss", {"beta": 0.1}, False, {}, "auto"),
    "ipo": ("IPOLoss", {"beta": 0.1}, True, {}, "auto"),
    "ld-dpo": ("LDDPOLoss", {"beta": 0.1, "alpha": 0.5}, True, {}, "auto"),
    "simpo": ("SimPOLoss", {}, True, {}, "auto"),
    "rpo": (
        "CombinedLoss",
        {"components": [("DPOLoss", {}), ("SFTLoss", {})], "weights": [1.0, 0.5]},
        True,
        {},
        "auto",
    ),
}


def _hex(x: Any) -> str:
    return float(x).hex()


def _loader_settings(**settings: Any) -> dict[str, Any]:
    """Loader settings in the form the checked-out version takes (grouped since the settings groups)."""
    try:
        from datamodules import LoaderSettings
    except ImportError:  # a version from before the groups: flat arguments
        return settings
    return {"loader": LoaderSettings(**settings)}


def _digest(tensors: list[Any]) -> list[str]:
    """Sum and sum of squares of each tensor, in float64, as exact hex (order-independent of names)."""
    return [_hex(t.double().sum()) + "/" + _hex(t.double().pow(2).sum()) for t in tensors]


def prepare(workdir: Path) -> tuple[Path, Path]:
    from datamodules.worlds.shapes import vocabulary, write_shapes_world
    from mmpo.tiny.llava import build_tiny_llava

    world, model = workdir / "world", workdir / "tiny-llava"
    if not (world / "train.jsonl").exists():
        write_shapes_world(world, n_train=48, n_val=16, seed=0)
    if not (model / "config.json").exists():
        build_tiny_llava(model, words=vocabulary(), seed=0)
    return world, model


def run(name: str, world: Path, model: Path, workdir: Path, steps: int) -> dict[str, Any]:
    import lightning as L

    from datamodules import ImagePreferenceDataModule
    from mmpo import losses
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.module import PreferenceModule

    loss_name, loss_kw, lora, bb_kw, reference = CONFIGS[name]
    if loss_name == "CombinedLoss":
        loss = losses.CombinedLoss([getattr(losses, c)(**kw) for c, kw in loss_kw["components"]], loss_kw["weights"])
    else:
        loss = getattr(losses, loss_name)(**loss_kw)
    L.seed_everything(0, verbose=False)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None
    backbone = VisionLanguageBackbone(str(model), lora=settings, **bb_kw)
    module = PreferenceModule(backbone, loss, reference=reference, reference_cache_dir=str(workdir / f"cache-{name}"))
    dm = ImagePreferenceDataModule(
        str(model),
        train_file=str(world / "train.jsonl"),
        val_file=str(world / "val.jsonl"),
        **_loader_settings(batch_size=4, seed=0),
    )
    trace: dict[str, Any] = {"steps": []}

    class Recorder(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for _, p in sorted(pl_module.named_parameters()) if p.grad is not None]
            trace["steps"].append({"grads": _digest(grads)})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trace["steps"][-1]
            step["loss"] = _hex(outputs["loss"] if isinstance(outputs, dict) else outputs)
            metrics = trainer.callback_metrics
            step["metrics"] = {k: _hex(v) for k, v in sorted(metrics.items()) if k.startswith("train/")}

        def on_validation_epoch_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            trace.setdefault("val", []).append({k: _hex(v) for k, v in sorted(metrics.items()) if k.startswith("val/")})

    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Recorder()], val_check_interval=steps,
        limit_val_batches=2, num_sanity_val_steps=0, default_root_dir=str(workdir / f"root-{name}"),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    trained = [p.detach() for _, p in sorted(module.named_parameters()) if p.requires_grad]
    trace["weights"] = _digest(trained)
    return trace


def compare(a: Path, b: Path) -> int:
    old, new = json.loads(a.read_text()), json.loads(b.read_text())
    bad = 0
    for name in sorted(set(old) | set(new)):
        same = old.get(name) == new.get(name)
        bad += not same
        steps = len(new.get(name, {}).get("steps", []))
        print(f"{name:16s} {'identical' if same else 'DIFFERENT'} ({steps} steps)")
    print("all identical" if not bad else f"{bad} configuration(s) differ")
    return int(bad > 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/trace")
    parser.add_argument("--out", default="trace.json")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    workdir = Path(args.workdir)
    world, model = prepare(workdir)
    traces = {name: run(name, world, model, workdir, args.steps) for name in args.configs}
    Path(args.out).write_text(json.dumps(traces, indent=1))
    print(f"wrote {args.out}: {', '.join(args.configs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
