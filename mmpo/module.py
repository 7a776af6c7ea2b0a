"""The Lightning module that trains a vision-language policy on preference pairs."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from datamodules.batch import PreferenceBatch
from mmpo.allocator import DEFAULT_KEEP_BYTES, keep_freed_memory
from mmpo.backbones.adapters import adapters_disabled
from mmpo.backbones.media_reuse import media_features_shareable, reuse_media_features
from mmpo.backbones.vlm import VisionLanguageBackbone
from mmpo.io import atomic_directory
from mmpo.logprobs import sequence_stats
from mmpo.losses import LossOutput, PairLogps, PreferenceLoss
from mmpo.reference_cache import ReferenceCache, compute_reference_cache, data_fingerprint, model_fingerprint

__all__ = ["PreferenceModule"]


def _split_pair(token_logps: Tensor, mask: Tensor) -> PairLogps:
    """(2B, T) token log-probs, chosen rows first, into per-response statistics."""
    summed, _, counts = sequence_stats(token_logps, mask)
    b = token_logps.shape[0] // 2
    return PairLogps(
        chosen=summed[:b],
        rejected=summed[b:],
        chosen_tokens=counts[:b],
        rejected_tokens=counts[b:],
        chosen_token_logps=token_logps[:b],
        rejected_token_logps=token_logps[b:],
        chosen_mask=mask[:b],
        rejected_mask=mask[b:],
    )


_HOST_MEMORY_NOTED = False  # the allocator note is printed once per process


def _grads_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient is free of NaN and inf, with one device sync per device.

    The largest absolute value of each gradient (``_foreach_norm`` with ``ord=inf``, NaN-propagating,
    and never overflowing as a 2-norm of large finite values would) is checked on the device and read
    back once, instead of one ``bool()`` sync per parameter (hundreds per step for LoRA on a 0.5B
    model).
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for group in by_device.values():
        peaks = torch._foreach_norm(group, float("inf"))
        if not bool(torch.isfinite(torch.stack([x.float() for x in peaks])).all()):
            return False
    return True


class PreferenceModule(L.LightningModule):
    """Preference optimisation of a vision-language model with any loss of ``mmpo.losses``.

    Args:
        backbone: how to load the model and compute response log-probs.
        loss: the objective (``mmpo.losses.DPOLoss``, ``SimPOLoss``, ``CombinedLoss``, ...).
        optimizer: optimizer factory, e.g. ``torch.optim.AdamW`` with ``lr`` in YAML.
        scheduler: optional LR scheduler factory, stepped every optimizer step.
        reference: where reference log-probs come from. ``auto``: the disabled adapter with LoRA,
            a frozen copy without, nothing for reference-free losses. ``adapter``, ``copy``, ``none``
            force one. ``cached``: computed once for every record before the first step, stored on
            disk, and read back instead of running a reference model (see ``reference_cache_dir``).
        reference_cache_dir: where cached reference log-probs live (default:
            ``<trainer.default_root_dir>/reference_cache``). Files are named by model and data
            fingerprints, so a change of either computes a new cache.
        save_dir: where the trained adapter (LoRA) or full model is written, in the standard
            PEFT/transformers format, when training ends. None to skip.
        checkpoint_trainable_only: keep only trainable weights in Lightning checkpoints (the frozen
            base is reloaded from ``model_name_or_path`` on resume).
        on_nonfinite: what a NaN/inf training loss or gradient does: ``stop`` raises with the batch's
            record ids; ``skip`` drops that optimizer step (no update), warns with the ids and counts
            it in ``train/nonfinite_steps``. Validation losses are always checked and stop the run.
        keep_host_memory: on a CPU run, let glibc keep freed blocks of up to 64 MiB mapped for the
            next step instead of returning them to the kernel and faulting them back in each step
            (``mmpo.allocator.keep_freed_memory``; process-wide, until exit). No effect on GPU runs
            or outside glibc.
    """

    def __init__(
        self,
        backbone: VisionLanguageBackbone,
        loss: PreferenceLoss,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        reference: Literal["auto", "adapter", "copy", "none", "cached"] = "auto",
        reference_cache_dir: str | None = None,
        save_dir: str | None = None,
        checkpoint_trainable_only: bool = True,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        keep_host_memory: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.save_dir = save_dir
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.on_nonfinite = on_nonfinite
        self.keep_host_memory = keep_host_memory
        self._last_ids: list[str] = []
        self.reference_mode = self._resolve_reference(reference)
        self.reference_cache_dir = reference_cache_dir
        self._caches: dict[str, ReferenceCache] = {}
        self.policy: nn.Module | None = None
        self._share_media = False
        self._skipped: dict[str, int] = {}  # bad records dropped this epoch, per stage
        self._reference: tuple[nn.Module, ...] = ()  # a tuple keeps the frozen copy out of state_dict
        self.strict_loading = not checkpoint_trainable_only

    def _resolve_reference(self, reference: str) -> str:
        if reference == "auto":
            if not self.loss.requires_reference:
                return "none"
            return "adapter" if self.backbone.uses_lora else "copy"
        if reference == "adapter" and not self.backbone.uses_lora:
            raise ValueError("reference='adapter' needs a LoRA backbone (set backbone.lora)")
        if reference == "cached" and not self.loss.requires_reference:
            raise ValueError(f"{type(self.loss).__name__} uses no reference model: there is nothing to cache")
        if reference == "none" and self.loss.requires_reference:
            raise ValueError(f"{type(self.loss).__name__} needs a reference model; reference='none' is not possible")
        return reference

    # -- model construction -------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = self.backbone.build().train()  # from_pretrained returns eval mode
        # frozen, adapter-free media encoders give the policy and the reference the same features
        self._share_media = media_features_shareable(self.policy)
        if self.reference_mode == "copy":
            ref = copy.deepcopy(self.backbone.unwrap(self.policy)).eval()
            ref.requires_grad_(False)
            self._reference = (ref,)
        rank_zero_info(f"[mmpo] {self.backbone.describe(self.policy)}; reference: {self.reference_mode}")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check lora.target_modules and the freeze_* options")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- forward ------------------------------------------------------------------------------
    def _reference_logps(self, batch: PreferenceBatch, split: str = "train") -> Tensor | None:
        if self.reference_mode == "none":
            return None
        if self.reference_mode == "cached":
            if split not in self._caches:
                raise RuntimeError(f"no cached reference log-probs for the {split} split")
            return self._caches[split].token_logps(batch.ids, batch.response_mask, batch.host_lengths())
        with torch.no_grad():
            if self.reference_mode == "adapter":
                with adapters_disabled(self.policy):
                    return self.backbone.token_logps(self.policy, batch)
            ref = self._reference[0]
            if next(ref.parameters()).device != self.device:
                ref.to(self.device)
            return self.backbone.token_logps(ref, batch)

    def compute(self, batch: PreferenceBatch, split: str = "train") -> tuple[LossOutput, PairLogps, PairLogps | None]:
        """Policy and reference statistics for a batch, and the loss on them."""
        mask = batch.response_mask
        share = self.reference_mode == "adapter" and self._share_media
        inner = getattr(self.backbone.unwrap(self.policy), "model", None)
        with reuse_media_features(inner) if share and inner is not None else contextlib.nullcontext():
            policy = _split_pair(self.backbone.token_logps(self.policy, batch), mask)
            ref_tokens = self._reference_logps(batch, split)
        reference = _split_pair(ref_tokens, mask) if ref_tokens is not None else None
        return self.loss(policy, reference), policy, reference

    def _step(self, batch: PreferenceBatch, stage: str) -> Tensor | None:
        if batch.skipped:
            self._skipped[stage] = self._skipped.get(stage, 0) + batch.skipped
        if batch.skipped or batch.truncated:
            self.log(f"{stage}/data/skipped", float(batch.skipped), reduce_fx="sum", on_step=False, on_epoch=True)
            self.log(f"{stage}/data/truncated_responses", float(batch.truncated), reduce_fx="sum", on_epoch=True)
        if batch.num_pairs == 0:
            return None  # every record of this batch was skipped
        out, policy, _ = self.compute(batch, stage)
        loss = out.losses.mean()
        if not torch.isfinite(loss):
            message = f"non-finite {stage} loss {loss.item()} on records {batch.ids}"
            if stage != "train" or self.on_nonfinite == "stop":
                raise FloatingPointError(message + " (on_nonfinite='skip' skips such training steps)")
            self._skip_nonfinite(message)
            return None  # Lightning runs no backward and no optimizer step for this batch
        self._last_ids = batch.ids
        n = batch.num_pairs
        on_step = stage == "train"
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
            "logps/accuracies": (policy.chosen > policy.rejected).float().mean(),
        }
        for k, v in metrics.items():
            # evaluation figures are reduced across ranks; training ones stay per rank (no sync per step)
            self.log(
                f"{stage}/{k}", v, on_step=on_step, on_epoch=True, batch_size=n, prog_bar=k == "loss",
                sync_dist=not on_step,
            )  # fmt: skip
        return loss

    def _skip_nonfinite(self, message: str) -> None:
        rank_zero_warn(f"[mmpo] skipping an optimizer step: {message}")
        self.log("train/nonfinite_steps", 1.0, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if _grads_finite([p.grad for p in self.parameters() if p.grad is not None]):
            return
        message = f"non-finite gradient on records {self._last_ids}"
        if self.on_nonfinite == "stop":
            raise FloatingPointError(message + " (on_nonfinite='skip' skips such training steps)")
        self._skip_nonfinite(message)
        for p in self.parameters():
            p.grad = None  # parameters without a gradient are left untouched by the optimizer step

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: PreferenceBatch, batch_idx: int) -> dict[str, Any]:
        out, policy, _ = self.compute(batch, "test")
        return {
            "ids": batch.ids,
            "logps_chosen": policy.chosen.detach().cpu(),
            "logps_rejected": policy.rejected.detach().cpu(),
            "rewards_chosen": out.chosen_rewards.cpu(),
            "rewards_rejected": out.rejected_rewards.cpu(),
        }

    # -- cached reference log-probs ----------------------------------------------------------------
    def _prepare_caches(self, splits: tuple[str, ...]) -> None:
        if self.reference_mode != "cached":
            return
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "datasets") or not hasattr(dm, "collator"):
            raise ValueError("reference='cached' needs a datamodule with `datasets` and `collator()`")
        root = Path(self.reference_cache_dir or Path(self.trainer.default_root_dir) / "reference_cache")
        model_fp = model_fingerprint(self.backbone.model_name_or_path, self.backbone.revision)
        for split in splits:
            if split in self._caches or split not in dm.datasets:
                continue
            dataset = dm.datasets[split]
            settings = {"split": split, "max_length": getattr(dm, "max_length", None), "processor": dm.processor_name}
            path = root / f"{split}-{model_fp}-{data_fingerprint(dataset.records, settings)}.safetensors"
            if not path.exists() and self.trainer.is_global_zero:
                if self.trainer.global_step > 0 and not self.backbone.uses_lora:
                    raise RuntimeError(f"{path} is missing and the policy has trained: it is no longer the reference")
                self._caches[split] = self._compute_cache(dataset, dm, split)
                self._caches[split].save(path)
                rank_zero_info(f"[mmpo] cached reference log-probs of {len(dataset)} {split} records in {path}")
            self.trainer.strategy.barrier()
            if split not in self._caches:
                self._caches[split] = ReferenceCache.load(path)

    def _compute_cache(self, dataset: Any, dm: Any, split: str) -> ReferenceCache:
        was_training = self.policy.training
        self.policy.eval()
        try:
            if self.backbone.uses_lora:

                def forward(batch: PreferenceBatch) -> Tensor:
                    with adapters_disabled(self.policy):
                        return self.backbone.token_logps(self.policy, batch)
            else:

                def forward(batch: PreferenceBatch) -> Tensor:
                    return self.backbone.token_logps(self.policy, batch)

            bs = getattr(dm, "eval_batch_size", 8)
            return compute_reference_cache(forward, dataset, dm.collator(), bs, self.device, f"reference ({split})")
        finally:
            self.policy.train(was_training)

    def _report_skipped(self, stage: str) -> None:
        n = self._skipped.pop(stage, 0)
        if n:
            rank_zero_warn(
                f"[mmpo] {n} bad record(s) skipped in this {stage} epoch (on_bad_sample='skip'); "
                f"logged as {stage}/data/skipped"
            )

    def on_train_epoch_end(self) -> None:
        self._report_skipped("train")

    def on_validation_epoch_end(self) -> None:
        self._report_skipped("val")

    def on_test_epoch_end(self) -> None:
        self._report_skipped("test")

    def setup(self, stage: str) -> None:
        global _HOST_MEMORY_NOTED
        if not (self.keep_host_memory and self.trainer.strategy.root_device.type == "cpu"):
            return
        if keep_freed_memory() and not _HOST_MEMORY_NOTED:
            _HOST_MEMORY_NOTED = True
            rank_zero_info(
                f"[mmpo] CPU run: freed host blocks up to {DEFAULT_KEEP_BYTES >> 20} MiB stay mapped for reuse "
                "(keep_host_memory=False leaves the allocator alone)"
            )

    def on_fit_start(self) -> None:
        self._prepare_caches(("train", "val"))

    def on_validation_start(self) -> None:
        self._prepare_caches(("val",))

    def on_test_start(self) -> None:
        self._prepare_caches(("test",))

    # -- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._forget_finished_loader_position(checkpoint)
        if not self.checkpoint_trainable_only:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def _forget_finished_loader_position(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint taken after an epoch's last batch must resume at the start of the next epoch.
        # The stateful loader only knows how many batches it served (fewer than its length under
        # limit_train_batches), so its position is dropped here rather than replayed.
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        fit_state.pop("combined_loader", None)

    def on_train_end(self) -> None:
        if self.save_dir and self.trainer.is_global_zero:
            self.export(self.save_dir)

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Write the trained weights (PEFT adapter or full model) and the processor to ``out_dir``.

        Written to a temporary sibling directory and renamed, so a crash never leaves a partial export.
        """
        out = Path(out_dir)
        with atomic_directory(out) as tmp:
            self.backbone.save(self.policy, tmp)
        rank_zero_info(f"[mmpo] saved {'LoRA adapter' if self.backbone.uses_lora else 'model'} to {out}")
        return out
