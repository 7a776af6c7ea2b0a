"""Selecting a loss by ``class_path``, as a YAML config does."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser

from mmpo.losses import PreferenceLoss


def loss_parser() -> ArgumentParser:
    """A parser with one ``--loss`` argument of any :class:`PreferenceLoss`; errors raise, not exit."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=PreferenceLoss)
    return parser


def instantiate(parser: ArgumentParser, cfg: Any) -> Any:
    # jsonargparse ≥ 4.49 renamed instantiate_classes to instantiate.
    return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(cfg)
