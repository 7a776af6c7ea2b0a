"""CHAIR-style and POPE-style hallucination probes: probes, scoring by hand, and the callback in `validate`."""

from __future__ import annotations

import pytest
from helpers.trainers import quiet_trainer

from datamodules.shapes_world import objects_in_text
from mmpo.hallucination import (
    COUNT_FIELDS,
    HallucinationEval,
    Probe,
    make_probes,
    mentioned_objects,
    metrics_from_counts,
    score,
)


def test_probes_are_deterministic_and_point_at_the_target():
    a, b = make_probes("sequence3", 5, 5, seed=3), make_probes("sequence3", 5, 5, seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert all(
        x.tobytes() == y.tobytes() for p, q in zip(a, b, strict=True) for x, y in zip(p.images, q.images, strict=True)
    )
    assert [p.prompt for p in make_probes("sequence3", 5, 5, seed=4)] != [p.prompt for p in a]
    for p in a:
        assert len(p.images) == 3 == p.prompt.count("<image>")
        assert "In Image" in p.prompt
        assert objects_in_text(p.caption) == set(p.truth)  # the caption names exactly the target's objects
    single = make_probes("single", 2, 2)
    assert all(len(p.images) == 1 and p.prompt.startswith("<image>\n") for p in single)
    grid = make_probes("grid4", 1, 0, image_size=32)[0]
    assert len(grid.images) == 1 and grid.images[0].size[0] > 64
    assert (
        "center" in make_probes("pic_in_pic", 1, 0)[0].prompt or "centre" in make_probes("pic_in_pic", 1, 0)[0].prompt
    )


def test_presence_labels_are_balanced_and_absent_objects_come_from_companions():
    probes = make_probes("sequence3", 0, 200, seed=0)
    labels = [p.label for p in probes]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    for p in probes:
        question_object = tuple(p.prompt.split("is there a ")[1].split(" in the image")[0].split())
        assert (question_object in p.truth) == p.label


@pytest.mark.parametrize("setting", ["sequence", "grid5", "triple", "single3"])
def test_unknown_settings_are_refused(setting):
    with pytest.raises(ValueError, match="probe setting"):
        make_probes(setting, 1, 1)
    with pytest.raises(ValueError, match="probe setting"):
        HallucinationEval(settings=[setting])


def _probe(kind, truth, label=None, caption=""):
    return Probe("single", kind, "<image>\nq", (), frozenset(truth), caption, label)


def test_scores_by_hand():
    truth = {("red", "circle"), ("blue", "square")}
    probes = [
        _probe("caption", truth, caption="a red circle and a blue square ."),
        _probe("caption", truth, caption="a red circle and a blue square ."),
        _probe("caption", truth, caption="a red circle and a blue square ."),
        _probe("presence", truth, label=True),
        _probe("presence", truth, label=False),
        _probe("presence", truth, label=False),
        _probe("presence", truth, label=True),
    ]
    answers = [
        "a red circle and a blue square .",  # exact, nothing invented
        "a red circle , a green diamond and a blue circle .",  # 2 of 3 named objects invented
        "a square and a diamond .",  # bare shapes: the square is there, no diamond is
        "yes .",
        "yes .",  # false yes
        "no .",
        "maybe",  # neither: wrong
    ]
    counts = score(probes, answers)["single"]
    c = dict(zip(COUNT_FIELDS, counts, strict=True))
    assert c == {
        "captions": 3,
        "hallucinated_captions": 2,
        "mentions": 7,
        "hallucinated_mentions": 3,
        "truth_objects": 6,
        "recalled_objects": 3,
        "exact_captions": 1,
        "questions": 4,
        "correct": 2,
        "yes_answers": 2,
        "true_yes": 1,
        "label_yes": 2,
    }
    m = metrics_from_counts(counts)
    assert m["chair_s"] == pytest.approx(2 / 3)
    assert m["chair_i"] == pytest.approx(3 / 7)
    assert m["object_recall"] == pytest.approx(3 / 6)
    assert m["caption_exact"] == pytest.approx(1 / 3)
    assert m["pope_accuracy"] == pytest.approx(2 / 4)
    assert m["pope_yes_ratio"] == pytest.approx(2 / 4)
    assert m["pope_f1"] == pytest.approx(2 * 1 / (2 + 2))  # precision 1/2, recall 1/2


def test_mentions_with_and_without_colour():
    assert mentioned_objects("a red circle , a square and a Blue diamond .") == {
        ("red", "circle"),
        (None, "square"),
        ("blue", "diamond"),
    }
    assert mentioned_objects("yes .") == set()


def test_metrics_without_a_denominator_are_left_out():
    m = metrics_from_counts([0.0] * len(COUNT_FIELDS))
    assert m == {}


def test_validate_logs_the_probe_metrics(world, tiny_llava, processor):

    from datamodules import ImagePreferenceDataModule
    from mmpo.backbones import VisionLanguageBackbone
    from mmpo.generation import generate_answers
    from mmpo.losses import SFTLoss
    from mmpo.module import PreferenceModule

    callback = HallucinationEval(settings=["single", "sequence2"], n_captions=3, n_questions=3, max_new_tokens=6)
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava)), SFTLoss())
    dm = ImagePreferenceDataModule(str(tiny_llava), world / "train.jsonl", world / "val.jsonl", batch_size=8)
    trainer = quiet_trainer(callbacks=[callback])
    (results,) = trainer.validate(module, datamodule=dm, verbose=False)
    for setting in ("single", "sequence2"):
        for name in ("chair_s", "chair_i", "object_recall", "pope_accuracy", "pope_yes_ratio", "pope_f1"):
            if name == "chair_i" and f"val/hallucination/{setting}/{name}" not in results:
                continue  # no object named at all: no denominator
            assert f"val/hallucination/{setting}/{name}" in results
    # The logged figures are those of the policy's own greedy answers.
    probes = callback.probes()
    answers = generate_answers(
        module.policy, processor, [p.prompt for p in probes], [p.images for p in probes], max_new_tokens=6
    )
    assert [a for _, a in callback.last_answers] == answers
    expected = metrics_from_counts(score(probes, answers)["single"])
    assert results["val/hallucination/single/pope_accuracy"] == pytest.approx(expected["pope_accuracy"])
    assert results["val/loss"] > 0  # the ordinary validation metrics are still there
