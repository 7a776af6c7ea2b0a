"""PaMi-VDPO's prompt-aware candidate selection, run by the training module before each step's loss.

A batch from ``datamodules.VideoVDPODataModule`` holds groups of 1 + K responses with the same text:
the original clip, then K augmented candidates. :class:`PaMiSelector` scores each candidate by how
much it changes the reference model's next-token distributions over the response (mean per-token
Jensen–Shannon divergence against the original clip, ``mmpo.divergence``), keeps M of them by the
close-to-far schedule (``augment.video.pami.CloseToFar``: close but still distinct early in training,
the most distinct later) and weighs the kept ones (0 for a candidate judged semantically identical
for the prompt, a false rejection). The loss (``MultiInstanceVDPOLoss``) then reads the kept group
and the weights. The scoring pass is also the step's reference pass: its log-probs of the kept rows
are the reference statistics. What it did is logged each step: ``{split}/pami/...`` (scores, the target quantile,
shares judged identical) and, where the batch names its responses, the mean score per augmentation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from augment.video.pami import CandidateSelection, CloseToFar
from datamodules.core.batch import PreferenceBatch
from mmpo.divergence import chunked_js_divergence, masked_token_mean
from mmpo.losses.base import ResponseStats

__all__ = ["PaMiSelector"]


class PaMiSelector:
    """Score, select and weigh each group's candidate clips (PaMi-VDPO).

    Args:
        num_selected: M, candidates kept per group (1 ≤ M ≤ K).
        schedule: the close-to-far schedule and its thresholds (``augment.video.pami.CloseToFar``);
            None uses its defaults.
        vocab_chunk: vocabulary columns per chunk of the divergence (memory: one (K, R, chunk) float32
            block at a time).
    """

    def __init__(self, num_selected: int = 1, schedule: CloseToFar | None = None, vocab_chunk: int = 4096) -> None:
        if num_selected < 1:
            raise ValueError(f"num_selected must be >= 1, got {num_selected}")
        if vocab_chunk < 1:
            raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
        self.num_selected = num_selected
        self.schedule = schedule if schedule is not None else CloseToFar()
        self.vocab_chunk = vocab_chunk
        self.last: dict[str, Any] = {}  # the latest step's scores and choices, for demos and tests

    def check(self, reference_name: str) -> None:
        """Refuse reference strategies that cannot score candidates made anew every step."""
        if reference_name in ("cached", "none"):
            raise ValueError(
                f"PaMi-VDPO scores each step's candidates with the reference model: reference {reference_name!r} "
                "has none to run (use adapter, copy or a separate checkpoint)"
            )

    @staticmethod
    def progress(module: Any) -> float:
        """The share of training done (the schedule's clock): optimizer steps over the run's total."""
        trainer = getattr(module, "_trainer", None)
        if trainer is None:
            return 0.0
        total = trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            return 0.0
        return min(1.0, trainer.global_step / total)

    def _reference_model(self, module: Any):
        self.check(module.reference.name)
        return module.reference.reference_model(module)  # (model, context); the caller runs it under no_grad

    @torch.no_grad()
    def _reference_pass(self, module: Any, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """(B, K) scores, and the reference's (N, T) response-token log-probs from the same pass."""
        model, context = self._reference_model(module)
        was_training = model.training
        model.eval()  # no dropout in the scores
        try:
            with context:
                hidden, mask, head, token_logps = module.backbone.response_hidden(model, batch)  # (N, R, H), (N, R)
        finally:
            model.train(was_training)
        b, k1 = batch.num_groups, batch.group_size
        hidden = hidden.view(k1, b, *hidden.shape[1:]).transpose(0, 1)  # (B, 1 + K, R, H)
        mask = mask.view(k1, b, -1).transpose(0, 1)  # (B, 1 + K, R)
        bias = getattr(head, "bias", None)
        js = chunked_js_divergence(
            hidden[:, :1], hidden[:, 1:], head.weight, bias, mask=mask[:, 1:], vocab_chunk=self.vocab_chunk
        )  # (B, K, R)
        return masked_token_mean(js, mask[:, 1:] & mask[:, :1]), token_logps

    def scores(self, module: Any, batch: PreferenceBatch) -> Tensor:
        """(B, K) mean per-token JS divergence (nats) of each candidate against the original clip."""
        return self._reference_pass(module, batch)[0]

    def select(self, module: Any, batch: PreferenceBatch, split: str) -> tuple[PreferenceBatch, Tensor, ResponseStats]:
        """The batch with each group's original and M kept candidates, their (B, 1 + M) weights, and the
        reference statistics of the kept rows.

        The scoring pass runs the reference over every row anyway; its response log-probs of the kept
        rows are the reference statistics, so the step runs no second reference pass.
        """
        k = batch.group_size - 1
        if self.num_selected > k:
            raise ValueError(
                f"PaMi-VDPO keeps num_selected={self.num_selected} candidates but the batch's groups hold {k} "
                "(data.negatives.num_candidates)"
            )
        scores, token_logps = self._reference_pass(module, batch)  # (B, K), (N, T)
        progress = self.progress(module) if split == "train" else 1.0
        selection: CandidateSelection = self.schedule(scores, progress, self.num_selected)
        keep = torch.cat([torch.zeros_like(selection.indices[:, :1]), selection.indices + 1], dim=1)  # (B, 1 + M)
        self.last = {"scores": scores, "keep": keep, "weights": selection.weights, "tags": batch.response_tags}
        self._log(module, split, scores, selection, batch)
        kept = batch.select_responses(keep)
        rows = batch.selected_rows(keep).to(token_logps.device)  # (N', ) in the kept batch's row order
        reference = ResponseStats.from_rows(token_logps[rows], kept.response_mask, kept.group_size)
        return kept, selection.group_weights(), reference

    def _log(
        self, module: Any, split: str, scores: Tensor, selection: CandidateSelection, batch: PreferenceBatch
    ) -> None:
        if getattr(module, "_trainer", None) is None:
            return
        b = batch.num_groups
        figures = {"score_mean": scores.float().mean(), **selection.summary()}
        if batch.response_tags is not None:  # mean score of each augmentation over this batch
            by_tag: dict[str, list[Tensor]] = {}
            for row, tags in zip(scores, batch.response_tags, strict=True):
                for value, tag in zip(row, tags[1:], strict=True):
                    by_tag.setdefault(tag, []).append(value)
            figures.update({f"score/{tag}": torch.stack(v).float().mean() for tag, v in by_tag.items()})
        for name, value in figures.items():
            module.log(f"{split}/pami/{name}", value, batch_size=b, sync_dist=split != "train")
