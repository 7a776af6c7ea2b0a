"""``mmpo predict``: greedy responses of the policy to a split's prompts, written as JSONL.

:meth:`PreferenceModule.predict_step <mmpo.module.PreferenceModule.predict_step>` generates from the
prompts of a :class:`~datamodules.core.batch.PreferenceBatch` (no reference model is involved) with
:func:`generate_from_batch`; :class:`JsonlPredictionWriter` writes one line per record::

    {"id": "val-000003", "prompt": "USER: <image> describe the image . ASSISTANT:", "response": "a red ..."}

The prompt is the text the model was given (chat template applied, each image's run of tokens shown as
one placeholder). Under DDP each rank writes its lines, tagged with their dataset index, to a part file;
rank 0 merges the parts in dataset order (a record a padding sampler served twice is written once) and
replaces the output file in one rename, so a reader never sees a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from datamodules.core.atomic import atomic_open
from datamodules.vision_text.collator import TOKEN_ALIGNED_MEDIA

__all__ = ["JsonlPredictionWriter", "PredictSettings", "decode_prompt", "generate_from_batch"]


@dataclass
class PredictSettings:
    """What ``mmpo predict`` generates and where it writes it.

    Args:
        output_file: the JSONL file of generated responses (default:
            ``<trainer.default_root_dir>/predictions.jsonl``). A ``BasePredictionWriter`` among
            ``trainer.callbacks`` replaces this writer.
        max_new_tokens: longest response, in tokens (greedy decoding, ends at the EOS token).
    """

    output_file: str | None = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"predict.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@torch.no_grad()
def generate_from_batch(
    model: nn.Module, batch: Any, *, pad_token_id: int, eos_token_id: int | None, max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy continuations of the B prompts of a batch, as token ids, and the prompts' own ids.

    The prompt of group b is row b's first ``prompt_lengths[b]`` tokens (rows are response-major, so
    rows ``0..B-1`` hold every group once). Prompts are left-padded so that every row ends where
    generation starts. A batch whose responses see different media stores its media per row, so its
    N = K·B rows are all run and the first B kept.

    Returns:
        The B prompts' token ids and the B responses' token ids (up to the first EOS, excluded).
    """
    prompt_lengths = batch.host_lengths()[0]
    rows = batch.num_groups if batch.shared_prompt else batch.input_ids.shape[0]
    width = max(prompt_lengths[:rows])
    ids = torch.full((rows, width), pad_token_id, dtype=batch.input_ids.dtype, device=batch.input_ids.device)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(prompt_lengths[:rows]):  # (rows, width), left-padded
        ids[i, width - n :] = batch.input_ids[i, :n]
        mask[i, width - n :] = 1
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    media = {}
    for key, value in batch.media.items():
        if key in TOKEN_ALIGNED_MEDIA:  # one entry per token of the row: the prompt's part, left-padded like ids
            cut = value.new_zeros((rows, width, *value.shape[2:]))
            for i, n in enumerate(prompt_lengths[:rows]):
                cut[i, width - n :] = value[i, :n]
            value = cut
        media[key] = value.to(dtype) if value.is_floating_point() else value
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **media,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        use_cache=True,  # training models are built with use_cache off; generation wants the cache
    )
    prompts = [ids[i, width - n :].tolist() for i, n in enumerate(prompt_lengths[: batch.num_groups])]
    responses = []
    for row in out[: batch.num_groups, width:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        responses.append(row)
    return prompts, responses


def decode_prompt(tokenizer: Any, ids: Sequence[int]) -> str:
    """A prompt's text as the model saw it: a run of one special token (an image's or a video's tokens)
    shown once, the tokenizer's BOS/EOS/padding left out."""
    dropped = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    special = set(tokenizer.all_special_ids)
    kept: list[int] = []
    for t in ids:
        if t in dropped or (kept and t == kept[-1] and t in special):
            continue
        kept.append(t)
    return tokenizer.decode(kept, skip_special_tokens=False).strip()


def _write_atomically(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path`` through the project's atomic writer (temp file, fsync, rename)."""
    with atomic_open(path) as f:
        f.writelines(lines)


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each record's generated response as one JSONL line: ``id``, ``prompt``, ``response``.

    Predictions are the dicts :meth:`~mmpo.module.PreferenceModule.predict_step` returns (``ids``,
    ``prompts``, ``responses``, one entry per record). Lines are kept with their dataset index; at the
    end of prediction every rank writes its part, and rank 0 merges the parts in dataset order into
    ``output_file`` (temporary file, then ``os.replace``) and removes them.

    Args:
        output_file: the JSONL file (default: ``<trainer.default_root_dir>/predictions.jsonl``).
    """

    def __init__(self, output_file: str | os.PathLike | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_file = output_file
        self._rows: list[tuple[int, str]] = []

    def path(self, trainer: L.Trainer) -> Path:
        """Where the predictions go."""
        return Path(self.output_file or Path(trainer.default_root_dir) / "predictions.jsonl")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        ids, prompts, responses = prediction["ids"], prediction["prompts"], prediction["responses"]
        indices = _dataset_indices(trainer, batch_indices, ids)
        for index, rid, prompt, response in zip(indices, ids, prompts, responses, strict=True):
            line = json.dumps({"id": rid, "prompt": prompt, "response": response}, ensure_ascii=False) + "\n"
            self._rows.append((-1 if index is None else int(index), line))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = self.path(trainer)
        if trainer.world_size == 1:
            _write_atomically(out, [line for _, line in sorted(self._rows, key=_order)])
            rank_zero_info(f"[mmpo] wrote {len(self._rows)} predictions to {out}")
            return
        part = out.with_name(f".{out.name}.rank{trainer.global_rank}")
        _write_atomically(part, [json.dumps([index, line]) + "\n" for index, line in self._rows])
        trainer.strategy.barrier("mmpo-predictions-written")
        if trainer.is_global_zero:
            parts = [out.with_name(f".{out.name}.rank{r}") for r in range(trainer.world_size)]
            rows: dict[int, str] = {}
            unindexed: list[str] = []
            for p in parts:
                for text in p.read_text(encoding="utf-8").splitlines():
                    index, line = json.loads(text)
                    if index < 0:
                        unindexed.append(line)
                    else:
                        rows.setdefault(index, line)  # a padding sampler serves a few records twice
            _write_atomically(out, [rows[i] for i in sorted(rows)] + unindexed)
            for p in parts:
                p.unlink()
            rank_zero_info(f"[mmpo] wrote {len(rows) + len(unindexed)} predictions to {out}")
        trainer.strategy.barrier("mmpo-predictions-merged")
        self._rows = []


def _dataset_indices(trainer: L.Trainer, batch_indices: Sequence[int] | None, ids: list[str]) -> list[int | None]:
    """The dataset index of each record of a batch; None where unknown (then the line keeps the loader's
    order, after every indexed line)."""
    if batch_indices is not None and len(batch_indices) == len(ids):
        return [int(i) for i in batch_indices]
    # records skipped while batching (on_bad_sample: skip): match the rest by id, where the dataset has records
    records = getattr(getattr(trainer.predict_dataloaders, "dataset", None), "records", None)
    if batch_indices is None or records is None:
        return [None] * len(ids)
    wanted = set(ids)
    kept = [int(i) for i in batch_indices if getattr(records[i], "id", None) in wanted]
    return kept if len(kept) == len(ids) else [None] * len(ids)


def _order(row: tuple[int, str]) -> tuple[bool, int]:
    index, _ = row
    return index < 0, index
