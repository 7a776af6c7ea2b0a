"""Tests for the synthetic shapes world: truth of chosen, falsity of rejected, determinism, files."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.worlds.shapes import (
    BACKGROUND,
    COLORS,
    DEFAULT_TASK_WEIGHTS,
    KINDS,
    SHAPES,
    ShapeObject,
    ShapesWorld,
    caption_for,
    main,
    make_record,
    objects_in_text,
    render_scene,
    sample_scene,
    tokenize,
    vocabulary,
    write_shapes_world,
)

N_TRAIN, N_VAL = 500, 100


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_world(root, n_train=N_TRAIN, n_val=N_VAL, seed=3)
    return root


def _records(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_colours_are_distinct_and_scenes_use_every_shape_and_colour_evenly(world_dir: Path):
    rgbs = list(COLORS.values()) + [BACKGROUND]
    # Clearly distinguishable: every pair of colours (and the background) differs by > 100 in L1.
    for i, a in enumerate(rgbs):
        for b in rgbs[i + 1 :]:
            assert sum(abs(x - y) for x, y in zip(a, b, strict=True)) > 100, (a, b)
    # Shapes and colours are drawn uniformly: over the ~1,200 objects of 600 scenes each one is used,
    # within 20 % of its even share.
    objects = [o for split in ("train", "val") for r in _records(world_dir, split) for o in r["objects"]]
    for field, names in (("shape", SHAPES), ("color", COLORS)):
        share = len(objects) / len(names)
        counts = {name: sum(o[field] == name for o in objects) for name in names}
        assert all(0.8 * share < n < 1.2 * share for n in counts.values()), (field, counts)
        assert {o[field] for o in objects} == set(names)


def test_files_hold_the_records_and_their_rendered_scenes(world_dir: Path):
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        records = _records(world_dir, split)
        assert len(records) == n
        assert [r["id"] for r in records] == [f"{split}-{i:06d}" for i in range(n)]
        for i, r in enumerate(records):
            assert set(r) == {"id", "images", "prompt", "chosen", "rejected", "kind", "objects", "caption"}
            assert r["images"] == [f"images/{r['id']}.png"]
            assert "<image>" not in r["prompt"]
            if split == "val" or i % 10 == 0:  # each image file shows its record's objects, pixel for pixel
                scene = [ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in r["objects"]]
                drawn = np.asarray(Image.open(world_dir / r["images"][0]).convert("RGB"))
                assert (drawn == np.asarray(render_scene(scene, 64))).all(), r["id"]
    assert not [p for p in world_dir.rglob("*") if ".tmp" in p.name]  # no temporaries left
    info = json.loads((world_dir / "world.json").read_text())
    settings = info["settings"]
    assert (settings["seed"], settings["n_train"], settings["n_val"]) == (3, N_TRAIN, N_VAL)
    assert settings["task_weights"] == DEFAULT_TASK_WEIGHTS and settings["max_objects"] == 3
    assert (
        info["vocabulary"] == vocabulary()
        and info["shapes"] == list(SHAPES)
        and info["colors"] == {name: list(rgb) for name, rgb in COLORS.items()}
    )
    for split in ("train", "val"):  # the summary counts the records' kinds
        kinds = [r["kind"] for r in _records(world_dir, split)]
        assert info["kinds"][split] == {k: kinds.count(k) for k in KINDS if k in kinds}


def test_scenes_valid(world_dir: Path):
    counts = []
    for r in _records(world_dir, "train"):
        objs = r["objects"]
        counts.append(len(objs))
        assert 1 <= len(objs) <= 3
        pairs = [(o["shape"], o["color"]) for o in objs]
        assert len(set(pairs)) == len(pairs)
        for i, a in enumerate(objs):
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert x1 - x0 >= 14 and y1 - y0 >= 14  # still ~7 px after a resize to 32
            for b in objs[i + 1 :]:  # boxes do not overlap at all
                u0, v0, u1, v1 = b["bbox"]
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0
        assert [o["bbox"][0] for o in objs] == sorted(o["bbox"][0] for o in objs)  # left to right
        assert r["caption"] == caption_for([ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in objs])
    assert set(counts) == {1, 2, 3}


def test_chosen_true_rejected_false(world_dir: Path):
    seen_kinds = set()
    for r in _records(world_dir, "train") + _records(world_dir, "val"):
        truth = {(o["color"], o["shape"]) for o in r["objects"]}
        kind = r["kind"]
        seen_kinds.add(kind)
        assert r["chosen"] != r["rejected"]
        if kind == "caption":
            assert r["prompt"] == "describe the image ."
            assert r["chosen"] == r["caption"]
            assert objects_in_text(r["chosen"]) == truth
            assert objects_in_text(r["rejected"]) - truth, r  # mentions an absent object
        elif kind == "color":
            shape = re.fullmatch(r"what color is the (\w+) \?", r["prompt"]).group(1)
            owners = [o for o in r["objects"] if o["shape"] == shape]
            assert len(owners) == 1, r  # the question is unambiguous
            assert r["chosen"] == f"the {shape} is {owners[0]['color']} ."
            wrong = re.fullmatch(rf"the {shape} is (\w+) \.", r["rejected"]).group(1)
            assert wrong in COLORS and wrong != owners[0]["color"]
        else:
            color, shape = re.fullmatch(r"is there a (\w+) (\w+) in the image \?", r["prompt"]).groups()
            present = (color, shape) in truth
            assert r["chosen"] == ("yes ." if present else "no .")
            assert r["rejected"] == ("no ." if present else "yes .")
    assert seen_kinds == set(KINDS)


def test_objects_in_text():
    assert objects_in_text("a red circle , a blue square and a green triangle .") == {
        ("red", "circle"),
        ("blue", "square"),
        ("green", "triangle"),
    }
    assert objects_in_text("the circle is red .") == set()
    assert objects_in_text("A Red Circle.") == {("red", "circle")}


def test_vocabulary_covers_every_record(world_dir: Path):
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and len(vocab) < 40
    assert set(SHAPES) | set(COLORS) | {"yes", "no", ".", "?", ",", "a", "and"} <= set(vocab)
    records = _records(world_dir, "train") + _records(world_dir, "val")
    used = set()
    for r in records:
        for field in ("prompt", "chosen", "rejected", "caption"):
            text = r[field]
            assert text == text.lower()
            used.update(tokenize(text))
    assert used <= set(vocab)
    # 600 records use every token of the language.
    assert len(set(vocab) - used) == 0


def test_pixels_match_objects(world_dir: Path):
    checked = 0
    for r in _records(world_dir, "val"):
        image = np.asarray(Image.open(world_dir / r["images"][0]))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == BACKGROUND
        for o in r["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            centre = image[(y0 + y1) // 2, (x0 + x1) // 2]
            if o["shape"] in ("circle", "square"):
                assert np.abs(centre.astype(int) - COLORS[o["color"]]).max() <= 2
                checked += 1
            if o["shape"] == "square":  # a square fills its whole box
                assert (image[y0:y1, x0:x1] == COLORS[o["color"]]).all()
        # Nothing is drawn outside the boxes.
        mask = np.ones((64, 64), bool)
        for o in r["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            mask[y0:y1, x0:x1] = False
        assert (image[mask] == BACKGROUND).all()
    assert checked > 20


def test_render_every_shape_and_colour():
    for shape in SHAPES:
        for color, rgb in COLORS.items():
            image = np.asarray(render_scene([ShapeObject(shape, color, (10, 10, 30, 30))], 40))
            assert tuple(image[20, 20]) == rgb
            area = (image == rgb).all(-1).sum()
            # circle ~ pi/4 * 400, square 400, triangle and diamond ~ 200
            assert {"circle": 280, "square": 400, "triangle": 180, "diamond": 180}[shape] <= area <= 400


def test_determinism(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shapes_world(a, n_train=60, n_val=20, seed=7)
    write_shapes_world(b, n_train=60, n_val=20, seed=7)
    assert _digest(a) == _digest(b)
    c = tmp_path / "c"
    write_shapes_world(c, n_train=60, n_val=20, seed=8)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    # A record depends on (seed, split, index) only, not on how many were generated.
    world = ShapesWorld(seed=7)
    assert _records(a, "train")[42] == world.record("train", 42)
    assert (a / "images" / "val-000005.png").read_bytes() == _png_bytes(world.image(world.record("val", 5)))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_idempotent_and_overwrite(tmp_path: Path):
    root = tmp_path / "w"
    first = write_shapes_world(root, n_train=30, n_val=10, seed=1)
    assert first["generated"] and first["n_train"] == 30 and sum(first["kinds"]["train"].values()) == 30
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = write_shapes_world(root, n_train=30, n_val=10, seed=1)
    assert not again["generated"] and again["kinds"] == first["kinds"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes
    with pytest.raises(FileExistsError):
        write_shapes_world(root, n_train=20, n_val=10, seed=1)
    smaller = write_shapes_world(root, n_train=20, n_val=10, seed=1, overwrite=True)
    assert smaller["generated"] and len(_records(root, "train")) == 20
    assert len(list((root / "images").glob("*.png"))) == 30  # stale images removed
    # A missing image (or an interrupted run without world.json) triggers regeneration.
    (root / "images" / "train-000003.png").unlink()
    assert write_shapes_world(root, n_train=20, n_val=10, seed=1)["generated"]
    (root / "world.json").unlink()
    assert write_shapes_world(root, n_train=20, n_val=10, seed=1)["generated"]


def test_task_balance(world_dir: Path):
    records = _records(world_dir, "train") + _records(world_dir, "val")
    n = len(records)
    for kind, weight in DEFAULT_TASK_WEIGHTS.items():
        share = sum(r["kind"] == kind for r in records) / n
        assert abs(share - weight) < 0.06, (kind, share)
    presence = [r for r in records if r["kind"] == "presence"]
    yes = sum(r["chosen"] == "yes ." for r in presence) / len(presence)
    assert 0.4 < yes < 0.6
    # Custom weights: kinds left out never occur.
    rng = random.Random(0)
    kinds = {make_record(rng, task_weights={"color": 1.0})["kind"] for _ in range(50)}
    assert kinds == {"color"}
    with pytest.raises(ValueError):
        make_record(rng, task_weights={"bogus": 1.0})


def test_make_record_on_given_scene():
    scene = [ShapeObject("circle", "red", (2, 2, 20, 20)), ShapeObject("circle", "blue", (30, 30, 50, 50))]
    record = make_record(random.Random(0), kind="caption", scene=scene)
    assert record["chosen"] == "a red circle and a blue circle ."
    with pytest.raises(ValueError):  # "what color is the circle ?" would be ambiguous
        make_record(random.Random(0), kind="color", scene=scene)
    # On sampled scenes: a colour question is asked about a shape the scene holds once, and answered with
    # that object's colour; a scene without such a shape is refused.
    rng = random.Random(1)
    asked = refused = 0
    for _ in range(200):
        scene = sample_scene(rng, max_objects=3)
        shapes = [o.shape for o in scene]
        unique = {o.shape: o.color for o in scene if shapes.count(o.shape) == 1}
        if not unique:
            with pytest.raises(ValueError):
                make_record(rng, kind="color", scene=scene)
            refused += 1
            continue
        record = make_record(rng, kind="color", scene=scene)
        shape = re.fullmatch(r"what color is the (\w+) \?", record["prompt"]).group(1)
        assert shape in unique and record["chosen"] == f"the {shape} is {unique[shape]} ."
        wrong = re.fullmatch(rf"the {shape} is (\w+) \.", record["rejected"]).group(1)
        assert wrong in COLORS and wrong != unique[shape]
        assert record["objects"] == [o.to_dict() for o in scene]
        asked += 1
    assert asked > 100 and refused > 0


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    main(["--out", str(tmp_path / "cli"), "--n-train", "12", "--n-val", "4", "--seed", "5"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_train"] == 12 and summary["n_val"] == 4 and summary["generated"]
    assert summary["vocab_size"] == len(vocabulary())
    assert _records(tmp_path / "cli", "train") == [ShapesWorld(seed=5).record("train", i) for i in range(12)]
