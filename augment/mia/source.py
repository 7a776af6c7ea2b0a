"""The single-image source of a MIA-DPO build: one usable record per image, question and ground-truth answer.

Records come from any file ``datamodules.core.records`` reads (JSONL, JSON, Parquet); a question or an
answer may be a string or chat messages. An unusable record (not exactly one image, a missing or empty
field, a missing image) raises an error naming file and line, or is counted and skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = ["SourceRecord", "read_source"]


@dataclass(frozen=True)
class SourceRecord:
    """One usable source record: id, where it came from, the image path, question and answer."""

    id: str
    where: str
    image: str
    question: str
    answer: str


def _text(value: Any, field: str, where: str) -> str:
    """A field's text: a string, or the text items of chat messages (the first user turn for a prompt)."""
    from datamodules.core.records import BadSampleError

    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = [m for m in value if isinstance(m, dict)]
        user = [m for m in turns if m.get("role") == "user"] or turns
        content = user[0].get("content") if user else None
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
    raise BadSampleError(f"{where}: {field!r} must be a string or chat messages, got {type(value).__name__}")


def read_source(settings: Any) -> tuple[list[SourceRecord], Counter[str], list[str]]:
    """Usable single-image records, skip counts by reason and skip messages (``on_bad_record="skip"``).

    Raises:
        BadSampleError: naming file and line, on the first unusable record when ``on_bad_record="error"``.
    """
    from datamodules.core.records import BadSampleError, default_root, iter_raw_records, resolve_media_path

    root = default_root(settings.path, settings.data_root)
    records: list[SourceRecord] = []
    skipped: Counter[str] = Counter()
    messages: list[str] = []
    for index, (where, raw) in enumerate(iter_raw_records(settings.path)):
        if settings.limit is not None and index >= settings.limit:
            break
        try:
            if isinstance(raw, Exception):
                raise raw
            images = raw.get("images", raw.get("image"))
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or len(images) != 1:
                n = len(images) if isinstance(images, list) else 0
                raise BadSampleError(f"{where}: needs exactly one image, has {n}")
            missing = [f for f in (settings.question_field, settings.answer_field) if raw.get(f) is None]
            if missing:
                raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
            question = _text(raw[settings.question_field], settings.question_field, where).strip()
            answer = _text(raw[settings.answer_field], settings.answer_field, where).strip()
            if not question.replace("<image>", "").strip() or not answer:
                raise BadSampleError(f"{where}: empty question or answer")
            path = resolve_media_path(images[0], root, where)
            records.append(SourceRecord(str(raw.get("id", where)), where, str(path), question, answer))
        except BadSampleError as e:
            if settings.on_bad_record == "error":
                raise
            skipped["bad_record"] += 1
            messages.append(str(e))
    return records, skipped, messages
