"""The ``mmpo`` command: LightningCLI for fit/validate/test/predict, plus the quickstart."""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

from lightning.pytorch.cli import LightningCLI

from mmpo.quiet import silence_library_noise

__all__ = ["MMPOCLI", "main"]


class MMPOCLI(LightningCLI):
    """LightningCLI with mmpo's defaults: any LightningModule / LightningDataModule by ``class_path``."""

    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        silence_library_noise()
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

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (list, tuple)):
            args = migrate_argv(list(args))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        link_processor(config)

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
    "pami-demo": ("mmpo.recipes.pami_demo", "VDPO against PaMi-VDPO on the video world, probes over seeds (CPU)"),
    "diffusion-demo": (
        "mmpo.recipes.diffusion_demo",
        "Diffusion-DPO of a tiny text-to-image model on the shapes world, reward before/after (CPU)",
    ),
    "tlpo-demo": (
        "mmpo.recipes.tlpo_demo",
        "TLPO's gate against its experts, one DPO model and a static merge on talking portraits (CPU)",
    ),
    "export": ("mmpo.export", "a LoRA adapter (or checkpoint) merged into its base model, in transformers format"),
    "plot": ("mmpo.plot", "a run's reward curves (CSV / TensorBoard logs) drawn into a PNG"),
    "sample": ("mmpo.recipes.sample", "a grid of images from a diffusion checkpoint, with a run's LoRA adapter"),
    "eval-hallucination": ("mmpo.recipes.eval_hallucination", "POPE / CHAIR / MMHal-Bench on your files, JSON + table"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _EXTRA:
        importlib.import_module(_EXTRA[argv[0]][0]).main(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("mmpo: preference optimisation for vision-language models\n")
        print("  mmpo fit|validate|test|predict --config CONFIG.yaml [--dotted.key value ...]")
        width = max(map(len, _EXTRA))
        for name, (_, doc) in _EXTRA.items():
            print(f"  mmpo {name:<{width}} {doc}")
        print()
    _check_config_files(argv)
    MMPOCLI(args=argv)


def link_processor(config: Any) -> None:
    """Argument link: a datamodule whose ``processor`` is left out takes the backbone's
    ``model_name_or_path``, so a config names the checkpoint once. A processor given explicitly is
    kept (e.g. the base model's processor for a merged checkpoint)."""
    key = "data.init_args.processor"
    source = config.get("model.init_args.backbone.init_args.model_name_or_path")
    init_args = config.get("data.init_args")
    if source is None or init_args is None or "processor" not in init_args:
        return
    if config.get(key) is None:
        config[key] = source


def _settings_groups(class_path: Any) -> dict | None:
    """The settings groups of a datamodule named by ``class_path`` (None: not an mmpo datamodule)."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # the parser reports it, with its own message
    return getattr(cls, "settings_groups", None)


def _data_class_path(argv: list[str], configs: dict[str, Any]) -> str | None:
    """The datamodule's class path as the parser will see it: the last one given, config files first."""
    found = None
    for data in configs.values():
        if isinstance(data, dict) and isinstance(data.get("class_path"), str):
            found = data["class_path"]
    for i, arg in enumerate(argv):
        for flag in ("--data.class_path", "--data"):
            if arg == flag and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                found = argv[i + 1] if flag == "--data.class_path" or "." in argv[i + 1] else found
            elif arg.startswith(flag + "="):
                found = arg.split("=", 1)[1]
    return found


def migrate_argv(argv: list[str]) -> list[str]:
    """Move the datamodule's old flat settings (``batch_size``, ``num_frames``, ``curriculum_stages``,
    ...) into their groups (``loader``, ``frames``, ``curriculum``) in config files and ``--data.*``
    options, with one warning naming each file and key. Only mmpo datamodules (classes that declare
    ``settings_groups``) are migrated; a config file that needs it is passed on as migrated text."""
    import yaml

    from datamodules.core.settings import flat_names, migrate_flat_settings, warn_grouped

    positions = [i + 1 for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
    configs: dict[str, Any] = {}
    loaded: dict[int, dict] = {}
    for i in positions:
        try:
            with open(argv[i], encoding="utf-8") as f:
                content = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            continue  # reported by _check_config_files or the parser
        if isinstance(content, dict):
            loaded[i] = content
            configs[argv[i]] = content.get("data")
    groups = _settings_groups(_data_class_path(argv, configs))
    if not groups:
        return argv
    argv = list(argv)
    messages = []
    for i, content in loaded.items():
        data = content.get("data")
        if not (isinstance(data, dict) and isinstance(data.get("init_args"), dict)):
            continue
        old = data["init_args"]
        new = migrate_flat_settings(f"{argv[i]}: data.init_args", groups, old, warn=False)
        if new != old:
            messages += [f"{argv[i]}: data.init_args.{k}" for k in old if k not in new]
            argv[i] = yaml.safe_dump({**content, "data": {**data, "init_args": new}}, sort_keys=False)
    names = flat_names(groups)
    for i, arg in enumerate(argv):
        for prefix in ("--data.init_args.", "--data."):
            key, eq, value = arg[len(prefix) :].partition("=")
            if arg.startswith(prefix) and key in names:
                group, field = names[key]
                argv[i] = f"--data.init_args.{group}.{field}{eq}{value}"
                messages.append(f"{prefix}{key}")
                break
    if messages:
        warn_grouped("datamodule", {m: ".".join(names[m.rsplit(".", 1)[1]]) for m in messages}, stacklevel=3)
    return argv


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
