"""Reference log-probs computed once per dataset and stored on disk.

With ``reference: cached`` the module computes the reference's response-token log-probs for every
record before the first optimizer step (with the adapter disabled for LoRA; for full fine-tuning the
untrained policy *is* the reference), saves them, and trains with no reference forward and no
reference model in memory. A cache file is named by a fingerprint of the model and one of the data
(every field of every record, the bytes of every image and video it names, per-response media
included, and the datamodule's settings that change a log-prob), so changing either computes a new
one; a stale or foreign file is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from datamodules.core.atomic import atomic_file
from mmpo.logprobs import span_coordinates

__all__ = [
    "ReferenceCache",
    "compute_reference_cache",
    "compute_response_cache",
    "data_fingerprint",
    "model_fingerprint",
]

# 2: K responses per record (was: chosen and rejected); fingerprints cover every record field.
CACHE_VERSION = 2


def _file_digest(path: str | os.PathLike, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def model_fingerprint(name_or_path: str, revision: str | None = None, settings: dict[str, Any] | None = None) -> str:
    """Identity of the reference model: a local directory's config and weight files, or hub id + revision.

    ``settings`` (the backbone's, e.g. dtype) are hashed too: anything that changes a log-prob.
    """
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    h.update(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    _model_digest(name_or_path, revision, h)
    return h.hexdigest()[:16]


def _model_digest(name_or_path: str, revision: str | None, h: Any, depth: int = 0) -> None:
    path = Path(name_or_path)
    if not path.is_dir():
        h.update(f"{name_or_path}@{revision or 'main'}".encode())
        return
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(f.name.encode())
            _file_digest(f, h)
    adapter = path / "adapter_config.json"
    if adapter.is_file() and depth < 4:
        # a PEFT adapter directory loads its base model too (transformers reads the base it names): the
        # base's weights change the log-probs, the reference's in particular (the base, adapters off)
        config = json.loads(adapter.read_text(encoding="utf-8"))
        base = config.get("base_model_name_or_path")
        if base:
            _model_digest(str(base), config.get("revision"), h, depth + 1)


def _media_digest(item: Any, h: Any) -> None:
    if isinstance(item, str | os.PathLike):
        _file_digest(item, h)
    elif isinstance(item, dict):  # an undecoded image of a datasets.Dataset
        h.update(bytes(item["bytes"]))
    elif hasattr(item, "tobytes"):  # a PIL image
        h.update(f"{item.mode}{item.size}".encode())
        h.update(item.tobytes())
    elif isinstance(item, list | tuple):
        for x in item:
            _media_digest(x, h)


def _is_media_field(name: str) -> bool:
    # a diffusion record's conditioning tensor (``condition``, a .npy file) is hashed by its bytes too
    return name.endswith(("images", "videos", "media", "condition"))


def data_fingerprint(records: Iterable[Any], settings: dict[str, Any]) -> str:
    """Identity of a record list as the collator sees it.

    Every field of every record (a dataclass) but ``where`` and ``side`` is hashed; fields whose name
    ends in ``images``, ``videos``, ``media`` or ``condition`` (``rejected_images``, per-response media, ...) are
    hashed by the bytes of the files they name, so replacing an image under the same name changes the fingerprint.
    ``settings`` holds what else changes a log-prob (processor, max_length, frame sampling, ...).
    """
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for rec in records:
        values = {f.name: getattr(rec, f.name) for f in dataclasses.fields(rec)}
        # ``where`` (file and line) only locates the record for messages, and a pair's ``side`` information
        # (scores, weights, labels) only reaches the loss: changing either keeps the cache
        text = {k: v for k, v in values.items() if not _is_media_field(k) and k not in ("where", "side")}
        h.update(json.dumps(text, sort_keys=True, default=str).encode())
        for name in sorted(k for k in values if _is_media_field(k)):
            h.update(name.encode())
            if values[name] is not None:
                _media_digest(values[name], h)
    return h.hexdigest()[:16]


class ReferenceCache:
    """Token log-probs of the K responses of every record, by record id (or, for a backbone with one statistic
    per response, that statistic as a one-element tensor).

    Args:
        responses: per record, the K (T_k,) token log-prob tensors of its responses, in group order.
        ids: the record ids, one per entry of ``responses``.
    """

    def __init__(self, responses: list[list[Tensor]], ids: list[str]) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError("cached reference log-probs need unique record ids")
        if len(responses) != len(ids):
            raise ValueError(f"{len(responses)} cached groups for {len(ids)} ids")
        self.index = {rid: i for i, rid in enumerate(ids)}
        self.responses, self.ids = responses, ids

    def __contains__(self, rid: str) -> bool:
        return rid in self.index

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically and durably (temp file, fsync, rename, fsync of the folder)."""
        from safetensors.torch import save_file

        parts = [t for group in self.responses for t in group]
        values = torch.cat(parts).float().contiguous() if parts else torch.zeros(0)
        offsets = torch.tensor([0] + [p.numel() for p in parts]).cumsum(0)
        sizes = torch.tensor([len(group) for group in self.responses], dtype=torch.long)
        tensors = {"values": values, "offsets": offsets, "group_sizes": sizes}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"ids": json.dumps(self.ids), "version": str(CACHE_VERSION)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            if meta.get("version") != str(CACHE_VERSION):
                raise ValueError(f"{path}: reference cache version {meta.get('version')}, expected {CACHE_VERSION}")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        bounds = t["offsets"].tolist()
        parts = [t["values"][a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        groups, start = [], 0
        for k in t["group_sizes"].tolist():
            groups.append(parts[start : start + k])
            start += k
        return cls(groups, json.loads(meta["ids"]))

    def response_logps(self, ids: list[str], k: int) -> Tensor:
        """(B, K) cached per-response statistics of the records ``ids`` (one value per response)."""
        missing = [rid for rid in ids if rid not in self.index]
        if missing:
            raise KeyError(f"records not in the reference cache: {missing[:5]} (was the data changed?)")
        groups = [self.responses[self.index[rid]] for rid in ids]
        for rid, group in zip(ids, groups, strict=True):
            if len(group) != k or any(t.numel() != 1 for t in group):
                sizes = [t.numel() for t in group]
                raise ValueError(f"reference cache holds {sizes} values for record {rid!r}, not one for each of {k}")
        return torch.stack([torch.cat(group) for group in groups]) if groups else torch.zeros(0, k)

    def token_logps(
        self, ids: list[str], response_mask: Tensor, host_lengths: tuple[Sequence[int], Sequence[int]] | None = None
    ) -> Tensor:
        """(N, T) reference token log-probs for a batch in its row layout, aligned to ``response_mask``.

        Rows are response-major (response k of group b in row k·B + b), as in ``PreferenceBatch``.
        With ``host_lengths`` (each row's prompt and response token counts, as the collator records
        them) nothing is read back from the device: the cached values are copied in from pinned
        memory and placed at the columns after each prompt.
        """
        missing = [rid for rid in ids if rid not in self.index]
        if missing:
            raise KeyError(f"records not in the reference cache: {missing[:5]} (was the data changed?)")
        k = response_mask.shape[0] // max(len(ids), 1)
        groups = [self.responses[self.index[rid]] for rid in ids]
        for rid, group in zip(ids, groups, strict=True):
            if len(group) != k:
                raise ValueError(f"reference cache holds {len(group)} responses of record {rid!r}, the batch {k}")
        rows = [group[j] for j in range(k) for group in groups]
        counts = list(host_lengths[1]) if host_lengths is not None else response_mask.sum(-1).tolist()
        for rid, row, n in zip(ids * k, rows, counts, strict=True):
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
        token_logps: callable from a ``PreferenceBatch`` to (N, T) reference token log-probs in the
            batch's row layout.
        dataset: a ``PreferenceDataset`` (items decoded on access).
        collator: the datamodule's collator (same tokenisation and limits as training).
        batch_size: groups per forward.
        device: where the batches go.
        desc: progress-bar label.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    groups, ids = [], []
    for batch in tqdm(loader, desc=desc or "reference log-probs", unit="batch", leave=False):
        if batch.num_groups == 0:
            continue
        batch = batch.to(device)
        tokens = token_logps(batch).float().cpu()  # (N, T)
        mask = batch.response_mask.cpu()
        b, k = batch.num_groups, batch.group_size
        groups.extend([tokens[j * b + i][mask[j * b + i]] for j in range(k)] for i in range(b))
        ids.extend(batch.ids)
    return ReferenceCache(groups, ids)


@torch.no_grad()
def compute_response_cache(
    logps: Any, dataset: Any, collator: Any, batch_size: int, device: torch.device, desc: str = ""
) -> ReferenceCache:
    """Run ``logps(batch)`` (B, K) over a dataset in order and keep each response's statistic (one value per
    response: a diffusion model's −(denoising error)). Arguments as :func:`compute_reference_cache`."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    groups, ids = [], []
    for batch in tqdm(loader, desc=desc or "reference statistics", unit="batch", leave=False):
        if batch.num_groups == 0:
            continue
        values = logps(batch.to(device)).float().cpu()  # (B, K)
        groups.extend([list(row.split(1)) for row in values])
        ids.extend(batch.ids)
    return ReferenceCache(groups, ids)
