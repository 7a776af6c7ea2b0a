"""Reading and validating preference records (TRL's vision preference format).

A record holds ``prompt``, ``chosen``, ``rejected`` and optionally ``images`` / ``videos`` (paths
relative to a data root), ``rejected_images`` / ``rejected_videos`` and ``id``. Prompts and responses
are plain strings or conversational messages
(``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]``).
Every problem is reported with the file and line (or row) it came from.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from datamodules.core.sources import BadSampleError, default_root, is_file_source, iter_raw_records, source_kind

__all__ = [
    "BadSampleError",
    "PreferenceRecord",
    "default_root",
    "is_file_source",
    "iter_raw_records",
    "load_preference_records",
    "load_records",
    "parse_prompt_and_images",
    "parse_prompt_and_media",
    "parse_record",
    "parse_side_information",
    "resolve_media_path",
    "response_text",
    "source_kind",
    "split_implicit_prompt",
]


@dataclass
class PreferenceRecord:
    """One validated record.

    Attributes:
        id: record id (from the data, else ``<file>:<line>``).
        where: ``<file>:<line>`` (or ``<file>[row]``) for error messages.
        prompt: conversational messages; images appear as ``{"type": "image"}`` items in order.
        chosen: the preferred response text.
        rejected: the dispreferred response text.
        images: absolute image paths (or in-memory images from a ``datasets.Dataset``), in
            placeholder order.
        videos: absolute video paths, in placeholder order.
        rejected_images: images the rejected response is paired with, when they differ from ``images``
            (VDPO-style pairs: same response, different media); None when shared.
        rejected_videos: likewise for videos.
        side: side information from the record, under the batch's field names (see
            :func:`parse_side_information`): ``scores`` ([chosen, rejected]), ``weights``,
            ``dimension_ids``, ``soft_labels``; empty when the record has none.
    """

    id: str
    where: str
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str
    images: list[str]
    videos: list[str] = field(default_factory=list)
    rejected_images: list[str] | None = None
    rejected_videos: list[str] | None = None
    side: dict[str, Any] = field(default_factory=dict)

    @property
    def shared_media(self) -> bool:
        """Whether chosen and rejected see the same media."""
        return self.rejected_images is None and self.rejected_videos is None


def resolve_media_path(rel: Any, data_root: Path, where: str) -> Any:
    """Resolve a media path against the data root, refusing paths that escape it.

    In-memory images, as HF ``datasets`` holds them in TRL-format datasets (a PIL image, or a
    ``{"bytes": ..., "path": ...}`` dict when not decoded), are returned as they are.
    """
    if _in_memory_image(rel):
        return rel
    if not isinstance(rel, str) or not rel:
        raise BadSampleError(f"{where}: media paths must be non-empty strings, got {rel!r}")
    root = data_root.resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise BadSampleError(f"{where}: media path {rel!r} points outside the data root {root}")
    if not full.is_file():
        raise BadSampleError(f"{where}: media file not found: {full}")
    return str(full)


def _in_memory_image(value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(value.get("bytes"), bytes | bytearray)
    return hasattr(value, "convert") and hasattr(value, "size") and hasattr(value, "mode")  # a PIL image


def response_text(value: Any, field: str, where: str) -> str:
    """A response as plain text: a string, or the text parts of conversational messages joined.

    Raises:
        BadSampleError: not a string or a list of messages, or empty; the message names ``field`` and ``where``.
    """
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


_KINDS = ("image", "video")


def _prompt_messages(value: Any, placeholders: dict[str, str], where: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        if not value.strip():
            raise BadSampleError(f"{where}: 'prompt' is empty")
        # "<image>" / "<video>" written in plain text become media items at those positions.
        pattern = "(" + "|".join(re.escape(t) for t in placeholders.values()) + ")"
        kind_of = {t: k for k, t in placeholders.items()}
        content: list[dict[str, Any]] = []
        for piece in re.split(pattern, value):
            if piece in kind_of:
                content.append({"type": kind_of[piece]})
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        return [{"role": "user", "content": content}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    raise BadSampleError(f"{where}: 'prompt' must be a string or a list of messages with 'role'")


def _count_media(messages: list[dict[str, Any]], kind: str) -> int:
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            n += sum(1 for c in content if isinstance(c, dict) and c.get("type") == kind)
    return n


def _path_list(raw: dict[str, Any], field: str, where: str) -> list[str] | None:
    value = raw.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise BadSampleError(f"{where}: {field!r} must be a list of paths")
    return value


def parse_prompt_and_media(
    raw: dict[str, Any], where: str, data_root: Path, image_token: str = "<image>", video_token: str = "<video>"
) -> tuple[list[dict[str, Any]], dict[str, list[str] | None]]:
    """Prompt messages and resolved media paths of a raw record.

    Plain-text prompts become one user turn whose ``<image>`` / ``<video>`` placeholders turn into media
    items; a prompt without any placeholder gets its images, then its videos, first in its first user
    turn (TRL's convention); otherwise each kind's placeholder count must equal its number of files.
    ``rejected_images`` / ``rejected_videos`` (VDPO-style pairs whose rejected side sees other media)
    must match the prompt's placeholders as the chosen side's media do. The raw record is not modified.

    Returns:
        The prompt and ``{"images", "videos", "rejected_images", "rejected_videos"}`` (the rejected
        entries None when the record has none).

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    files = {f: _path_list(raw, f, where) for f in ("images", "videos", "rejected_images", "rejected_videos")}
    images, videos = files["images"] or [], files["videos"] or []
    prompt = _prompt_messages(raw["prompt"], {"image": image_token, "video": video_token}, where)
    slots = {k: _count_media(prompt, k) for k in _KINDS}
    if not any(slots.values()) and (images or videos):
        # No placeholder given: media go first in the first user turn, as TRL's format does.
        # The turn is copied, so the caller's raw record is left as it was.
        k = next((i for i, m in enumerate(prompt) if m.get("role") == "user"), None)
        if k is None:
            raise BadSampleError(f"{where}: the prompt has no user turn to attach media to")
        content = prompt[k]["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        items = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
        prompt = list(prompt)
        prompt[k] = {**prompt[k], "content": items + list(content)}
        slots = {"image": len(images), "video": len(videos)}
    for name, kind in (
        ("images", "image"),
        ("videos", "video"),
        ("rejected_images", "image"),
        ("rejected_videos", "video"),
    ):
        given = files[name]
        if given is None and name.startswith("rejected"):
            continue
        if len(given or []) != slots[kind]:
            raise BadSampleError(
                f"{where}: the prompt has {slots[kind]} {kind} placeholder(s) but {len(given or [])} {name}"
            )
    resolved = {
        f: None if v is None else [resolve_media_path(p, data_root, where) for p in v] for f, v in files.items()
    }
    resolved["images"] = resolved["images"] or []
    resolved["videos"] = resolved["videos"] or []
    return prompt, resolved


def parse_prompt_and_images(
    raw: dict[str, Any], where: str, data_root: Path, image_token: str = "<image>"
) -> tuple[list[dict[str, Any]], list[str]]:
    """:func:`parse_prompt_and_media` for records with images only; returns the prompt and image paths."""
    prompt, media = parse_prompt_and_media(raw, where, data_root, image_token)
    if media["videos"]:
        raise BadSampleError(f"{where}: videos are not supported for this kind of record")
    return prompt, media["images"]


def split_implicit_prompt(chosen: Any, rejected: Any, where: str) -> dict[str, Any]:
    """TRL's implicit prompt: a record without ``prompt`` whose ``chosen`` and ``rejected`` hold the
    whole conversation; the part they share from the start is the prompt.

    Conversations (lists of messages) split at the first message that differs; plain strings at the
    first differing character, moved back before a space that precedes it (as TRL's
    ``extract_prompt`` does).

    Returns:
        ``{"prompt", "chosen", "rejected"}``.

    Raises:
        BadSampleError: no shared start (no prompt), or one side is the other's start (an empty response).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
    elif isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1
    else:
        raise BadSampleError(f"{where}: missing field(s) prompt")
    if n == 0:
        raise BadSampleError(
            f"{where}: no 'prompt', and 'chosen' and 'rejected' share no start that could be the prompt "
            "(TRL's implicit-prompt form needs the whole conversation in both)"
        )
    if n >= len(chosen) or n >= len(rejected):
        side = "chosen" if n >= len(chosen) else "rejected"
        raise BadSampleError(f"{where}: no 'prompt', and {side!r} is the start of the other: its response is empty")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def parse_side_information(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A pair record's side information, checked, under the batch's field names.

    Record fields: ``scores`` (two finite numbers, the chosen then the rejected response's score from
    a reward model or another objective; MADPO, MODPO), ``weight`` (a finite number ≥ 0), ``dimension_id``
    (an integer ≥ 0, the preference dimension the pair was labelled on), ``soft_label`` (a number in
    [0, 1], the probability that the chosen response is preferred; soft-label DPO), ``orientations``
    (one of 1, −1 or 0 per preference dimension: the chosen response is preferred on it, the rejected
    one is, or neither; ``CombinedLoss(orient_by=...)``). Absent or null fields are left out.

    Raises:
        BadSampleError: a field of the wrong kind or out of range, naming ``where`` and the field.
    """
    out: dict[str, Any] = {}
    scores = raw.get("scores")
    if scores is not None:
        if not (isinstance(scores, list) and len(scores) == 2 and all(_finite(x) for x in scores)):
            raise BadSampleError(f"{where}: 'scores' must be two finite numbers (chosen, rejected), got {scores!r}")
        out["scores"] = [float(x) for x in scores]
    weight = raw.get("weight")
    if weight is not None:
        if not (_finite(weight) and weight >= 0):
            raise BadSampleError(f"{where}: 'weight' must be a finite number >= 0, got {weight!r}")
        out["weights"] = float(weight)
    dimension = raw.get("dimension_id")
    if dimension is not None:
        if not (isinstance(dimension, int) and not isinstance(dimension, bool) and dimension >= 0):
            raise BadSampleError(f"{where}: 'dimension_id' must be an integer >= 0, got {dimension!r}")
        out["dimension_ids"] = dimension
    label = raw.get("soft_label")
    if label is not None:
        if not (_finite(label) and 0 <= label <= 1):
            raise BadSampleError(f"{where}: 'soft_label' must be a number in [0, 1], got {label!r}")
        out["soft_labels"] = float(label)
    orientations = raw.get("orientations")
    if orientations is not None:
        ok = isinstance(orientations, list) and orientations
        if not (ok and all(isinstance(x, int) and not isinstance(x, bool) and x in (-1, 0, 1) for x in orientations)):
            raise BadSampleError(
                f"{where}: 'orientations' must be a non-empty list of 1, -1 or 0 (per preference dimension: "
                f"chosen preferred, rejected preferred, neither), got {orientations!r}"
            )
        out["orientations"] = [float(x) for x in orientations]
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def parse_record(
    raw: dict[str, Any], where: str, data_root: Path, image_token: str = "<image>", response_only: bool = False
) -> PreferenceRecord:
    """Validate one raw record and resolve its media paths.

    Args:
        response_only: the record holds one response, ``response`` (or ``chosen``), and no rejected
            one: the negatives are built from its media (online video negatives). ``rejected`` is
            then set to the response and not read.

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    if response_only:
        response = raw.get("response", raw.get("chosen"))
        if response is None:
            raise BadSampleError(f"{where}: missing field 'response' (or 'chosen')")
        if raw.get("prompt") is None:
            raise BadSampleError(f"{where}: missing field 'prompt'")
        raw = {**raw, "chosen": response, "rejected": response}
    missing = [k for k in ("chosen", "rejected") if k not in raw or raw[k] is None]
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
    if raw.get("prompt") is None:
        raw = {**raw, **split_implicit_prompt(raw["chosen"], raw["rejected"], where)}
    prompt, media = parse_prompt_and_media(raw, where, data_root, image_token)
    return PreferenceRecord(
        id=str(raw.get("id", where)),
        where=where,
        prompt=prompt,
        chosen=response_text(raw["chosen"], "chosen", where),
        rejected=response_text(raw["rejected"], "rejected", where),
        **media,
        side=parse_side_information(raw, where),
    )


def load_preference_records(
    path: Any,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    image_token: str = "<image>",
    response_only: bool = False,
) -> tuple[list[PreferenceRecord], list[str]]:
    """Read and validate every record of a file.

    Args:
        path: a .jsonl, .json or .parquet file, or an in-memory ``datasets.Dataset`` / list of dicts.
        data_root: directory media paths are relative to (default: the file's directory, or the
            working directory for in-memory data).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        image_token: the placeholder that marks an image in plain-text prompts.
        response_only: records with one response and no rejected one (see :func:`parse_record`).

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    root = default_root(path, data_root)

    def parse(raw: dict[str, Any], where: str) -> tuple[list[PreferenceRecord], list[str]]:
        return [parse_record(raw, where, root, image_token, response_only)], []

    return load_records(path, parse, on_bad_sample)


R = TypeVar("R")


def load_records(
    path: Any,
    parse: Callable[[dict[str, Any], str], tuple[list[R], list[str]]],
    on_bad_sample: str = "error",
) -> tuple[list[R], list[str]]:
    """Every record of a data source through ``parse``, with bad ones raised or skipped and reported.

    The one loop behind the record loaders of every data family (pairs, ranked lists, unpaired feedback).

    Args:
        path: what :func:`iter_raw_records` reads.
        parse: one raw record and its ``<file>:<line>`` to the records it gives (usually one) and notes on
            what it left out; a ``BadSampleError`` it raises makes the record bad.
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.

    Returns:
        The records and the problems (one message per skipped record, then the notes, in file order).
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    records, problems = [], []
    for where, raw in iter_raw_records(path):
        try:
            if isinstance(raw, Exception):
                raise raw
            parsed, notes = parse(raw, where)
            records.extend(parsed)
            problems.extend(notes)
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            problems.append(str(e))
    return records, problems
