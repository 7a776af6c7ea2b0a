"""VideoHallucer-style probes on the video world: truth of the questions, scores by hand, the callback in `validate`."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from helpers.trainers import quiet_trainer

from datamodules.vision_text.video_io import sample_frame_indices
from datamodules.worlds.shapes import COLORS, SHAPES, tokenize
from datamodules.worlds.video import DIRECTIONS, MovingObject, render_clip, vocabulary
from datamodules.worlds.video_probes import PROBE_DETAILS, PROBE_TYPES, make_video_probes, probe_vocabulary
from mmpo.generation import generate_answers
from mmpo.hallucination import parse_yes_no
from mmpo.video_hallucination import (
    COUNT_FIELDS,
    OVERALL,
    VideoHallucinationEval,
    count_answers,
    metrics_from_counts,
    score,
)

# ---------------------------------------------------------------- an independent judge of the questions


def _one(objects: tuple[MovingObject, ...], **match: str) -> MovingObject:
    found = [o for o in objects if all(getattr(o, k) == v for k, v in match.items())]
    assert len(found) == 1, (match, objects)  # every question names exactly one object
    return found[0]


def _holds(a: MovingObject, b: MovingObject, relation: str, num_frames: int) -> bool:
    """Whether ``a`` lies wholly on that side of ``b`` in every frame both are visible."""
    frames = range(max(a.appears, b.appears), num_frames)
    assert len(frames) > 0
    sides = {  # boxes (x0, y0, x1, y1), y growing down
        "left of": lambda p, q: p[2] <= q[0],
        "right of": lambda p, q: q[2] <= p[0],
        "above": lambda p, q: p[3] <= q[1],
        "below": lambda p, q: q[3] <= p[1],
    }
    return all(sides[relation](a.bbox_at(t), b.bbox_at(t)) for t in frames)


def _is_true(question: str, objects: tuple[MovingObject, ...], num_frames: int) -> bool:
    """The answer to a probe question, read from its words and the ground truth alone."""
    if m := re.fullmatch(r"does the (\w+) (\w+) move (\w+) \?", question):
        return _one(objects, color=m[1], shape=m[2]).direction == m[3]
    if m := re.fullmatch(r"does the (\w+) (\w+) appear before the (\w+) (\w+) \?", question):
        return _one(objects, color=m[1], shape=m[2]).appears < _one(objects, color=m[3], shape=m[4]).appears
    if m := re.fullmatch(r"is the (\w+) that moves (\w+) (\w+) \?", question):
        return _one(objects, shape=m[1], direction=m[2]).color == m[3]
    if m := re.fullmatch(r"is the (\w+) shape that moves (\w+) a (\w+) \?", question):
        return _one(objects, color=m[1], direction=m[2]).shape == m[3]
    m = re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+) \?", question)
    assert m, question
    a, b = _one(objects, color=m[1], shape=m[2]), _one(objects, color=m[4], shape=m[5])
    return _holds(a, b, m[3], num_frames)


# ---------------------------------------------------------------- probes


def test_probes_are_true_to_the_ground_truth():
    words, details = set(vocabulary()) | set(probe_vocabulary()), Counter()
    for seed in range(12):
        for p in make_video_probes(30, seed=seed):
            details[p.detail] += 1
            assert p.detail in PROBE_DETAILS[p.kind] and (p.basic_answer, p.hallucinated_answer) == ("yes", "no")
            assert _is_true(p.basic, p.objects, 16), p
            assert not _is_true(p.hallucinated, p.objects, 16), p
            basic, wrong = tokenize(p.basic), tokenize(p.hallucinated)
            assert set(basic) | set(wrong) <= words
            assert len(basic) == len(wrong)
            changed = [(x, y) for x, y in zip(basic, wrong, strict=True) if x != y]
            if p.detail == "order":  # "does the A appear before the B ?" -> the two objects swapped
                assert wrong == basic[:2] + basic[7:9] + basic[4:7] + basic[2:4] + basic[9:]
            else:  # one word: the direction, colour, shape or side
                assert len(changed) == 1
            if p.detail == "color":  # the wrong colour is no object's colour, the wrong shape no object's shape
                assert changed[0][1] in set(COLORS) - {o.color for o in p.objects}
            if p.detail == "shape":
                assert changed[0][1] in set(SHAPES) - {o.shape for o in p.objects}
            if p.detail == "direction":
                (right, wrong_way) = changed[0]
                assert np.add(DIRECTIONS[right], DIRECTIONS[wrong_way]).tolist() == [0, 0]  # the opposite way
            assert p.frames.shape == (16, 64, 64, 3) and np.array_equal(p.frames, render_clip(p.objects, 16, 64))
    assert set(details) == {d for ds in PROBE_DETAILS.values() for d in ds}
    # the words the probes add to the world's, and nothing else
    assert set(probe_vocabulary()) - set(vocabulary()) == {"yes", "no", "appear", "before", "of", "above", "below"}


def test_direction_probes_show_the_motion_in_the_pixels():
    # Independent of the boxes: the centre of the object's colour moves the way the basic question says.
    checked = 0
    for p in make_video_probes(90, seed=5, types=["temporal"]):
        m = re.fullmatch(r"does the (\w+) (\w+) move (\w+) \?", p.basic)
        if m is None or sum(o.color == m[1] for o in p.objects) != 1:
            continue
        first = min(o.appears for o in p.objects if o.color == m[1])
        centres = [np.argwhere((p.frames[t] == COLORS[m[1]]).all(-1)).mean(0) for t in (first, 15)]  # (y, x)
        dx, dy = DIRECTIONS[m[3]]
        assert np.sign(centres[1] - centres[0]).tolist() == [dy, dx]
        checked += 1
    assert checked > 20


def test_questions_need_what_the_shown_frames_show():
    shown = sample_frame_indices(16, 2)  # frames 4 and 12: objects appearing at 0 and 4 look simultaneous
    assert shown == [4, 12]
    probes = make_video_probes(400, seed=1, types=["temporal", "semantic"], shown_frames=shown)
    ties = 0
    for p in probes:
        assert _is_true(p.basic, p.objects, 16) and not _is_true(p.hallucinated, p.objects, 16)
        if p.detail == "order":
            m = re.fullmatch(r"does the (\w+) (\w+) appear before the (\w+) (\w+) \?", p.basic)
            a, b = _one(p.objects, color=m[1], shape=m[2]), _one(p.objects, color=m[3], shape=m[4])
            assert any(a.appears <= t < b.appears for t in shown) and b.appears <= shown[-1]
            # another pair of the clip looked simultaneous in the shown frames, and was not asked about
            ties += any(
                x.appears < y.appears and not any(x.appears <= t < y.appears for t in shown)
                for x in p.objects
                for y in p.objects
            )
        else:  # the object the question is about is in both shown frames, so its motion is seen
            color, shape, direction = _referent(p.basic)
            match = {k: v for k, v in (("color", color), ("shape", shape), ("direction", direction)) if v}
            assert _one(p.objects, **match).appears <= shown[0]
    assert ties > 0  # clips with a tie were drawn, and their tied pair was not asked about
    # without shown frames the same seed asks about late objects too
    late = [p for p in make_video_probes(400, seed=1, types=["temporal", "semantic"]) if p.detail != "order"]
    assert any(_one(p.objects, **_match(p.basic)).appears > 4 for p in late)


def _referent(question: str) -> tuple[str | None, str | None, str | None]:
    if m := re.fullmatch(r"does the (\w+) (\w+) move \w+ \?", question):
        return m[1], m[2], None
    if m := re.fullmatch(r"is the (\w+) that moves (\w+) \w+ \?", question):
        return None, m[1], m[2]
    m = re.fullmatch(r"is the (\w+) shape that moves (\w+) a \w+ \?", question)
    return m[1], None, m[2]


def _match(question: str) -> dict[str, str]:
    return {k: v for k, v in zip(("color", "shape", "direction"), _referent(question), strict=True) if v}


def test_probes_are_deterministic_and_balanced():
    a, b = make_video_probes(12, seed=2), make_video_probes(12, seed=2)
    assert a == b and all(np.array_equal(p.frames, q.frames) for p, q in zip(a, b, strict=True))
    assert make_video_probes(20, seed=2)[:12] == a  # probe i does not depend on how many were made
    assert [p.basic for p in make_video_probes(12, seed=3)] != [p.basic for p in a]
    assert Counter(p.kind for p in make_video_probes(30)) == {k: 10 for k in PROBE_TYPES}
    weighted = make_video_probes(30, types=["temporal", "temporal", "relation"])
    assert Counter(p.kind for p in weighted) == {"temporal": 20, "relation": 10}
    details = Counter(p.detail for p in make_video_probes(600))
    for kind, (first, second) in PROBE_DETAILS.items():  # details drawn with even odds within a type
        assert 0.4 < details[first] / (details[first] + details[second]) < 0.6, (kind, details)


def test_impossible_probes_are_refused():
    with pytest.raises(ValueError, match="probe types"):
        make_video_probes(3, types=["factual"])
    with pytest.raises(ValueError, match="probe types"):
        VideoHallucinationEval(types=["temporal", "count"])
    with pytest.raises(ValueError, match="relation"):
        make_video_probes(3, types=["relation"], max_objects=1)
    with pytest.raises(ValueError, match="shown_frames"):
        make_video_probes(3, shown_frames=[16])


# ---------------------------------------------------------------- scoring


def test_parse_yes_no():
    assert [parse_yes_no(a) for a in ("yes .", "Yes, it does", " NO .", "no", "yesterday", "", "it is yes")] == [
        True,
        True,
        False,
        False,
        None,
        None,
        None,
    ]


def test_scores_by_hand():
    probes = make_video_probes(6)  # temporal, semantic, relation, temporal, semantic, relation
    answers = [
        ("yes .", "no ."),  # temporal: both right
        ("yes", "yes"),  # semantic: basic right, hallucinated wrong
        ("No", "no ."),  # relation: basic wrong, hallucinated right
        ("yes yes", "maybe"),  # temporal: basic right, hallucinated unparsable (wrong)
        ("", "no"),  # semantic: basic unparsable, hallucinated right
        ("yes .", "no"),  # relation: both right
    ]
    counts = count_answers(probes, answers)
    assert {k: dict(zip(COUNT_FIELDS, c, strict=True)) for k, c in counts.items()} == {
        "temporal": {
            "pairs": 2,
            "basic_correct": 2,
            "hallucinated_correct": 1,
            "pair_correct": 1,
            "yes_answers": 2,
            "unparsable": 1,
        },
        "semantic": {
            "pairs": 2,
            "basic_correct": 1,
            "hallucinated_correct": 1,
            "pair_correct": 0,
            "yes_answers": 2,
            "unparsable": 1,
        },
        "relation": {
            "pairs": 2,
            "basic_correct": 1,
            "hallucinated_correct": 2,
            "pair_correct": 1,
            "yes_answers": 1,
            "unparsable": 0,
        },
    }
    m = score(probes, answers)
    assert m["temporal"] == {
        "basic_acc": 1.0,
        "hallucinated_acc": 0.5,
        "pair_acc": 0.5,
        "yes_ratio": 0.5,
        "unparsable": 0.25,
    }
    assert m["semantic"] == {
        "basic_acc": 0.5,
        "hallucinated_acc": 0.5,
        "pair_acc": 0.0,
        "yes_ratio": 0.5,
        "unparsable": 0.25,
    }
    assert m["relation"] == {
        "basic_acc": 0.5,
        "hallucinated_acc": 1.0,
        "pair_acc": 0.5,
        "yes_ratio": 0.25,
        "unparsable": 0.0,
    }
    assert m[OVERALL] == pytest.approx(
        {"basic_acc": 4 / 6, "hallucinated_acc": 4 / 6, "pair_acc": 2 / 6, "yes_ratio": 5 / 12, "unparsable": 2 / 12}
    )
    # a model that always says yes is right on every basic question and on no pair
    always_yes = score(probes, [("yes", "yes")] * 6)[OVERALL]
    assert always_yes == {
        "basic_acc": 1.0,
        "hallucinated_acc": 0.0,
        "pair_acc": 0.0,
        "yes_ratio": 1.0,
        "unparsable": 0.0,
    }
    assert metrics_from_counts([0.0] * len(COUNT_FIELDS)) == {}
    assert score([], []) == {OVERALL: {}}


# ---------------------------------------------------------------- the callback


@pytest.fixture(scope="module")
def video_setup(tmp_path_factory):
    """A tiny LLaVA-NeXT-Video that knows the world's and the probes' words, and a small 32 px world."""
    from datamodules.worlds.video import write_video_world
    from mmpo.tiny.llava import build_tiny_llava

    root = tmp_path_factory.mktemp("video-hallucination")
    write_video_world(root / "world", n_train=2, n_val=2, num_frames=16, size=32)
    words = [*vocabulary(), *probe_vocabulary()]
    return root / "world", build_tiny_llava(root / "model", words, image_size=32, video=True)


def test_validate_logs_the_video_probe_metrics(video_setup):
    import torch
    from transformers import AutoProcessor

    from datamodules import VideoPreferenceDataModule
    from mmpo.backbones import VisionLanguageBackbone
    from mmpo.losses import SFTLoss
    from mmpo.module import PreferenceModule

    world, model_dir = video_setup
    callback = VideoHallucinationEval(n_probes=6, size=32, max_new_tokens=3, batch_size=6)
    module = PreferenceModule(VisionLanguageBackbone(str(model_dir)), SFTLoss())
    dm = VideoPreferenceDataModule(
        str(model_dir), world / "train.jsonl", world / "val.jsonl", loader={"batch_size": 2}, frames={"num_frames": 4}
    )
    trainer = quiet_trainer(callbacks=[callback])
    (results,) = trainer.validate(module, datamodule=dm, verbose=False)
    # The model sees the frames the datamodule would give it: 4 of the 16, uniformly (all 16 without one).
    assert callback.shown_frames(trainer) == [2, 6, 10, 14] and callback.shown_frames() == list(range(16))
    probes = make_video_probes(6, size=32, shown_frames=[2, 6, 10, 14])
    assert [p for p, _ in callback.last_answers] == probes  # every probe, in order
    # The logged figures are those of the policy's own greedy answers, generated again here, scored by `score`.
    processor = AutoProcessor.from_pretrained(model_dir)
    questions = [q for p in probes for q in (p.basic, p.hallucinated)]
    videos = [p.frames[[2, 6, 10, 14]] for p in probes for _ in range(2)]
    flat = generate_answers(module.policy, processor, questions, videos=videos, max_new_tokens=3)
    answers = list(zip(flat[0::2], flat[1::2], strict=True))
    assert [a for _, a in callback.last_answers] == answers
    expected = {
        f"val/video_hallucination/{kind}/{name}": value
        for kind, metrics in score(probes, answers).items()
        for name, value in metrics.items()
    }
    assert len(expected) == 4 * 5  # three types and overall, five metrics each
    logged = {k: v for k, v in results.items() if "/video_hallucination/" in k}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert 0.0 <= logged[key] <= 1.0 and logged[key] == pytest.approx(value), key
    assert "val/loss" in results  # the ordinary validation still ran

    # A policy forced to answer "yes" to everything: every basic question right, no pair right.
    yes = processor.tokenizer.convert_tokens_to_ids("yes")
    head = module.policy.get_output_embeddings()

    def always_yes(_module, _inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., yes] = 0.0
        return forced

    test_dm = VideoPreferenceDataModule(
        str(model_dir), test_file=world / "val.jsonl", loader={"batch_size": 2}, frames={"num_frames": 4}
    )
    handle = head.register_forward_hook(always_yes)
    try:
        (results,) = quiet_trainer(callbacks=[callback]).test(module, datamodule=test_dm, verbose=False)
    finally:
        handle.remove()
    assert all(a == ("yes yes yes", "yes yes yes") for _, a in callback.last_answers)
    for kind in (*PROBE_TYPES, OVERALL):
        want = {"basic_acc": 1.0, "hallucinated_acc": 0.0, "pair_acc": 0.0, "yes_ratio": 1.0, "unparsable": 0.0}
        assert {name: results[f"test/video_hallucination/{kind}/{name}"] for name in want} == want


def test_callback_from_yaml():
    import lightning as L
    from helpers.config import instantiate
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    cfg = parser.parse_string(
        "callbacks:\n"
        "  - class_path: mmpo.video_hallucination.VideoHallucinationEval\n"
        "    init_args: {n_probes: 9, types: [temporal, relation], num_frames: 8}\n"
    )
    (callback,) = instantiate(parser, cfg).callbacks
    assert isinstance(callback, VideoHallucinationEval)
    assert (callback.n_probes, callback.types, callback.num_frames) == (9, ["temporal", "relation"], 8)
    assert callback.shown_frames() == [1, 3, 5, 7, 9, 11, 13, 15]
