"""Shapes-world scenes written as benchmark files in POPE, COCO-instances and MMHal-Bench formats.

For trying ``mmpo eval-hallucination`` (``mmpo.hallucination_benchmarks``) end to end with nothing
downloaded: new scenes of the shapes world (their own seed namespace) are saved as PNGs and described in
the real benchmarks' file formats, the 24 colour–shape pairs playing COCO's categories:

- ``shapes_pope_random.json`` and ``shapes_pope_adversarial.json``: POPE question files (one JSON object
  a line: ``question_id``, ``image``, ``text``, ``label``), per scene one present object ("yes") and one
  absent ("no"): drawn from every absent pair (random) or from those sharing a shape with an object of the
  scene (adversarial);
- ``instances.json``: COCO instances (``images``, ``annotations``, ``categories``);
- ``mmhal.json``: an MMHal-Bench-style list of colour questions about a shape the scene holds once, whose
  ``image_src`` is a URL (mmpo looks it up by file name in the image folder), and ``judge.py``, a stand-in
  judge (6 when the answer names the reference colour and no other, else 0).

    python -m datamodules.worlds.shapes_benchmarks --out bench --n 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from datamodules.core.atomic import atomic_write_text
from datamodules.worlds.shapes import COLORS, SHAPES, render_scene, sample_scene

__all__ = ["JUDGE_SOURCE", "write_shapes_benchmarks"]

JUDGE_SOURCE = '''from datamodules.worlds.shapes import COLORS


def judge(record, answer):
    """6 when the answer names the reference colour and no other, else 0 (a stand-in for an LLM judge)."""
    named = {w for w in answer.lower().replace(".", " ").split() if w in COLORS}
    return 6.0 if named == {record["gt_answer"]} else 0.0
'''


def write_shapes_benchmarks(out: str | os.PathLike, n: int = 100, seed: int = 0) -> dict[str, int]:
    """Write ``n`` scenes and the benchmark files over them into ``out``; returns what was written."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"mmpo-shapes-benchmarks-{seed}")  # not a training seed's stream
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    categories = [{"id": i + 1, "name": f"{c} {s}"} for i, (c, s) in enumerate(pairs)]
    category = {cat["name"]: cat["id"] for cat in categories}
    images, annotations, mmhal = [], [], []
    pope: dict[str, list[dict]] = {"random": [], "adversarial": []}
    for i in range(n):
        scene = sample_scene(rng)
        name = f"scene-{i:04d}.png"
        render_scene(scene).save(out / "images" / name)
        truth = sorted({(o.color, o.shape) for o in scene})
        images.append({"id": i, "file_name": name})
        for c, s in truth:
            annotations.append({"id": len(annotations), "image_id": i, "category_id": category[f"{c} {s}"]})
        absent = sorted(set(pairs) - set(truth))
        near = [p for p in absent if any(p[1] == s for _, s in truth)] or absent  # same shape, other colour
        present = rng.choice(truth)
        for split, missing in (("random", rng.choice(absent)), ("adversarial", rng.choice(near))):
            for (c, s), label in ((present, "yes"), (missing, "no")):
                question = {
                    "question_id": len(pope[split]),
                    "image": name,
                    "text": f"is there a {c} {s} in the image ?",
                }
                pope[split].append({**question, "label": label})
        unique = [o for o in scene if sum(p.shape == o.shape for p in scene) == 1]
        if unique:
            o = rng.choice(unique)
            mmhal.append(
                {
                    "question_type": "attribute",
                    "question": f"what color is the {o.shape} ?",
                    "gt_answer": o.color,
                    "image_src": f"https://example.org/shapes/{name}",
                    "image_content": [f"{c} {s}" for c, s in truth],
                }
            )
    for split, rows in pope.items():
        atomic_write_text(out / f"shapes_pope_{split}.json", "".join(json.dumps(r) + "\n" for r in rows))
    coco = {"images": images, "annotations": annotations, "categories": categories}
    atomic_write_text(out / "instances.json", json.dumps(coco))
    atomic_write_text(out / "mmhal.json", json.dumps(mmhal, indent=1))
    atomic_write_text(out / "judge.py", JUDGE_SOURCE)
    return {"images": len(images), "pope_questions_per_split": len(pope["random"]), "mmhal_questions": len(mmhal)}


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.worlds.shapes_benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder for images/ and the benchmark files")
    parser.add_argument("--n", type=int, default=100, help="scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_shapes_benchmarks(args.out, args.n, args.seed)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
