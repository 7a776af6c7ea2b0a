"""The ``mmpo`` command: LightningCLI for fit/validate/test/predict, plus the quickstart."""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI

__all__ = ["MMPOCLI", "main"]


class MMPOCLI(LightningCLI):
    """LightningCLI with mmpo's defaults: any LightningModule / LightningDataModule by ``class_path``."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # atomic checkpoint writes unless the config sets trainer.plugins itself
        kwargs.setdefault("trainer_defaults", {"plugins": [{"class_path": "mmpo.checkpoint_io.AtomicCheckpointIO"}]})
        with warnings.catch_warnings():
            # mmpo passes its own argument list (``mmpo quickstart`` and tests call this in-process)
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
            super().__init__(args=args, run=run, **kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # Checkpoints are read with torch.load(weights_only=True) unless the user sets weights_only:
        # mmpo's own checkpoints hold only tensors and plain containers, nothing to unpickle.
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True
        return kwargs


_EXTRA = {
    "quickstart": ("mmpo.recipes.quickstart", "SFT then DPO of a tiny LLaVA on the shapes world (CPU, no downloads)"),
    "build-negatives": ("augment.mia.build", "MIA-DPO preference data from a single-image dataset (resumable)"),
    "mia-demo": ("mmpo.recipes.mia_demo", "MIA-DPO end to end on the shapes world, hallucination before/after (CPU)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _EXTRA:
        import importlib

        importlib.import_module(_EXTRA[argv[0]][0]).main(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("mmpo: preference optimisation for vision-language models\n")
        print("  mmpo fit|validate|test|predict --config CONFIG.yaml [--dotted.key value ...]")
        for name, (_, doc) in _EXTRA.items():
            print(f"  mmpo {name:<16} {doc}")
        print()
    _check_config_files(argv)
    MMPOCLI(args=argv)


def _check_config_files(argv: list[str]) -> None:
    """Fail early, naming the file, on a config that is missing or not valid YAML."""
    import yaml

    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except FileNotFoundError:
            sys.exit(f"mmpo: config file not found: {path}")
        except yaml.YAMLError as e:
            sys.exit(f"mmpo: {path} is not valid YAML: {e}")


if __name__ == "__main__":
    main()
