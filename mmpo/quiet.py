"""Library messages a user of ``mmpo`` cannot act on, silenced where mmpo triggers them.

Each filter matches one message from one library, so everything else still shows:

- Lightning's ``isinstance(treespec, LeafSpec)`` deprecation (Lightning's own pytree helper on
  torch >= 2.10, raised on every loader Lightning combines);
- transformers' ``is_gradient_checkpointing`` deprecation, raised when peft wraps a model;
- Lightning's "Tip" advertising the litlogger package, logged once per trainer.

torchdata's ``set_vital`` deprecation is silenced in ``datamodules.core.loaders``, where the
loaders are made (``datamodules`` does not import ``mmpo``).
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence_library_noise"]

_TIP = "💡 Tip: For seamless cloud logging"


class _DropTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIP)


def silence_library_noise() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTip) for f in logger.filters):
            logger.addFilter(_DropTip())
