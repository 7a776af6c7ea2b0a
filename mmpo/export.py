"""``mmpo export``: a LoRA adapter folded into its base model, saved in transformers format.

The result loads with ``AutoModelForImageTextToText.from_pretrained`` and generates with transformers
alone (no peft, no mmpo); the processor is saved next to it. The source is either an adapter directory
written by mmpo (``model.init_args.save_dir``; its ``adapter_config.json`` names the base model) or a
Lightning checkpoint of a run with the run's config (the backbone section names the base model and the
LoRA settings). The output appears whole or not at all (written to a temporary sibling, then renamed).

Example:
    mmpo export runs/quickstart/dpo-adapter runs/quickstart/dpo-merged
    mmpo export runs/llava15-7b-dpo/lightning_logs/version_0/checkpoints/last.ckpt runs/llava15-7b-dpo/merged \\
        --config runs/llava15-7b-dpo/lightning_logs/version_0/config.yaml --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.core.atomic import atomic_directory

__all__ = ["DTYPES", "ExportError", "export_merged", "main"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ExportError(Exception):
    """A source or destination ``mmpo export`` cannot use; the message says what to change."""


def _log(message: str) -> None:
    print(f"[mmpo export] {message}", flush=True)


def export_merged(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    base: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge the LoRA weights of ``source`` into its base model and save model and processor to ``out_dir``.

    Args:
        source: an adapter directory written by mmpo, or a Lightning checkpoint (``.ckpt``) with ``config``.
        out_dir: the merged model's directory; must not exist unless ``overwrite``.
        config: the run's LightningCLI config (needed with a checkpoint; its backbone section is read).
        base: the base model (hub id or directory) instead of the one the adapter or config names.
        dtype: weights' dtype for loading, merging and saving; ``auto`` keeps the base checkpoint's own.
        device: where the base model is loaded and merged (``cpu``, ``cuda``, ...).
        overwrite: replace an existing ``out_dir``.
        trust_remote_code: allow custom model code from the hub (adapter directories; a config sets its own).
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    src, out = Path(source), Path(out_dir)
    if not src.exists():
        raise ExportError(f"{src} does not exist (expected an adapter directory or a .ckpt checkpoint)")
    _check_destination(src, out, overwrite)
    if src.is_dir():
        if config is not None:
            raise ExportError("--config goes with a checkpoint file; an adapter directory names its own base model")
        model, processor_sources = _from_adapter_dir(src, base, dtype, device, trust_remote_code)
    else:
        if config is None:
            raise ExportError(f"{src} is a checkpoint: pass the run's config too (--config CONFIG.yaml)")
        model, processor_sources = _from_checkpoint(src, Path(config), base, dtype, device)
    processor = _load_processor(processor_sources, trust_remote_code)
    _log(f"saving to {out}")
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    weights_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    _log(f"done: {out} ({type(model).__name__}, {params:,} parameters, {str(weights_dtype).removeprefix('torch.')})")
    return out


def _check_destination(src: Path, out: Path, overwrite: bool) -> None:
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or out_abs in src_abs.parents:
        raise ExportError(f"the output {out} would replace the source {src}; choose another directory")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; remove it or pass --overwrite")


def _load_base(name: str, dtype: str, device: str, revision: str | None, trust_remote_code: bool, named_by: str):
    from transformers import AutoModelForImageTextToText

    _log(f"loading the base model {name} (dtype {dtype}) on {device}")
    kwargs: dict[str, Any] = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    if revision:
        kwargs["revision"] = revision
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        hint = "" if named_by == "--base" else "; pass --base PATH_OR_HUB_ID to use another copy of it"
        if _looks_like_path(name) and not Path(name).exists():
            raise ExportError(f"base model directory {name} (named by {named_by}) not found{hint}") from e
        raise ExportError(f"base model {name!r} (named by {named_by}) could not be loaded: {e}{hint}") from e
    return model.to(device)


def _looks_like_path(name: str) -> bool:
    # a hub id is "name" or "namespace/name"; anything else can only be a directory
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _from_adapter_dir(
    src: Path, base: str | None, dtype: str, device: str, trust_remote_code: bool
) -> tuple[nn.Module, list[str]]:
    config_file = src / "adapter_config.json"
    if not config_file.is_file():
        hint = " (it holds a full model: from_pretrained loads it as it is)" if (src / "config.json").is_file() else ""
        raise ExportError(f"no adapter_config.json in {src}{hint}; expected an adapter directory written by mmpo")
    adapter = json.loads(config_file.read_text())
    if adapter.get("peft_type") != "LORA":
        raise ExportError(f"{config_file}: peft_type {adapter.get('peft_type')!r} cannot be merged (LoRA only)")
    name = base or adapter.get("base_model_name_or_path")
    if not name:
        raise ExportError(f"{config_file} names no base model (base_model_name_or_path); pass --base")
    named_by = "--base" if base else f"{config_file}"
    model = _load_base(name, dtype, device, None if base else adapter.get("revision"), trust_remote_code, named_by)
    from peft import PeftModel

    _log(f"loading the adapter {src} (LoRA r={adapter.get('r')})")
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, src, is_trainable=False)
    return _merge(peft_model), [str(src), name]


def _from_checkpoint(
    ckpt: Path, config: Path, base: str | None, dtype: str, device: str
) -> tuple[nn.Module, list[str]]:
    backbone = _backbone_from_config(config, base)
    named_by = "--base" if base else f"{config}: model.init_args.backbone"
    model = _load_base(
        backbone.model_name_or_path, dtype, device, backbone.revision, backbone.trust_remote_code, named_by
    )
    if backbone.lora is not None:
        from peft import get_peft_model

        with _quiet_peft():
            model = get_peft_model(model, backbone.lora.peft_config())
    _log(f"loading the trained weights of {ckpt}")
    try:
        checkpoint = torch.load(ckpt, map_location=device, weights_only=True)
    except Exception as e:  # a truncated file, a directory-style (DeepSpeed) checkpoint, not a checkpoint
        raise ExportError(f"{ckpt} is not a readable Lightning checkpoint: {e}") from e
    saved = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    state = {k.removeprefix("policy."): v for k, v in saved.items() if k.startswith("policy.")}
    if not state:
        raise ExportError(f"{ckpt} holds no policy weights (state_dict 'policy.*'): not a checkpoint of mmpo's module")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ExportError(
            f"{ckpt} does not match the model {config} describes: {len(unexpected)} unknown weights, "
            f"e.g. {unexpected[0]}"
        )
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing:
        raise ExportError(f"{ckpt} lacks {len(lora_missing)} LoRA weights, e.g. {lora_missing[0]}")
    _log(f"restored {len(state)} trained tensors")
    return (_merge(model) if backbone.lora is not None else model), [backbone.model_name_or_path]


def _backbone_from_config(config: Path, base: str | None):
    import yaml
    from jsonargparse import ArgumentParser

    from mmpo.backbones import Backbone, VisionLanguageBackbone

    if not config.is_file():
        raise ExportError(f"config file not found: {config}")
    spec = yaml.safe_load(config.read_text()) or {}
    backbone_spec = ((spec.get("model") or {}).get("init_args") or {}).get("backbone")
    if not isinstance(backbone_spec, dict):
        raise ExportError(f"{config} has no model.init_args.backbone section")
    if base:
        init_args = {**(backbone_spec.get("init_args") or {}), "model_name_or_path": base}
        backbone_spec = {**backbone_spec, "init_args": init_args}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=Backbone)
    try:
        backbone = parser.instantiate_classes(parser.parse_object({"backbone": backbone_spec})).backbone
    except Exception as e:  # jsonargparse reports a bad class path or argument as its own error types
        raise ExportError(f"{config}: model.init_args.backbone: {e}") from e
    if not isinstance(backbone, VisionLanguageBackbone):
        raise ExportError(f"{config}: export supports VisionLanguageBackbone, not {type(backbone).__name__}")
    return backbone


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft asks transformers' deprecated ``is_gradient_checkpointing``: a warning no user can act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _merge(peft_model: nn.Module) -> nn.Module:
    _log("merging the LoRA weights into the base model")
    return peft_model.merge_and_unload()


def _load_processor(sources: list[str], trust_remote_code: bool):
    from transformers import AutoProcessor

    for source in sources:
        try:
            processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            continue
        _log(f"processor from {source}")
        return processor
    _log(f"no processor found in {' or '.join(sources)}: saving the weights alone")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mmpo export",
        description="Fold a LoRA adapter into its base model and save it, with its processor, in transformers "
        "format (AutoModelForImageTextToText.from_pretrained loads it; no peft needed).",
    )
    parser.add_argument(
        "source", metavar="SOURCE", help="an adapter directory written by mmpo, or a Lightning checkpoint (.ckpt)"
    )
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="the merged model's directory (written whole, or not at all)"
    )
    parser.add_argument("--config", help="the run's config (with a checkpoint): its backbone names base and LoRA")
    parser.add_argument("--base", help="base model (hub id or directory) instead of the one the source names")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (auto: the base's own)")
    parser.add_argument("--device", default="cpu", help="where to load and merge: cpu (default), cuda, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    args = parser.parse_args(argv)
    try:
        export_merged(
            args.source,
            args.out_dir,
            config=args.config,
            base=args.base,
            dtype=args.dtype,
            device=args.device,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
        )
    except ExportError as e:
        raise SystemExit(f"mmpo export: {e}") from None
