"""A CPU Lightning Trainer without logger, checkpoints, progress bar or model summary."""

from __future__ import annotations

from typing import Any

import lightning as L


def quiet_trainer(**overrides: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**(settings | overrides))
