"""``mmpo pami-demo``: its yes/no training data is true to the clips and apart from the probes; the recipe runs."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from datamodules.worlds.video import clip_from_objects, make_record, render_clip
from datamodules.worlds.video_probes import make_video_probes
from mmpo.recipes.pami_data import (
    EVAL_PROBE_SEED,
    TRAIN_PROBE_SEED,
    WORLD,
    clip_question_example,
    clip_settings,
    question_type,
    scene_question_example,
    write_yes_no_split,
)

_MOVE = re.compile(r"does the (\w+) (\w+) move (\w+) \?")
_COLOR = re.compile(r"is the (\w+) that moves (\w+) (\w+) \?")


def _truth(prompt: str, objects) -> bool | None:
    """The answer the clip's ground truth gives to a direction or colour question (None: another kind)."""
    if m := _MOVE.fullmatch(prompt):
        color, shape, direction = m.groups()
        (o,) = [o for o in objects if (o.color, o.shape) == (color, shape)]
        return o.direction == direction
    if m := _COLOR.fullmatch(prompt):
        shape, direction, color = m.groups()
        (o,) = [o for o in objects if (o.shape, o.direction) == (shape, direction)]
        return o.color == color
    return None


def test_yes_no_records_are_true_to_their_clips(tmp_path):
    from datamodules.vision_text.video_io import read_video

    records = write_yes_no_split(tmp_path, "yesno-train", 24, TRAIN_PROBE_SEED)
    assert len(records) == 48 and len({r["id"] for r in records}) == 48
    checked = 0
    for record in records:
        objects = clip_from_objects(record["objects"])
        assert {record["chosen"], record["rejected"]} == {"yes .", "no ."}
        truth = _truth(record["prompt"], objects)
        if truth is not None:
            assert record["chosen"] == ("yes ." if truth else "no ."), record
            checked += 1
    assert checked >= 12  # the temporal and semantic probes' direction and colour questions
    # the written clip is the clip the objects describe (near-lossless H.264)
    frames, _ = read_video(tmp_path / records[0]["videos"][0], WORLD["num_frames"])
    want = render_clip(clip_from_objects(records[0]["objects"]), WORLD["num_frames"], WORLD["size"])
    assert np.abs(frames.numpy().astype(int) - want.astype(int)).mean() < 2.0


def test_training_clips_are_not_the_evaluation_probes():
    def key(objects):
        return tuple(sorted((o.shape, o.color, o.direction, o.appears, o.side, o.speed, o.start) for o in objects))

    settings = clip_settings()
    train = {key(p.objects) for p in make_video_probes(200, TRAIN_PROBE_SEED, **settings)}
    held_out = [key(p.objects) for p in make_video_probes(120, EVAL_PROBE_SEED, **settings)]
    assert len(train) > 150 and not train.intersection(held_out)


def test_question_types_of_the_world_and_the_probes():
    import random

    rng = random.Random(0)
    for kind in ("direction", "color", "order", "caption", "shape_color"):
        for _ in range(5):
            assert question_type(make_record(rng, kind=kind, max_objects=2)["prompt"]) == kind
    detail_type = {"direction": "direction", "order": "order", "color": "color", "shape": "shape"}
    detail_type |= {"horizontal": "relation", "vertical": "relation"}
    for probe in make_video_probes(30, 5, max_objects=2):
        assert question_type(probe.basic) == question_type(probe.hallucinated) == detail_type[probe.detail]


def test_text_examples_describe_a_scene_and_answer_its_question_truly():
    import random

    from datamodules.worlds.video import vocabulary
    from datamodules.worlds.video_probes import probe_vocabulary

    rng, words = random.Random(0), set(vocabulary()) | set(probe_vocabulary())
    examples = [scene_question_example(rng) for _ in range(200)]
    yes_no = [e for e in examples if e["chosen"] in ("yes .", "no .")]
    assert 60 < len(yes_no) < 140 and 20 < sum(e["chosen"] == "yes ." for e in yes_no) < len(yes_no) - 20
    checked = 0
    for e in examples:
        caption, question = e["prompt"].split(" . ", 1)  # a caption ends at its only " ."
        assert question.endswith(("?", ".")) and set(e["prompt"].split()) | set(e["chosen"].split()) <= words
        objects = []  # the caption's objects: "a <colour> <shape> moves <direction>", in order of appearance
        for phrase in caption.replace(" and ", " , ").split(" , "):
            _, color, shape, _, direction = phrase.split()
            objects.append(type("O", (), {"color": color, "shape": shape, "direction": direction}))
        if e in yes_no and (truth := _truth(question, objects)) is not None:
            assert e["chosen"] == ("yes ." if truth else "no ."), e
            checked += 1
    assert checked > 20


