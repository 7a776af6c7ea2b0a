"""The Lightning module that trains a policy on groups of K preference-ranked responses (pairs when K = 2)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from datamodules.core.atomic import atomic_directory
from datamodules.core.batch import PreferenceBatch
from mmpo.allocator import DEFAULT_KEEP_BYTES, keep_freed_memory
from mmpo.backbones.protocol import Backbone
from mmpo.losses import LossOutput, PreferenceLoss, ResponseStats
from mmpo.metrics import reward_metrics
from mmpo.pami import PaMiSelector
from mmpo.prediction import JsonlPredictionWriter, PredictSettings, decode_prompt, generate_from_batch
from mmpo.rank_gather import gather_variable
from mmpo.reference.strategies import ReferenceName, ReferenceStrategy, resolve_reference
from mmpo.rng_state import CHECKPOINT_KEY, TrainingRandomness, gather, restore
from mmpo.token_kl import token_kl_statistics
from mmpo.token_masks import TokenMaskNetwork

__all__ = ["LOSS_STATE_KEY", "PreferenceModule", "reward_metrics"]  # reward_metrics lives in mmpo.metrics

LOSS_STATE_KEY = "mmpo_loss_state"  # a stateful loss's running statistics in Lightning checkpoints


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


def _loss_scaler(trainer: Any) -> Any:
    """The precision plugin's loss scaler (``precision: 16-mixed``: a GradScaler), or None."""
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    return getattr(plugin, "scaler", None)


