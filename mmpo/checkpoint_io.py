"""Checkpoints written atomically: a crash or a kill while saving never leaves a corrupt file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.core.atomic import atomic_file

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, flush it to disk, then rename it.

    (`datamodules.core.atomic.atomic_file`, which also fsyncs the folder so the rename is on disk.)
    The rename is atomic on local file systems, so ``last.ckpt`` (or any checkpoint) is always either
    the previous complete file or the new complete file. ``mmpo``'s CLI uses it by default; set it in
    ``trainer.plugins`` when building a ``Trainer`` by hand.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        target = Path(path)
        if "://" in str(path):  # remote file systems: fall back to Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(target) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