def test_clip_examples_show_their_clip_and_answer_its_question_truly():
    import random

    from datamodules.worlds.video_probes import PROBE_TYPES

    rng = random.Random(0)
    examples = [clip_question_example(rng) for _ in range(120)]
    kinds = {e["kind"] for e in examples}
    assert {"direction", "color", "order", "caption"} <= kinds
    assert {f"yes/no {t}" for t in PROBE_TYPES} <= kinds  # every probe type, not the first one only
    checked = 0
    for e in examples:
        objects = clip_from_objects(e["objects"])
        want = render_clip(objects, WORLD["num_frames"], WORLD["size"])
        assert e["frames"].dtype == np.uint8 and np.array_equal(e["frames"], want)
        truth = _truth(e["prompt"], objects)
        if truth is not None:
            assert e["chosen"] == ("yes ." if truth else "no ."), e["prompt"]
            checked += 1
        elif e["kind"] == "direction":
            color, shape = e["prompt"].split()[4:6]
            (o,) = [o for o in objects if (o.color, o.shape) == (color, shape)]
            assert e["chosen"] == f"the {color} {shape} moves {o.direction} ."
            checked += 1
    assert checked > 20


def test_clip_batches_put_the_loss_on_the_answer_and_its_eos_only(video_llava):
    import random

    from transformers import AutoProcessor

    from mmpo.recipes.pami_data import _clip_batch

    processor = AutoProcessor.from_pretrained(video_llava)
    rng = random.Random(1)
    examples = [clip_question_example(rng) for _ in range(3)]
    batch = _clip_batch(examples, processor)
    tokenizer = processor.tokenizer
    for i, e in enumerate(examples):
        answer = tokenizer(e["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        row = batch["labels"][i]
        assert row[row != -100].tolist() == answer
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(answer) : n].tolist() == answer and (row[n:] == -100).all()
    assert batch["pixel_values_videos"].shape[:2] == (3, WORLD["num_frames"])


@pytest.mark.slow
def test_the_demo_runs_end_to_end_at_the_smallest_sizes(tmp_path):
    from mmpo.recipes.pami_demo import CANDIDATES, METRICS, TYPES, main

    argv = ["--workdir", str(tmp_path), "--family", "llava_next_video", "--seeds", "1", "--n-train", "32"]
    argv += ["--n-yes-no", "12", "--n-val", "24"]
    argv += ["--vision-steps", "5", "--sft-epochs", "1", "--dpo-steps", "2", "--batch-size", "2", "--probes", "6"]
    argv += ["--speeds", "2", "4", "--tower-positions", "--shape-color-questions"]
    results = main([*argv, "--language-steps", "3", "--video-steps", "2"])
    assert WORLD["speeds"] == [1, 3]  # the demo's speeds were put back
    speeds = {o["speed"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()
              for o in json.loads(line)["objects"]}  # fmt: skip
    assert speeds <= {2, 3, 4} and results["vision"]["position_error"] >= 0
    assert 0.0 <= results["language"]["accuracy"] <= 1.0 and results["language"]["steps"] == 3
    video = results["video_language"]
    assert video["steps"] == 2 and {"direction", "color", "order", "caption"} <= set(video["accuracy"])
    assert set(results["open_questions"]) == {"caption", "color", "direction", "order", "shape_color"}
    assert WORLD["task_weights"] is None  # put back too
    assert all(0.0 <= v <= 1.0 for v in results["open_questions"].values())
    assert json.loads((tmp_path / "results.json").read_text())["before"] == results["before"]
    for figures in (results["before"], results["after"]["vdpo"][0], results["after"]["pami"][0]):
        assert {f"{t}/{m}" for t in TYPES for m in METRICS} <= figures.keys()
        assert all(0.0 <= v <= 1.0 for v in figures.values())
    scores = results["awareness"]["scores"]
    for kind in ("direction", "color", "shape_color"):
        assert set(scores[kind]) == set(CANDIDATES)
        assert all(0.0 <= s <= math.log(2) for s in scores[kind].values())
    assert len(results["after"]["vdpo"]) == len(results["after"]["pami"]) == 1


def test_selection_counter_counts_the_kept_and_the_identical_candidates_by_question_type():
    from types import SimpleNamespace

    import torch

    from augment.video.pami import CloseToFar
    from mmpo.recipes.pami_demo import SelectionCounter, merge_counts

    tags = (("original", "reverse", "static", "crop"),) * 3
    # keep: positions in the group (the original at 0); a kept candidate of weight 0 is a false rejection, dropped
    last = {
        "scores": torch.tensor([[0.2, 0.0, 0.01], [0.0005, 0.002, 0.03], [0.0, float("nan"), 0.0]]),
        "keep": torch.tensor([[0, 1], [0, 3], [0, 1]]),
        "weights": torch.tensor([[1.0], [0.5], [0.0]]),
        "tags": tags,
    }
    selector = SimpleNamespace(last=last, schedule=CloseToFar())  # identical below 1e-3 nats
    counter = SelectionCounter(selector, {"a": "direction", "b": "color", "c": "color"})
    counter.on_train_batch_end(None, None, None, SimpleNamespace(ids=["a", "b", "c"]), 0)
    assert counter.kept == {"direction": {"reverse": 1}, "color": {"crop": 1}}
    # a: static scored 0; b: reverse 0.0005; c: all three, the NaN included
    assert counter.identical == {"direction": {"static": 1}, "color": {"reverse": 2, "static": 1, "crop": 1}}
    assert counter.groups == {"direction": 1, "color": 2}
    total = merge_counts(merge_counts({}, counter.counts()), counter.counts())  # two runs' counts add up
    assert total["kept"]["color"] == {"crop": 2} and total["identical"]["color"]["reverse"] == 4
    assert total["groups"] == {"direction": 2, "color": 4}
