"""Writing a synthetic world (media files + JSONL splits + world.json) idempotently and atomically.

Shared by the shapes world and the video world: each supplies how to make a record and how to write
its media file; this module handles reuse of an existing world, temporary names and renames, removal
of stale media of an earlier, larger world, and ``world.json`` written last, so an interrupted run
never looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datamodules.core.atomic import atomic_write_text

__all__ = ["world_cli", "write_world"]

SPLITS = ("train", "val")


def _summary(root: Path, world: Mapping, generated: bool) -> dict:
    return {
        "root": str(root),
        "train": str(root / "train.jsonl"),
        "val": str(root / "val.jsonl"),
        "n_train": world["settings"]["n_train"],
        "n_val": world["settings"]["n_val"],
        "kinds": world["kinds"],
        "vocab_size": len(world["vocabulary"]),
        "generated": generated,
    }


def write_world(
    root: str | os.PathLike,
    settings: dict[str, Any],
    *,
    name: str,
    media_dir: str,
    suffix: str,
    make_record: Callable[[str, int], dict],
    write_media: Callable[[dict, Path], None],
    kinds: tuple[str, ...],
    info: dict[str, Any],
    overwrite: bool,
) -> dict:
    """Write ``root/<media_dir>/<split>-NNNNNN<suffix>``, ``train.jsonl``, ``val.jsonl`` and ``world.json``.

    Args:
        root: dataset directory (created if missing).
        settings: the generation settings (with ``n_train`` and ``n_val``); equal settings reuse the world.
        name: the world's name in messages ("shapes world").
        media_dir: folder of the media files under ``root``.
        suffix: media file suffix (".png").
        make_record: ``(split, index) -> record`` whose first media path names the file to write.
        write_media: ``(record, path)`` writes the record's media file, atomically.
        kinds: the record kinds counted in the summary.
        info: extra entries of ``world.json`` (vocabulary, constants).
        overwrite: replace a world generated with other settings instead of raising.

    Raises:
        FileExistsError: ``root`` holds a world with other settings and ``overwrite`` is False.
    """
    root = Path(root)
    world_path = root / "world.json"
    if world_path.is_file():
        existing = json.loads(world_path.read_text(encoding="utf-8"))
        names = [f"{s}-{i:06d}{suffix}" for s in SPLITS for i in range(settings[f"n_{s}"])]
        complete = all((root / f"{s}.jsonl").is_file() for s in SPLITS) and all(
            (root / media_dir / n).is_file() for n in names
        )
        if existing.get("settings") == settings and complete:
            return _summary(root, existing, generated=False)
        if existing.get("settings") != settings and not overwrite:
            raise FileExistsError(
                f"{root} holds a {name} with settings {existing.get('settings')}, not {settings}; "
                "pass overwrite=True to replace it"
            )
        world_path.unlink()

    media = root / media_dir
    media.mkdir(parents=True, exist_ok=True)
    counted: dict[str, dict[str, int]] = {}
    keep: set[str] = set()
    for split in SPLITS:
        lines, counts = [], Counter()
        for index in range(settings[f"n_{split}"]):
            record = make_record(split, index)
            counts[record["kind"]] += 1
            path = root / record[media_dir][0]
            write_media(record, path)
            keep.add(path.name)
            lines.append(json.dumps(record) + "\n")
        atomic_write_text(root / f"{split}.jsonl", "".join(lines))
        counted[split] = {k: counts[k] for k in kinds}
    pattern = r"(train|val)-\d{6}" + re.escape(suffix)
    for stale in media.iterdir():  # media of an earlier, larger world
        if re.fullmatch(pattern, stale.name) and stale.name not in keep:
            stale.unlink()

    world = {"settings": settings, "kinds": counted, **info}
    atomic_write_text(world_path, json.dumps(world, indent=2) + "\n")
    return _summary(root, world, generated=True)


def world_cli(
    argv: Sequence[str] | None, prog: str, description: str, write: Callable[..., dict], sizes: dict[str, int]
) -> dict:
    """Command line of a world writer: ``--out DIR`` plus counts, seed, ``sizes`` and ``--overwrite``.

    The option names are the keyword names of ``write`` (``--n-train`` → ``n_train``). Prints the summary
    as JSON and returns it.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", required=True, help="dataset directory")
    for name, default in {"n-train": 400, "n-val": 100, "seed": 0, **sizes, "max-objects": 3}.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--overwrite", action="store_true", help="replace a world with other settings")
    args = parser.parse_args(argv)
    summary = write(args.out, **{k: v for k, v in vars(args).items() if k != "out"})
    print(json.dumps(summary, indent=2))
    return summary
