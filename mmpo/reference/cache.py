"""Reference log-probs computed once per dataset and stored on disk.

With ``reference: cached`` the module computes the reference's response-token log-probs for every
record before the first optimizer step (with the adapter disabled for LoRA; for full fine-tuning the
untrained policy *is* the reference), saves them, and trains with no reference forward and no
reference model in memory. A cache file is named by a fingerprint of the model and one of the data
(every record's fields, the bytes of its images, the tokenizer and the collator's settings), so
changing either computes a new one; a stale or foreign file is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmpo.logprobs import span_coordinates

__all__ = ["ReferenceCache", "data_fingerprint", "model_fingerprint"]

CACHE_VERSION = 1


def _file_digest(path: str | os.PathLike, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """Identity of the reference model: a local directory's config and weight files, or hub id + revision."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    path = Path(name_or_path)
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
                h.update(f.name.encode())
                _file_digest(f, h)
    else:
        h.update(f"{name_or_path}@{revision or 'main'}".encode())
    return h.hexdigest()[:16]


def data_fingerprint(records: Iterable[Any], settings: dict[str, Any]) -> str:
    """Identity of a record list as the collator sees it (fields, image bytes, collator settings)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for rec in records:
        h.update(json.dumps([rec.id, rec.prompt, rec.chosen, rec.rejected], sort_keys=True).encode())
        for image in [*rec.images, *rec.videos]:
            if isinstance(image, str | os.PathLike):
                _file_digest(image, h)
            elif isinstance(image, dict):  # an undecoded image of a datasets.Dataset
                h.update(bytes(image["bytes"]))
            else:  # a PIL image
                h.update(f"{image.mode}{image.size}".encode())
                h.update(image.tobytes())
    return h.hexdigest()[:16]


class ReferenceCache:
    """Token log-probs of the chosen and rejected response of every record, by record id."""

    def __init__(self, chosen: list[Tensor], rejected: list[Tensor], ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError("cached reference log-probs need unique record ids")
        self.index = {rid: i for i, rid in enumerate(ids)}
        self.chosen, self.rejected, self.ids = chosen, rejected, ids

    def __contains__(self, rid: str) -> bool:
        return rid in self.index

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file and rename)."""
        from safetensors.torch import save_file

        def flat(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
            lengths = torch.tensor([0] + [p.numel() for p in parts])
            return torch.cat(parts).float().contiguous(), lengths.cumsum(0)

        c, co = flat(self.chosen)
        r, ro = flat(self.rejected)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {"chosen": c, "chosen_offsets": co, "rejected": r, "rejected_offsets": ro}
        save_file(tensors, str(tmp), metadata={"ids": json.dumps(self.ids), "version": str(CACHE_VERSION)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("version") != str(CACHE_VERSION):
                raise ValueError(f"{path}: reference cache version {meta.get('version')}, expected {CACHE_VERSION}")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

        def split(values: Tensor, offsets: Tensor) -> list[Tensor]:
            return [values[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]

        ids = json.loads(meta["ids"])
        return cls(split(t["chosen"], t["chosen_offsets"]), split(t["rejected"], t["rejected_offsets"]), ids)

    def token_logps(
        self, ids: list[str], response_mask: Tensor, host_lengths: tuple[Sequence[int], Sequence[int]] | None = None
    ) -> Tensor:
        """(2B, T) reference token log-probs for a batch, chosen rows first, aligned to ``response_mask``.

        With ``host_lengths`` (each row's prompt and response token counts, as the collator records
        them) nothing is read back from the device: the cached values are copied in from pinned
        memory and placed at the columns after each prompt.
        """
        missing = [rid for rid in ids if rid not in self.index]
        if missing:
            raise KeyError(f"records not in the reference cache: {missing[:5]} (was the data changed?)")
        rows = [self.chosen[self.index[rid]] for rid in ids] + [self.rejected[self.index[rid]] for rid in ids]
        counts = list(host_lengths[1]) if host_lengths is not None else response_mask.sum(-1).tolist()
        for rid, row, n in zip(ids + ids, rows, counts, strict=True):
            if row.numel() != n:
                raise ValueError(
                    f"reference cache holds {row.numel()} tokens for a response of record {rid!r} that now has {n}: "
                    "the tokenizer or max_length changed; delete the cache to recompute it"
                )
        dev = response_mask.device
        values = torch.cat(rows)
        out = torch.zeros(response_mask.shape, dtype=torch.float32, device=dev)
        if host_lengths is None:
            out[response_mask.bool()] = values.to(dev)
            return out
        # coordinates built on the host, where the lengths are, then copied in with the values
        row_of, k = span_coordinates(torch.tensor(counts, dtype=torch.long), values.numel())
        cols = torch.tensor(list(host_lengths[0]), dtype=torch.long)[row_of] + k
        if dev.type == "cuda":  # an asynchronous copy needs page-locked memory
            values, row_of, cols = values.pin_memory(), row_of.pin_memory(), cols.pin_memory()
        out[row_of.to(dev, non_blocking=True), cols.to(dev, non_blocking=True)] = values.to(dev, non_blocking=True)
        return out


@torch.no_grad()
def compute_reference_cache(
    token_logps: Any, dataset: Any, collator: Any, batch_size: int, device: torch.device, desc: str = ""
) -> ReferenceCache:
    """Run ``token_logps(batch)`` over a dataset in order and collect every response's token log-probs.

    Args:
        token_logps: callable from a ``PreferenceBatch`` to (2B, T) reference token log-probs.
        dataset: a ``PreferenceDataset`` (items decoded on access).
        collator: the datamodule's collator (same tokenisation and limits as training).
        batch_size: pairs per forward.
        device: where the batches go.
        desc: progress-bar label.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    chosen, rejected, ids = [], [], []
    for batch in tqdm(loader, desc=desc or "reference log-probs", unit="batch", leave=False):
        if batch.num_pairs == 0:
            continue
        batch = batch.to(device)
        tokens = token_logps(batch).float().cpu()  # (2B, T)
        mask = batch.response_mask.cpu()
        b = batch.num_pairs
        for i in range(b):
            chosen.append(tokens[i][mask[i]])
            rejected.append(tokens[b + i][mask[b + i]])
        ids.extend(batch.ids)
    return ReferenceCache(chosen, rejected, ids)
