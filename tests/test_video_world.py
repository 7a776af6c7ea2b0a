"""Tests for the synthetic video world: ground truth, truth of chosen / falsity of rejected, real files."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from datamodules.vision_text.video_io import read_video
from datamodules.worlds.shapes import BACKGROUND, COLORS, SHAPES, tokenize
from datamodules.worlds.video import (
    DEFAULT_TASK_WEIGHTS,
    DIRECTIONS,
    KINDS,
    MovingObject,
    VideoWorld,
    caption_for,
    clip_from_objects,
    main,
    make_record,
    render_clip,
    sample_clip,
    vocabulary,
    write_video_world,
)

N_TRAIN, N_VAL, SEED = 40, 12, 3


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("video-world")
    write_video_world(root, n_train=N_TRAIN, n_val=N_VAL, seed=SEED)
    return root


def _records(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _mask(frame: np.ndarray, color: str, tol: int = 40) -> np.ndarray:
    return (np.abs(frame.astype(int) - np.array(COLORS[color])) <= tol).all(-1)


# ---------------------------------------------------------------- an independent judge of answers


def _find(objects: list[dict], **match) -> list[dict]:
    return [o for o in objects if all(o[k] == v for k, v in match.items())]


def _is_true(record: dict, text: str) -> bool:
    """Whether a response is true of the record's ground truth, parsed from the words alone."""
    objects, kind = record["objects"], record["kind"]
    if kind == "direction":  # "the red circle moves left ."
        color, shape, direction = re.fullmatch(r"the (\w+) (\w+) moves (\w+) \.", text).groups()
        return [o["direction"] for o in _find(objects, color=color, shape=shape)] == [direction]
    if kind == "color":  # "the circle that moves left is red ."
        shape, direction, color = re.fullmatch(r"the (\w+) that moves (\w+) is (\w+) \.", text).groups()
        return [o["color"] for o in _find(objects, shape=shape, direction=direction)] == [color]
    if kind == "order":  # "the red circle appears first ."
        color, shape = re.fullmatch(r"the (\w+) (\w+) appears first \.", text).groups()
        first = min(o["appears"] for o in objects)
        return [o["appears"] for o in _find(objects, color=color, shape=shape)] == [first]
    if kind == "shape_color":  # "the circle is red ."
        shape, color = re.fullmatch(r"the (\w+) is (\w+) \.", text).groups()
        return [o["color"] for o in _find(objects, shape=shape)] == [color]
    assert kind == "caption"  # "a red circle moves left , a blue square moves up and ... ."
    named = re.findall(r"a (\w+) (\w+) moves (\w+)", text)
    truth = [(o["color"], o["shape"], o["direction"]) for o in sorted(objects, key=lambda o: o["appears"])]
    return named == truth


# ---------------------------------------------------------------- clips in memory


def test_sampled_clips_respect_their_invariants():
    sizes, speeds, counts, directions = set(), set(), set(), set()
    for i in range(300):
        objects = sample_clip(random.Random(i), num_frames=16, size=64, max_objects=3)
        counts.add(len(objects))
        assert 1 <= len(objects) <= 3
        assert len({(o.shape, o.color) for o in objects}) == len(objects)
        appears = [o.appears for o in objects]
        assert appears[0] == 0 and appears == sorted(set(appears)) and set(appears) <= {0, 4, 8}
        for o in objects:
            sizes.add(o.side)
            speeds.add(o.speed)
            directions.add(o.direction)
            assert o.shape in SHAPES and o.color in COLORS and o.direction in DIRECTIONS
            assert o.bbox_at(o.appears - 1) is None
            for t in range(o.appears, 16):
                x0, y0, x1, y1 = o.bbox_at(t)
                assert 2 <= x0 and 2 <= y0 and x1 <= 62 and y1 <= 62  # whole path inside the margin
        for a_i, a in enumerate(objects):  # never overlap while both are visible
            for b in objects[a_i + 1 :]:
                for t in range(b.appears, 16):
                    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox_at(t), b.bbox_at(t)
                    assert ax1 + 2 <= bx0 or bx1 + 2 <= ax0 or ay1 + 2 <= by0 or by1 + 2 <= ay0
    assert counts == {1, 2, 3} and sizes == set(range(12, 17)) and speeds == {1, 2, 3}
    assert directions == set(DIRECTIONS)


def test_bbox_moves_by_speed_in_its_direction():
    obj = MovingObject("circle", "red", "left", appears=4, side=12, speed=3, start=(40, 10))
    assert obj.bbox_at(3) is None
    assert obj.bbox_at(4) == (40, 10, 52, 22)
    assert obj.bbox_at(6) == (34, 10, 46, 22)
    up = MovingObject("square", "blue", "up", appears=0, side=12, speed=2, start=(5, 40))
    assert up.bbox_at(5) == (5, 30, 17, 42)
    assert clip_from_objects([obj.to_dict(), up.to_dict()]) == [obj, up]
    assert caption_for([up, obj]) == "a blue square moves up and a red circle moves left ."


