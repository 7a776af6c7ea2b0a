"""Reading and validating preference records (TRL's vision preference format).

A record holds ``prompt``, ``chosen``, ``rejected`` and optionally ``images`` (paths relative to a
data root) and ``id``. Prompts and responses are plain strings or conversational messages
(``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]``).
Every problem is reported with the file and line (or row) it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BadSampleError",
    "PreferenceRecord",
    "iter_raw_records",
    "load_preference_records",
    "parse_prompt_and_images",
    "parse_record",
    "resolve_media_path",
]


class BadSampleError(ValueError):
    """A record or its media cannot be used. The message names the file and record."""


@dataclass
class PreferenceRecord:
    """One validated record.

    Attributes:
        id: record id (from the data, else ``<file>:<line>``).
        where: ``<file>:<line>`` (or ``<file>[row]``) for error messages.
        prompt: conversational messages; images appear as ``{"type": "image"}`` items in order.
        chosen: the preferred response text.
        rejected: the dispreferred response text.
        images: absolute image paths, in placeholder order.
    """

    id: str
    where: str
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str
    images: list[str]


def iter_raw_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """Yield ``(where, raw_record)`` from a JSONL, JSON or Parquet file.

    JSONL is read line by line so that errors name the line; a malformed line yields the exception
    in place of the record (the caller decides to raise or skip). JSON and Parquet go through
    HF ``datasets``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadSampleError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(raw, dict):
                    yield where, BadSampleError(f"{where}: expected a JSON object, got {type(raw).__name__}")
                    continue
                yield where, raw
        return
    if path.suffix in (".json", ".parquet"):
        import datasets

        kind = "json" if path.suffix == ".json" else "parquet"
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        for i, raw in enumerate(ds):
            yield f"{path}[{i}]", dict(raw)
        return
    raise ValueError(f"unsupported data file type {path.suffix!r} for {path}: use .jsonl, .json or .parquet")


def resolve_media_path(rel: str, data_root: Path, where: str) -> str:
    """Resolve a media path against the data root, refusing paths that escape it."""
    if not isinstance(rel, str) or not rel:
        raise BadSampleError(f"{where}: media paths must be non-empty strings, got {rel!r}")
    root = data_root.resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise BadSampleError(f"{where}: media path {rel!r} points outside the data root {root}")
    if not full.is_file():
        raise BadSampleError(f"{where}: media file not found: {full}")
    return str(full)


def _response_text(value: Any, field: str, where: str) -> str:
    if isinstance(value, list):  # conversational: [{"role": "assistant", "content": ...}]
        parts = []
        for msg in value:
            if not isinstance(msg, dict) or "content" not in msg:
                raise BadSampleError(f"{where}: {field!r} messages must be objects with 'content'")
            content = msg["content"]
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
        value = "".join(parts)
    if not isinstance(value, str):
        raise BadSampleError(f"{where}: {field!r} must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise BadSampleError(f"{where}: {field!r} response is empty")
    return value


def _prompt_messages(value: Any, image_token: str, where: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise BadSampleError(f"{where}: 'prompt' is empty")
        # "<image>" placeholders written in plain text become image items at those positions.
        content: list[dict[str, Any]] = []
        for i, piece in enumerate(value.split(image_token)):
            if i > 0:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        return [{"role": "user", "content": content}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise BadSampleError(f"{where}: 'prompt' must be a string or a list of messages with 'role'")


def _count_images(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for c in content if isinstance(c, dict) and c.get("type") == "image")
    return n


def parse_prompt_and_images(
    raw: dict[str, Any], where: str, data_root: Path, image_token: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """Prompt messages and resolved image paths of a raw record.

    Plain-text prompts become one user turn with ``image_token`` placeholders turned into image items;
    a prompt without placeholders gets its images first in its first user turn (TRL's convention);
    otherwise the number of placeholders must equal the number of images. The raw record is not
    modified.

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    images = raw.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise BadSampleError(f"{where}: 'images' must be a list of paths")
    prompt = _prompt_messages(raw["prompt"], image_token, where)
    n_slots = _count_images(prompt)
    if n_slots == 0 and images:
        # No placeholder given: images go first in the first user turn, as TRL's format does.
        # The turn is copied, so the caller's raw record is left as it was.
        k = next((i for i, m in enumerate(prompt) if m.get("role") == "user"), None)
        if k is None:
            raise BadSampleError(f"{where}: the prompt has no user turn to attach images to")
        content = prompt[k]["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        prompt = list(prompt)
        prompt[k] = {**prompt[k], "content": [{"type": "image"} for _ in images] + list(content)}
    elif n_slots != len(images):
        raise BadSampleError(f"{where}: the prompt has {n_slots} image placeholder(s) but {len(images)} image(s)")
    return prompt, [resolve_media_path(p, data_root, where) for p in images]


def parse_record(raw: dict[str, Any], where: str, data_root: Path, image_token: str = "<image>") -> PreferenceRecord:
    """Validate one raw record and resolve its media paths.

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in raw or raw[k] is None]
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
    prompt, images = parse_prompt_and_images(raw, where, data_root, image_token)
    return PreferenceRecord(
        id=str(raw.get("id", where)),
        where=where,
        prompt=prompt,
        chosen=_response_text(raw["chosen"], "chosen", where),
        rejected=_response_text(raw["rejected"], "rejected", where),
        images=images,
    )


def load_preference_records(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    image_token: str = "<image>",
) -> tuple[list[PreferenceRecord], list[str]]:
    """Read and validate every record of a file.

    Args:
        path: a .jsonl, .json or .parquet file.
        data_root: directory media paths are relative to (default: the file's directory).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        image_token: the placeholder that marks an image in plain-text prompts.

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    root = Path(data_root) if data_root is not None else Path(path).parent
    records, problems = [], []
    for where, raw in iter_raw_records(path):
        try:
            if isinstance(raw, Exception):
                raise raw
            records.append(parse_record(raw, where, root, image_token))
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            problems.append(str(e))
    return records, problems
