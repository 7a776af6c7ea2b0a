"""Iterative preference training in rounds: the reference follows the policy between rounds.

Two callbacks for ``trainer.callbacks``, with the same notion of a round: ``every_n_epochs`` epochs, or
(without it) one curriculum stage of the datamodule (``RankedPreferenceDataModule`` with
``curriculum.epochs_per_stage``). At the first epoch of each new round:

- :class:`ReferenceRefresh` (Curry-DPO, Pattnaik et al. 2024, §3: iteration i+1 takes the model trained
  in iteration i as its reference) moves the reference to the policy (:mod:`mmpo.reference.refresh`).
- :class:`NesterovExtrapolation` (APO, He et al. 2024, Algorithm 1) first extrapolates the trainable
  weights, θ ← θ̂_t + α(θ̂_t − θ̂_{t−1}), then moves the reference to the policy that starts the round.

Their state (the round, the reference's weights since the last refresh, APO's previous weights) is in
every checkpoint, so a run stopped in the middle of a round resumes with the reference (and momentum)
an uninterrupted run has. The reference's weights travel in the callback state because checkpoints
keep trainable weights only (``checkpoint_trainable_only``).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mmpo.reference.refresh import (
    check_refreshable,
    is_snapshot_weight,
    policy_weights,
    reference_weights,
    refresh_reference,
)

__all__ = ["NesterovExtrapolation", "ReferenceRefresh", "extrapolate"]

_SHARDED = ("FSDP", "DeepSpeed", "ModelParallel")  # Lightning strategies whose ranks hold weight shards


def extrapolate(current: Tensor, previous: Tensor, alpha: float) -> Tensor:
    """APO's Nesterov step on one weight: θ̂_t + α(θ̂_t − θ̂_{t−1}) (He et al. 2024, Algorithm 1, line 5).

    Args:
        current: θ̂_t, the weight at the end of the round just finished.
        previous: θ̂_{t−1}, the same weight at the end of the round before (the initial weight after round 1).
        alpha: the extrapolation coefficient α ≥ 0 (0: plain iterative DPO).
    """
    return current + alpha * (current - previous)


class _Rounds(L.Callback):
    """Rounds of epochs and a hook at each round boundary; the round and the reference are checkpointed."""

    def __init__(self, every_n_epochs: int | None, reset_optimizer: bool) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 (or None for curriculum stages), got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.reset_optimizer = reset_optimizer
        self.round: int | None = None  # the round of the last training epoch started
        self.refreshes = 0  # round boundaries passed (the reference moved this many times)
        self._module: Any = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, applied once the policy exists

    def round_of(self, trainer: L.Trainer) -> int:
        """The round of the trainer's current epoch."""
        if self.every_n_epochs is not None:
            return trainer.current_epoch // self.every_n_epochs
        scheduled = getattr(trainer.datamodule, "scheduled_stage", None)
        stage = scheduled() if callable(scheduled) else None
        if stage is None:
            raise ValueError(
                f"{type(self).__name__} without every_n_epochs follows the datamodule's curriculum stages, and "
                f"{type(trainer.datamodule).__name__} schedules none (set data curriculum.epochs_per_stage, or "
                "every_n_epochs)"
            )
        return stage

    def boundary(self, trainer: L.Trainer, module: Any) -> None:
        """What happens when a new round starts (before its first step)."""
        raise NotImplementedError

    def fresh_start(self, module: Any) -> None:
        """Called at the start of a run that does not resume this callback's state."""
        return None

    # -- hooks --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._module = pl_module
        strategy = type(trainer.strategy).__name__
        if any(s in strategy for s in _SHARDED):
            # each rank holds a shard of the weights: a snapshot of one rank's shard is not the policy
            raise ValueError(f"{type(self).__name__} does not support the sharded {strategy} (use DDP or one device)")
        check_refreshable(pl_module)
        self.round_of(trainer)  # a schedule that cannot work fails before the first step
        if self._restored is None:
            self.fresh_start(pl_module)
        self._apply_restored(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._module = pl_module
        self._apply_restored(pl_module)  # `validate`/`test` from a checkpoint: the reference it trained with

    on_test_start = on_validation_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        current = self.round_of(trainer)
        if self.round is not None and current != self.round:
            self.refreshes += 1
            self.boundary(trainer, pl_module)
            if self.reset_optimizer:
                for optimizer in trainer.optimizers:
                    optimizer.state.clear()  # as a new optimizer for the round; the LR schedule runs on
            rank_zero_info(
                f"[mmpo] {type(self).__name__}: round {current} starts at epoch {trainer.current_epoch}; "
                f"reference moved to the policy (refresh {self.refreshes})"
            )
        self.round = current

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # the snapshot adapter's weights are in this callback's state; in the module's weights a resumed run
        # (which adds the adapter only once the state is applied) would meet unexpected keys
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not is_snapshot_weight(k)}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        reference = reference_weights(self._module) if self.refreshes and self._module is not None else {}
        return {"round": self.round, "refreshes": self.refreshes, "reference": reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round, self.refreshes = state_dict["round"], state_dict["refreshes"]
        self._restored = state_dict

    def _apply_restored(self, module: Any) -> None:
        if self._restored is None:
            return
        state, self._restored = self._restored, None
        if self.refreshes:
            if not state["reference"]:
                name = type(self).__name__
                raise ValueError(f"{name} checkpoint state has {self.refreshes} refresh(es) but no reference weights")
            refresh_reference(module, state["reference"])
        self.restore_extra(module, state)

    def restore_extra(self, module: Any, state: dict[str, Any]) -> None:
        """Restore what a subclass added to the state."""
        return None


class ReferenceRefresh(_Rounds):
    """Curry-DPO's reference update: at each round boundary the reference becomes the policy.

    Curry-DPO (Pattnaik et al. 2024) trains on curriculum stages of pairs (easiest, largest rating gap,
    first) and makes each iteration's trained model the next iteration's reference [unconfirmed: from a
    summary of the paper]. Works with the ``adapter``, ``copy`` and ``checkpoint`` references; ``cached``
    is refused (its log-probs would be stale).

    Args:
        every_n_epochs: a round is this many epochs; None (default): a round is one curriculum stage of
            the datamodule (``curriculum.epochs_per_stage``), so the reference moves when the stage does.
        reset_optimizer: clear the optimizer's state (moments) at each boundary, as if each round were a
            new training run [unconfirmed choice; default False: one optimizer across rounds].
    """

    def __init__(self, every_n_epochs: int | None = None, reset_optimizer: bool = False) -> None:
        super().__init__(every_n_epochs, reset_optimizer)

    def boundary(self, trainer: L.Trainer, module: Any) -> None:
        refresh_reference(module)


class NesterovExtrapolation(_Rounds):
    """APO: Nesterov extrapolation of the trainable weights between rounds of iterative DPO.

    At the start of round t+1: θ ← θ̂_t + α(θ̂_t − θ̂_{t−1}) (:func:`extrapolate`), where θ̂_t are the
    trainable weights at the end of round t and θ̂_0 those at the start of training; then the reference
    moves to the policy. Which policy: with ``reference: extrapolated`` (default) the extrapolated one
    that starts the round, as APO's round t+1 is a DPO problem centred on its own starting policy π_t
    (the reference of iterative DPO is the previous round's output, and in APO that output is the
    extrapolated policy); ``trained`` keeps θ̂_t, the weights before the jump, as reference.

    The step is taken on the trainable weights (LoRA: A and B each, so the merged update BA is not
    extrapolated linearly) [unconfirmed: APO states the step on policies; the parameter-space form and
    α = 0.3 are from a summary]. θ̂_{t−1} is kept (on the CPU) in the callback's state, so a resumed run
    extrapolates as an uninterrupted one.

    Args:
        alpha: the extrapolation coefficient α ≥ 0; 0 is plain iterative DPO with reference refreshes.
        every_n_epochs: a round is this many epochs; None: one curriculum stage of the datamodule.
        reference: which policy becomes the reference at a boundary: ``extrapolated`` or ``trained``.
        reset_optimizer: clear the optimizer's state at each boundary [unconfirmed choice; default False].
    """

    def __init__(
        self,
        alpha: float = 0.3,
        every_n_epochs: int | None = 1,
        reference: Literal["extrapolated", "trained"] = "extrapolated",
        reset_optimizer: bool = False,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if reference not in ("extrapolated", "trained"):
            raise ValueError(f"reference must be 'extrapolated' or 'trained', got {reference!r}")
        super().__init__(every_n_epochs, reset_optimizer)
        self.alpha = alpha
        self.reference = reference
        self.previous: dict[str, Tensor] = {}  # θ̂_{t−1}: the trainable weights at the last boundary (CPU)

    def fresh_start(self, module: Any) -> None:
        self.previous = {n: p.detach().cpu().clone() for n, p in policy_weights(module).items()}

    def boundary(self, trainer: L.Trainer, module: Any) -> None:
        weights = policy_weights(module)
        trained = {n: p.detach().cpu().clone() for n, p in weights.items()}  # θ̂_t
        if set(self.previous) != set(weights):
            raise ValueError("APO's previous weights do not match the policy's trainable weights")
        with torch.no_grad():
            for name, p in weights.items():
                p.copy_(extrapolate(p, self.previous[name].to(p.device, p.dtype), self.alpha))
        self.previous = trained
        refresh_reference(module, None if self.reference == "extrapolated" else trained)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous": self.previous}

    def restore_extra(self, module: Any, state: dict[str, Any]) -> None:
        self.previous = state["previous"]
