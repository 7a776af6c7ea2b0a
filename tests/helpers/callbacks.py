"""Callbacks that tests name by class_path in `mmpo fit` subprocesses, or add to in-process fits."""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class RecordLosses(L.Callback):
    """Append ``{"step": global step, "loss": ..., "ids": [...], "stage": ...}`` per training batch to a JSONL file.

    ``stage`` is the curriculum stage of the training dataset (``current_stage``), None without one.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stage = getattr(trainer.train_dataloader.dataset, "current_stage", None)
        row = {"step": trainer.global_step, "loss": float(outputs["loss"]), "ids": batch.ids, "stage": stage}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class LossesInMemory(L.Callback):
    """Keep each training batch's loss in ``self.losses``, and the logged figures after it in ``self.metrics``
    (for in-process fits)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class KillAtStep(L.Callback):
    """SIGKILL this process (no clean-up, as a preemption or OOM killer does) after a given global step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
