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


def write_unpaired(world: Path, path: Path, n_pairs: int = 4) -> list[dict]:
    """Unpaired records from the world's first pairs: each chosen answer desirable, each rejected one not.

    Records alternate desirable / undesirable and follow the world's order (2·n_pairs records).
    """
    pairs = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:n_pairs]]
    rows = []
    for p in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append(
                {"id": f"{p['id']}-{side}", "prompt": p["prompt"], "images": p["images"], "completion": p[side],
                 "label": label}
            )  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def write_rewards(world: Path, path: Path, n: int = 4) -> Path:
    """``n`` records with reward vectors (helpfulness, verbosity) of three responses, for directional scoring.

    Response 0 (the world's chosen answer) is helpful and long, 1 (its rejected one) neither, 2 less helpful
    and short: along helpfulness 0 is best and 1 worst; along "less verbose" 2 is best and 0 worst.
    """
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:n]]
    out = [
        {"id": f"d{i}", "images": r["images"], "prompt": r["prompt"],
         "responses": [r["chosen"], r["rejected"], "square square square ."],
         "rewards": [[1.0, 0.5], [0.0, 0.0], [0.6, -0.5]]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path