def test_render_clip_draws_the_ground_truth():
    objects = sample_clip(random.Random(7), max_objects=3)
    frames = render_clip(objects, 16, 64)
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    for o in objects:
        for t in range(16):
            box = o.bbox_at(t)
            if box is None:
                assert not _mask(frames[t], o.color, tol=0).any()  # not drawn before it appears
                continue
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            assert tuple(frames[t, cy, cx]) == COLORS[o.color]  # lossless before encoding
    assert tuple(frames[0, 0, 0]) == BACKGROUND


def test_every_kind_is_generated_and_judged_correctly():
    kinds = set()
    for i in range(400):
        record = make_record(random.Random(i))
        kinds.add(record["kind"])
        assert _is_true(record, record["chosen"]), record
        assert not _is_true(record, record["rejected"]), record
        assert record["caption"] == caption_for(clip_from_objects(record["objects"]))
    assert kinds == set(DEFAULT_TASK_WEIGHTS) == set(KINDS) - {"shape_color"}  # not drawn by default
    for kind in KINDS:  # a forced kind resamples the clip until the task is possible
        record = make_record(random.Random(0), kind=kind)
        assert record["kind"] == kind and _is_true(record, record["chosen"])


def test_make_record_errors():
    with pytest.raises(ValueError, match="unknown kind"):
        make_record(random.Random(0), kind="count")
    with pytest.raises(ValueError, match="max_objects"):
        make_record(random.Random(0), kind="order", max_objects=1)
    with pytest.raises(ValueError, match="task kinds"):
        make_record(random.Random(0), task_weights={"presence": 1.0})
    one = [MovingObject("circle", "red", "left", 0, 12, 1, (40, 10))]
    with pytest.raises(ValueError, match="order task"):
        make_record(random.Random(0), kind="order", objects=one)
    with pytest.raises(ValueError, match="no room"):
        sample_clip(random.Random(0), num_frames=64, size=64)


def test_vocabulary_covers_every_token_and_nothing_else():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab)) and all(t == t.lower() for t in vocab)
    seen = set()
    for i in range(2000):
        record = make_record(random.Random(i))
        for field in ("prompt", "chosen", "rejected", "caption"):
            seen |= set(tokenize(record[field]))
    assert seen == set(vocab)  # every token occurs, and nothing outside the vocabulary
    assert {",", ".", "?"} <= set(vocab) and set(DIRECTIONS) | set(SHAPES) | set(COLORS) <= set(vocab)


# ---------------------------------------------------------------- the world on disk


def test_world_files_and_records(world_dir):
    info = json.loads((world_dir / "world.json").read_text())
    assert info["vocabulary"] == vocabulary() and info["directions"] == list(DIRECTIONS)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        records = _records(world_dir, split)
        assert [r["id"] for r in records] == [f"{split}-{i:06d}" for i in range(n)]
        kinds = [r["kind"] for r in records]
        assert info["kinds"][split] == {k: kinds.count(k) for k in KINDS}  # the summary counts them
        for r in records:
            assert r["videos"] == [f"videos/{r['id']}.mp4"] and (world_dir / r["videos"][0]).is_file()
            assert _is_true(r, r["chosen"]) and not _is_true(r, r["rejected"])
            assert set(tokenize(r["prompt"] + " " + r["chosen"] + " " + r["rejected"])) <= set(info["vocabulary"])
    # A record depends only on (seed, split, index), not on how many were written.
    assert VideoWorld(seed=SEED).record("train", 5) == _records(world_dir, "train")[5]
    assert sorted(p.name for p in (world_dir / "videos").iterdir()) == sorted(
        f"{s}-{i:06d}.mp4" for s, n in (("train", N_TRAIN), ("val", N_VAL)) for i in range(n)
    )