class PreferenceModule(L.LightningModule):
    """Preference optimisation of any backbone with any loss of ``mmpo.losses``.

    Args:
        backbone: how to build the model and compute per-response statistics (any
            :class:`~mmpo.backbones.Backbone`, e.g. ``VisionLanguageBackbone``).
        loss: the objective (``mmpo.losses.DPOLoss``, ``SimPOLoss``, ``CombinedLoss``, ...).
        optimizer: optimizer factory, e.g. ``torch.optim.AdamW`` with ``lr`` in YAML.
        scheduler: optional LR scheduler factory, stepped every optimizer step.
        reference: where reference statistics come from: a strategy of ``mmpo.reference``
            (``DisabledAdapter``, ``FrozenCopy``, ``SeparateCheckpoint``, ``CachedReference``,
            ``NoReference``) or its short name. ``auto``: the disabled adapter with LoRA, a frozen
            copy without, nothing for reference-free losses. ``adapter``, ``copy``, ``none`` force
            one. ``cached``: computed once for every record before the first step, stored on disk,
            and read back instead of running a reference model (see ``reference_cache_dir``).
        reference_cache_dir: where ``reference: cached`` keeps its files (default:
            ``<trainer.default_root_dir>/reference_cache``). Files are named by model and data
            fingerprints, so a change of either computes a new cache.
        save_dir: where the trained adapter (LoRA) or full model is written, in the standard
            PEFT/transformers format, when training ends. None to skip.
        checkpoint_trainable_only: keep only trainable weights in Lightning checkpoints (the frozen
            base is reloaded from ``model_name_or_path`` on resume).
        on_nonfinite: what a NaN/inf training loss or gradient does: ``stop`` raises with the batch's
            record ids; ``skip`` drops that optimizer step (no update), warns with the ids and counts
            it in ``train/nonfinite_steps``. Validation losses are always checked and stop the run.
            With several ranks every rank takes the same decision (``docs/reliability.md``). Under a
            loss scaler (``precision: 16-mixed``) only the loss is checked: the scaler itself skips
            the steps whose gradients overflow, and lowers its scale, by design.
        keep_host_memory: on a CPU run, let glibc keep freed blocks of up to 64 MiB mapped for the
            next step instead of returning them to the kernel and faulting them back in each step
            (``mmpo.allocator.keep_freed_memory``; process-wide, until exit). No effect on GPU runs
            or outside glibc.
        predict: what ``mmpo predict`` generates (greedy, ``max_new_tokens``) and where it writes the
            responses (``output_file``, JSONL; default ``<trainer.default_root_dir>/predictions.jsonl``).
        candidates: a selection run on each batch before the loss, keeping some of every group's
            responses and weighing them (``mmpo.pami.PaMiSelector``: PaMi-VDPO's close-to-far choice
            among online video negatives); None keeps every response.
    """

    def __init__(
        self,
        backbone: Backbone,
        loss: PreferenceLoss,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        reference: ReferenceName | ReferenceStrategy = "auto",
        reference_cache_dir: str | None = None,
        save_dir: str | None = None,
        checkpoint_trainable_only: bool = True,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        keep_host_memory: bool = True,
        predict: PredictSettings | None = None,
        candidates: PaMiSelector | None = None,
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
        self.predict = predict if predict is not None else PredictSettings()
        self._last_ids: list[str] = []
        self._drop_step = False  # set when every rank agreed to skip this step (several ranks only)
        self._tokenizer: Any = None  # for predict
        # the strategy is not a module: a frozen reference model it holds stays out of the state dict
        self.reference = resolve_reference(reference, loss, backbone, reference_cache_dir)
        self.candidates = candidates
        if candidates is not None:
            candidates.check(self.reference.name)
        self.reference_cache_dir = reference_cache_dir
        self.policy: nn.Module | None = None
        self.token_mask_network: nn.Module | None = None  # SparsePO's learned masks, built with the policy
        self._share_media = False
        self._skipped: dict[str, int] = {}  # bad records dropped this epoch, per stage
        self._training_rng = TrainingRandomness()  # what training steps draw from (dropout), kept in checkpoints
        self.strict_loading = not checkpoint_trainable_only

    @property
    def reference_mode(self) -> str:
        """The reference strategy's short name (``adapter``, ``copy``, ``checkpoint``, ``cached``, ``none``)."""
        return self.reference.name

    # -- model construction -------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = self.backbone.build().train()  # from_pretrained returns eval mode
        if self.loss.learned_token_masks:  # trainable: it joins the optimizer, the checkpoints and DDP
            config = self.backbone.unwrap(self.policy).config
            text = getattr(config, "text_config", config)
            eps = getattr(text, "rms_norm_eps", None) or getattr(text, "layer_norm_eps", None) or 1e-5
            self.token_mask_network = TokenMaskNetwork(
                text.num_hidden_layers, text.hidden_size, self.loss.independent_masks, self.loss.mask_dropout, eps
            )
        self._share_media = self.reference.reuses_policy_media and self.backbone.media_shareable(self.policy)
        self.reference.setup(self)
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
    def compute(
        self, batch: PreferenceBatch, split: str = "train"
    ) -> tuple[LossOutput, ResponseStats, ResponseStats | None]:
        """Policy and reference statistics for a batch, and the loss on them."""
        side, reference = batch.side_info(), None
        if "desirable" in side and not self.loss.requires_desirable_labels:
            # response 1 of an unpaired group is a mismatched completion, not a rejected answer
            raise ValueError(
                f"{type(self.loss).__name__} compares responses as chosen and rejected, but this batch holds unpaired "
                f"feedback (records {batch.ids[:3]}...); train it with an unpaired loss (KTOLoss, BCOLoss)"
            )
        if self.loss.requires_scores and "scores" not in side:
            missing = _records_without_scores(batch)
            raise ValueError(
                f"{type(self.loss).__name__} reads per-response scores, but "
                + (f"records {missing[:5]} of this batch have none" if missing else "this batch carries none")
                + " (a label-only record); give every record `scores`, or train these pairs with a loss that needs none"
            )
        if self.candidates is not None:  # each group's selected responses, weighted; the scoring pass that
            # chose them ran the reference over every row, so it gives the reference statistics too
            batch, side["candidate_weights"], reference = self.candidates.select(self, batch, split)
        with self.backbone.media_reuse(self.policy) if self._share_media else contextlib.nullcontext():
            if self.loss.requires_token_kl and reference is None:  # TDPO, SparsePO: KL from both models' passes
                policy, reference = token_kl_statistics(self, batch)
            else:
                policy = self.backbone.statistics(self.policy, batch)
            policy = policy.with_side(**side)
            if reference is None:
                reference = self.reference.statistics(self, batch, split)
        return self.loss(policy, reference), policy, reference

    def _step(self, batch: PreferenceBatch, stage: str) -> Tensor | None:
        self.loss.train(stage == "train")  # a stateful loss updates its running statistics in training steps only
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return self._agreed_step(batch, stage, trainer.world_size)
        self._count_data(stage, batch.skipped, batch.truncated)
        if batch.num_groups == 0:
            return None  # every record of this batch was skipped
        out, policy, _ = self.compute(batch, stage)
        loss = out.losses.mean()
        if not torch.isfinite(loss):
            self._nonfinite(stage, f"non-finite {stage} loss {loss.item()} on records {batch.ids}")
            return None  # Lightning runs no backward and no optimizer step for this batch
        self._last_ids = batch.ids
        self._log_metrics(stage, loss, out, policy, batch.num_groups)
        return loss

    def _agreed_step(self, batch: PreferenceBatch, stage: str, world_size: int) -> Tensor | None:
        """The step with several ranks, where every rank must take the same decision.

        Lightning refuses a training step that returns None under DDP, and a NaN on one rank reaches
        every rank through the gradient all-reduce. So the ranks gather one small table per step (one
        collective, read back once, in place of the single-process finiteness read): each rank's
        non-finite flag, groups, skipped and truncated records. A non-finite loss anywhere stops every
        rank with the same message, or (``skip``) makes every rank return a zero-weighted loss and drop
        the optimizer step (:meth:`on_before_optimizer_step`), as when no rank has a record. A rank
        whose records were all skipped while others have some returns a zero-weighted loss, and the
        others scale theirs so that the averaged gradient is the mean over the ranks with data. With
        gradient accumulation a skip drops the whole optimizer step the batch belongs to.
        """
        out = policy = loss = None
        flags = torch.zeros(4, device=self.device)  # [non-finite loss, groups, skipped, truncated]
        if batch.num_groups:
            out, policy, _ = self.compute(batch, stage)
            loss = out.losses.mean()
            flags[0] = (~torch.isfinite(loss.detach())).float()
        else:  # the loss's reductions over ranks are collectives: take part in them with nothing to add
            self.loss.idle(self.device)
        flags[1:] = torch.tensor([batch.num_groups, batch.skipped, batch.truncated], dtype=flags.dtype)
        table = self.all_gather(flags).tolist()  # (world_size, 4): the one read back of the step
        self._count_data(stage, int(sum(row[2] for row in table)), int(sum(row[3] for row in table)))
        self._last_ids = batch.ids
        bad = [rank for rank, row in enumerate(table) if row[0]]
        if bad:
            ids = self._ids_by_rank(batch.ids)
            self._nonfinite(stage, f"non-finite {stage} loss on rank(s) {bad}, records {[ids[r] for r in bad]}")
        with_data = sum(1 for row in table if row[1])
        if stage != "train":
            if loss is not None:
                self._log_metrics(stage, loss, out, policy, batch.num_groups)
            return loss
        if bad or with_data == 0:
            self._drop_step = True
            return self._zero_loss()
        if loss is None:
            return self._zero_loss()  # nothing to train on here: zero gradients into the others' average
        self._log_metrics(stage, loss, out, policy, batch.num_groups)
        return loss if with_data == world_size else loss * (world_size / with_data)

    def _zero_loss(self) -> Tensor:
        # every trainable parameter enters the graph with weight zero, so DDP's gradient all-reduce runs as
        # in any step (the ranks wait for each other there) and adds nothing
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def _ids_by_rank(self, ids: list[str]) -> list[list[str]]:
        """Every rank's record ids, so that all ranks print the same message (on the way to a stop or skip)."""
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return [ids]
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, ids)
        return gathered

    def _count_data(self, stage: str, skipped: int, truncated: int) -> None:
        # with several ranks these are the sums over all ranks, the same on each: logged without a sync
        if skipped:
            self._skipped[stage] = self._skipped.get(stage, 0) + skipped
        if skipped or truncated:
            self.log(f"{stage}/data/skipped", float(skipped), reduce_fx="sum", on_step=False, on_epoch=True)
            self.log(f"{stage}/data/truncated_responses", float(truncated), reduce_fx="sum", on_epoch=True)

    def _nonfinite(self, stage: str, message: str) -> None:
        """Stop (evaluation, or ``on_nonfinite='stop'``), or count and warn before the step is skipped."""
        if stage != "train" or self.on_nonfinite == "stop":
            raise FloatingPointError(message + " (on_nonfinite='skip' skips such training steps)")
        self._skip_nonfinite(message)

    def _log_metrics(self, stage: str, loss: Tensor, out: LossOutput, policy: ResponseStats, n: int) -> None:
        on_step = stage == "train"
        metrics = {"loss": loss.detach(), **reward_metrics(out, policy)}
        for k, v in metrics.items():
            # evaluation figures are reduced across ranks; training ones stay per rank (no sync per step)
            self.log(
                f"{stage}/{k}", v, on_step=on_step, on_epoch=True, batch_size=n, prog_bar=k == "loss",
                sync_dist=not on_step,
            )  # fmt: skip

    def _skip_nonfinite(self, message: str) -> None:
        rank_zero_warn(f"[mmpo] skipping an optimizer step: {message}")
        self.log("train/nonfinite_steps", 1.0, reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self._drop_step:  # every rank agreed to skip this step (counted when decided)
            self._drop_step = False
            self._drop_gradients()
            return
        if _loss_scaler(getattr(self, "_trainer", None)) is not None:
            return  # the scaler skips steps with inf/NaN gradients (overflow) itself and lowers its scale
        # under DDP the gradients are all-reduced already, so every rank finds the same answer (FSDP's
        # sharded gradients would not be: see docs/reliability.md)
        if _grads_finite([p.grad for p in self.parameters() if p.grad is not None]):
            return
        ids = [i for rank_ids in self._ids_by_rank(self._last_ids) for i in rank_ids]
        message = f"non-finite gradient on records {ids}"
        if self.on_nonfinite == "stop":
            raise FloatingPointError(message + " (on_nonfinite='skip' skips such training steps)")
        self._skip_nonfinite(message)
        self._drop_gradients()

    def _drop_gradients(self) -> None:
        # Parameters without a gradient are left untouched by the optimizer step: no update, and no
        # weight decay or momentum either (a zero gradient would still move weights under AdamW)
        for p in self.parameters():
            p.grad = None

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor | None:
        with self._training_rng.drawn(self.device):
            return self._step(batch, "train")

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: PreferenceBatch, batch_idx: int) -> dict[str, Any]:
        """The policy's greedy responses to the batch's prompts (no reference is used).

        Returns ``ids``, ``prompts`` (as the model saw them) and ``responses``, one entry per record,
        which :class:`~mmpo.prediction.JsonlPredictionWriter` writes as JSONL.
        """
        if batch.num_groups == 0:
            return {"ids": [], "prompts": [], "responses": []}
        tokenizer = self._predict_tokenizer()
        prompts, responses = generate_from_batch(
            self.policy,
            batch,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            max_new_tokens=self.predict.max_new_tokens,
        )
        return {
            "ids": batch.ids,
            "prompts": [decode_prompt(tokenizer, p) for p in prompts],
            "responses": [r.strip() for r in tokenizer.batch_decode(responses, skip_special_tokens=True)],
        }

    def _predict_tokenizer(self) -> Any:
        """The tokenizer of the processor that built the batches (the datamodule's), else the backbone's."""
        if self._tokenizer is None:
            trainer = getattr(self, "_trainer", None)
            processor = getattr(trainer.datamodule, "processor", None) if trainer is not None else None
            if processor is None:
                from transformers import AutoProcessor

                processor = AutoProcessor.from_pretrained(self.backbone.model_name_or_path)
            self._tokenizer = getattr(processor, "tokenizer", processor)
        return self._tokenizer

    def configure_callbacks(self) -> list[L.Callback]:
        # predictions go to predict.output_file unless the trainer has a prediction writer of its own
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.state.fn != TrainerFn.PREDICTING:
            return []
        if any(isinstance(cb, BasePredictionWriter) for cb in trainer.callbacks):
            return []
        return [JsonlPredictionWriter(self.predict.output_file)]

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
        several = getattr(self.trainer, "world_size", 1) > 1
        self.loss.set_gather((lambda values: gather_variable(values, self.all_gather)) if several else None)
        if not (self.keep_host_memory and self.trainer.strategy.root_device.type == "cpu"):
            return
        if keep_freed_memory() and not _HOST_MEMORY_NOTED:
            _HOST_MEMORY_NOTED = True
            rank_zero_info(
                f"[mmpo] CPU run: freed host blocks up to {DEFAULT_KEEP_BYTES >> 20} MiB stay mapped for reuse "
                "(keep_host_memory=False leaves the allocator alone)"
            )

    def on_fit_start(self) -> None:
        self._drop_step = False
        self.reference.prepare(self, ("train", "val"))

    def on_validation_start(self) -> None:
        self.reference.prepare(self, ("val",))

    def on_test_start(self) -> None:
        self.reference.prepare(self, ("test",))

    # -- checkpoints and export ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._forget_finished_loader_position(checkpoint)
        # every rank makes the checkpoint, rank 0 writes it: its entry holds each rank's random streams
        trainer = getattr(self, "_trainer", None)
        checkpoint[CHECKPOINT_KEY] = gather(self._training_rng, trainer.world_size if trainer else 1)
        if self.loss.stateful:  # the same on every rank (the loss reduces what it adds over ranks)
            checkpoint[LOSS_STATE_KEY] = self.loss.state_dict()
        if not self.checkpoint_trainable_only:
            return
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        reason = restore(self._training_rng, checkpoint.get(CHECKPOINT_KEY), rank, world_size)
        if LOSS_STATE_KEY in checkpoint:
            self.loss.load_state_dict(checkpoint[LOSS_STATE_KEY])
        elif self.loss.stateful:
            name = type(self.loss).__name__
            rank_zero_warn(f"[mmpo] the checkpoint holds no running state for {name}: it starts afresh")
        if reason and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(
                f"[mmpo] the random streams of the training steps (LoRA dropout) are not restored: {reason}. "
                "The run resumes with fresh ones, so its losses differ slightly from an uninterrupted run's"
            )

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
        what = getattr(self.backbone, "saved_artifact", None)  # a backbone may say what it saved
        what = what or ("LoRA adapter" if self.backbone.uses_lora else "model")
        rank_zero_info(f"[mmpo] saved {what} to {out}")
        return out


def _records_without_scores(batch: PreferenceBatch) -> list[str]:
    """Ids of a batch's records whose scores are missing (a NaN row), where the batch says which."""
    scores = getattr(batch, "scores", None)
    if scores is None:
        return list(batch.ids)
    return [i for i, row in zip(batch.ids, scores.isnan().any(dim=-1).tolist(), strict=True) if row]
