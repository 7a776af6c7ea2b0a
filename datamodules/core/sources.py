"""Where raw preference records come from: JSONL / JSON / Parquet files, datasets saved with
``save_to_disk``, hub datasets and in-memory rows, each row named (``file:line``, ``file[i]``) for
error messages. Validation of what the rows hold is :mod:`datamodules.core.records`."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["BadSampleError", "default_root", "is_file_source", "iter_raw_records", "source_kind"]


class BadSampleError(ValueError):
    """A record or its media cannot be used. The message names the file and record."""


def is_file_source(source: Any) -> bool:
    """Whether a data source is named by a string or path (a file, a saved dataset directory or a hub
    dataset id), else in-memory data (a ``datasets.Dataset`` or a list of dicts)."""
    return isinstance(source, str | os.PathLike)


_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


def source_kind(source: Any) -> str:
    """``memory``, ``file`` (.jsonl / .json / .parquet), ``saved`` (a directory written by
    ``datasets``' ``save_to_disk``, optionally ``DIR:SPLIT``) or ``hub`` (a hub dataset id
    ``owner/name``, optionally ``owner/name:SPLIT``)."""
    if not is_file_source(source):
        return "memory"
    text = os.fspath(source)
    base, _, split = text.rpartition(":") if ":" in text and not Path(text).exists() else (text, "", "")
    if Path(base).is_dir():
        return "saved"
    if Path(text).suffix in _FILE_SUFFIXES or Path(text).exists():
        return "file"
    if _HUB_ID.match(text):
        return "hub"
    return "file"  # reported as a missing file


def _named_dataset(source: str, kind: str) -> tuple[Any, str]:
    """The rows of a saved dataset directory or a hub dataset, and the name its rows are reported with."""
    import datasets

    text, split = source, None
    if ":" in source and not Path(source).exists():
        text, split = source.rsplit(":", 1)
    if kind == "saved":
        try:
            loaded = datasets.load_from_disk(text)
        except Exception as e:  # noqa: BLE001 - whatever datasets raises, name the directory
            raise ValueError(f"{text}: not a dataset saved with save_to_disk ({type(e).__name__}: {e})") from e
    else:
        try:
            loaded = datasets.load_dataset(text, split=split) if split else datasets.load_dataset(text)
        except Exception as e:  # noqa: BLE001 - no network, unknown id, ...: name the id
            raise ValueError(f"hub dataset {text!r} could not be loaded ({type(e).__name__}: {e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{text}: holds the splits {sorted(loaded)}; name one as {text}:SPLIT")
        loaded = loaded[split]
    return loaded, f"{text}:{split}" if split else text


def iter_raw_records(path: Any) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """Yield ``(where, raw_record)`` from a file, a saved or hub dataset, or from memory.

    JSONL is read line by line and a JSON array element by element, so that errors name the line or
    element; a malformed line or element yields the exception in place of the record (the caller
    decides to raise or skip). Parquet is read one row group at a time; an unreadable row group
    yields one exception per row it holds. A file that cannot be parsed at all raises
    :class:`BadSampleError` naming it (and the line and column for JSON). A directory written by
    ``datasets``' ``save_to_disk`` and a hub dataset id (``owner/name``, each optionally
    ``:SPLIT``) are read through ``datasets``. In-memory rows are named ``<dataset>[i]``.
    """
    kind = source_kind(path)
    if kind in ("saved", "hub"):
        path, name = _named_dataset(os.fspath(path), kind)
        yield from _memory_rows(path, name)
        return
    if kind == "memory":
        name = getattr(getattr(path, "info", None), "dataset_name", None) or "dataset"
        yield from _memory_rows(path, f"<{name}>")
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            yield from _jsonl_rows(path, f)
        return
    if path.suffix == ".json":
        yield from _json_rows(path)
        return
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    raise ValueError(f"unsupported data file type {path.suffix!r} for {path}: use .jsonl, .json or .parquet")


def _memory_rows(rows: Any, name: str) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    for i, raw in enumerate(rows):
        where = f"{name}[{i}]"
        yield where, dict(raw) if isinstance(raw, Mapping) else BadSampleError(f"{where}: expected a mapping")


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """A JSON array of objects (or ``{"data": [...]}``); JSON Lines written with a .json name too."""
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line under a .json name
            yield from _jsonl_rows(path, text.splitlines())
            return
        raise BadSampleError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        raise BadSampleError(f"{path}: expected a JSON array of records, got {type(content).__name__}")
    for i, raw in enumerate(content):
        where = f"{path}[{i}]"
        if isinstance(raw, dict):
            yield where, raw
        else:
            yield where, BadSampleError(f"{where}: expected a JSON object, got {type(raw).__name__}")


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """One record per non-blank line, named ``path:line``; a bad line yields its exception."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadSampleError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if isinstance(raw, dict):
            yield where, raw
        else:
            yield where, BadSampleError(f"{where}: expected a JSON object, got {type(raw).__name__}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors vary: name the file
        raise BadSampleError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    start = 0
    for group in range(handle.num_row_groups):
        n = handle.metadata.row_group(group).num_rows
        try:
            rows = handle.read_row_group(group).to_pylist()
        except Exception as e:  # noqa: BLE001
            for i in range(start, start + n):
                yield (
                    f"{path}[{i}]",
                    BadSampleError(f"{path}[{i}]: row group {group} (rows {start}-{start + n - 1}) is unreadable: {e}"),
                )
        else:
            for i, raw in enumerate(rows, start=start):
                yield f"{path}[{i}]", raw
        start += n


def default_root(source: Any, data_root: str | os.PathLike | None) -> Path:
    """The directory media paths are relative to: ``data_root``, else the data file's folder (a saved
    dataset's own directory), else the working directory (hub and in-memory datasets)."""
    if data_root is not None:
        return Path(data_root)
    kind = source_kind(source)
    if kind == "file":
        return Path(source).parent
    if kind == "saved":
        text = os.fspath(source)
        return Path(text if Path(text).is_dir() else text.rsplit(":", 1)[0])
    return Path.cwd()
