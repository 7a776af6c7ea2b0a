"""Small data files that tests write from the shapes world."""

from __future__ import annotations

import json
from pathlib import Path


def write_ranked(world: Path, path: Path, n: int = 6) -> Path:
    """``n`` ranked records (4 scored responses each) from the world's first training pairs.

    Response 0 (the world's chosen answer) is always best and 1 (its rejected one) always worst, so
    with ``best_vs_rest`` and 3 curriculum stages stage i holds the i-th easiest pair of every record.
    """
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:n]]
    out = []
    for i, r in enumerate(rows):
        responses = [r["chosen"], r["rejected"], "diamond diamond .", "square square square ."]
        scores = [4.0, 1.0, 2.0 + (i % 2), 3.0 - (i % 2)]  # best response 0, worst 1
        out.append(
            {"id": f"r{i}", "images": r["images"], "prompt": r["prompt"], "responses": responses, "scores": scores}
        )
    path.write_text("\n".join(json.dumps(r) for r in out) + "\n")
    return path


def write_mixed(world: Path, path: Path) -> Path:
    """Four of the world's pairs whose prompts differ: one image, two images, one image, no image."""
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:4]]
    rows[1]["images"] = rows[1]["images"] + rows[2]["images"]
    rows[1]["prompt"] = "<image> <image> " + rows[1]["prompt"]
    rows[3]["images"] = []
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