def test_decoded_clips_show_the_ground_truth(world_dir):
    for record in _records(world_dir, "val"):
        frames, meta = read_video(world_dir / record["videos"][0], num_samples=16, where="val.jsonl")
        assert tuple(frames.shape) == (16, 64, 64, 3) and meta["fps"] == pytest.approx(8.0)
        frames = frames.numpy()
        for o in clip_from_objects(record["objects"]):
            x0, y0, x1, y1 = o.bbox_at(15)
            pixel = frames[15, (y0 + y1) // 2, (x0 + x1) // 2].astype(int)
            assert np.abs(pixel - COLORS[o.color]).max() <= 30, (record["id"], o, pixel)
            if o.appears > 0:  # absent before it enters (order of appearance is visible)
                assert _mask(frames[o.appears - 1], o.color).sum() < 5
            # Direction from two decoded frames: the colour's centroid moves the right way.
            first = np.argwhere(_mask(frames[o.appears], o.color)).mean(0)  # (y, x)
            last = np.argwhere(_mask(frames[15], o.color)).mean(0)
            dx, dy = DIRECTIONS[o.direction]
            moved = o.speed * (15 - o.appears)
            assert (last - first)[::-1] == pytest.approx((dx * moved, dy * moved), abs=1.5), (record["id"], o)


def test_same_seed_gives_identical_files_and_frames(world_dir, tmp_path):
    again = tmp_path / "again"
    write_video_world(again, n_train=N_TRAIN, n_val=N_VAL, seed=SEED)
    for split in ("train", "val"):
        assert (again / f"{split}.jsonl").read_bytes() == (world_dir / f"{split}.jsonl").read_bytes()
    for name in ("train-000000.mp4", "train-000017.mp4", "val-000011.mp4"):
        a, b = world_dir / "videos" / name, again / "videos" / name
        assert a.read_bytes() == b.read_bytes()
        assert np.array_equal(read_video(a, 16)[0].numpy(), read_video(b, 16)[0].numpy())
    other = tmp_path / "other"
    write_video_world(other, n_train=N_TRAIN, n_val=N_VAL, seed=SEED + 1)
    assert (other / "train.jsonl").read_bytes() != (world_dir / "train.jsonl").read_bytes()


def test_rewrite_is_idempotent_and_guarded(tmp_path):
    root = tmp_path / "w"
    first = write_video_world(root, n_train=6, n_val=2, seed=0)
    assert first["generated"] and first["n_train"] == 6
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    second = write_video_world(root, n_train=6, n_val=2, seed=0)
    assert not second["generated"] and second["kinds"] == first["kinds"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps
    with pytest.raises(FileExistsError, match="overwrite"):
        write_video_world(root, n_train=3, n_val=2, seed=0)
    (root / "videos" / "train-000002.mp4").unlink()  # same settings, a file missing: regenerate
    assert write_video_world(root, n_train=6, n_val=2, seed=0)["generated"]
    smaller = write_video_world(root, n_train=3, n_val=1, seed=0, overwrite=True)
    assert smaller["generated"] and len(_records(root, "train")) == 3
    assert sorted(p.name for p in (root / "videos").iterdir()) == [
        "train-000000.mp4",
        "train-000001.mp4",
        "train-000002.mp4",
        "val-000000.mp4",
    ]
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_cli(tmp_path, capsys):
    summary = main(["--out", str(tmp_path / "cli"), "--n-train", "3", "--n-val", "1", "--seed", "2"])
    assert json.loads(capsys.readouterr().out) == summary
    assert summary["n_train"] == 3 and summary["vocab_size"] == len(vocabulary())
    # the command line writes the world its arguments describe: the seed-2 records
    world = VideoWorld(seed=2)
    assert _records(tmp_path / "cli", "train") == [world.record("train", i) for i in range(3)]
    assert _records(tmp_path / "cli", "val") == [world.record("val", 0)]
    assert json.loads((tmp_path / "cli" / "world.json").read_text())["vocabulary"] == vocabulary()


def test_speeds_bound_every_object_and_the_default_draws_are_unchanged():
    import random

    from datamodules.worlds.video import sample_clip

    for seed in range(40):
        assert sample_clip(random.Random(seed), 8, 64, 2) == sample_clip(random.Random(seed), 8, 64, 2, (1, 3))
        fast = sample_clip(random.Random(seed), 8, 64, 2, speeds=(3, 6))
        assert fast and all(3 <= o.speed <= 6 for o in fast)
        for o in fast:  # still inside the frame at the last frame
            x0, y0, x1, y1 = o.bbox_at(7)
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
    with pytest.raises(ValueError, match="no room to move 7 px per frame for 8 frames"):
        sample_clip(random.Random(0), 8, 64, 2, speeds=(7, 8))
    with pytest.raises(ValueError, match=r"1 <= least <= most, got \(3, 2\)"):
        sample_clip(random.Random(0), 8, 64, 2, speeds=(3, 2))


def test_shape_colour_questions_are_drawn_only_when_weighted_and_leave_the_default_draws_alone():
    weighted = [make_record(random.Random(i), task_weights={"shape_color": 1, "direction": 1}) for i in range(200)]
    asked = [r for r in weighted if r["kind"] == "shape_color"]
    assert 60 < len(asked) < 140 and {r["kind"] for r in weighted} == {"shape_color", "direction"}
    for r in asked:
        assert "moves" not in r["prompt"] + r["chosen"]  # motion-free: a reversed clip leaves the answer true
        assert _is_true(r, r["chosen"]) and not _is_true(r, r["rejected"])
    # the kind is listed last with weight 0 by default: the draws of every other kind are unchanged
    assert [make_record(random.Random(i))["kind"] for i in range(50)] == [
        make_record(random.Random(i), task_weights=DEFAULT_TASK_WEIGHTS | {"shape_color": 0})["kind"] for i in range(50)
    ]
