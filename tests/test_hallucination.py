"""CHAIR-style and POPE-style hallucination probes: probes, scoring by hand, and the callback in `validate`."""

from __future__ import annotations

import pytest
from helpers.trainers import quiet_trainer

from augment import PIC_IN_PIC_PHRASINGS
from datamodules.worlds.shapes import objects_in_text
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
        assert objects_in_text(p.caption) == set(p.truth)  # the caption names exactly the target's objects
        # "In Image<k>" names the image that shows the target: its colours (scenes are drawn without
        # anti-aliasing) are exactly those of the target's objects
        k = int(p.prompt.split("In Image")[1].split(",")[0])
        assert {c for c, _ in p.truth} == _colours_in(p.images[k - 1])
    assert {int(p.prompt.split("In Image")[1].split(",")[0]) for p in make_probes("sequence3", 30, 0)} == {1, 2, 3}
    single = make_probes("single", 2, 2)
    for p in single:
        assert len(p.images) == 1 and p.prompt.startswith("<image>\n")
        assert {c for c, _ in p.truth} == _colours_in(p.images[0])
    # a 2 x 2 collage of 32 px tiles under 8 px label bands (a quarter of a tile), 8 px apart, padded
    # square: 2 * 32 + 8 = 72 wide, 2 * (8 + 32) = 80 high -> 80 x 80, 4 px of padding left and right
    targets = set()
    for grid in make_probes("grid4", 4, 4, image_size=32):
        assert len(grid.images) == 1 and grid.images[0].size == (80, 80)
        k = int(grid.prompt.split("In Image")[1].split(",")[0])
        targets.add(k)
        row, col = divmod(k - 1, 2)
        x, y = 4 + 40 * col, 8 + 40 * row
        # the tile the prompt names holds the target scene, unresized (32 px into a 32 px tile): its colours
        assert {c for c, _ in grid.truth} == _colours_in(grid.images[0].crop((x, y, x + 32, y + 32)))
    assert len(targets) > 1
    pic = make_probes("pic_in_pic", 1, 0)[0]
    assert pic.prompt in {f"<image>\n{phrasing}, describe the image ." for phrasing in PIC_IN_PIC_PHRASINGS}


def _colours_in(image) -> set[str]:
    import numpy as np

    from datamodules.worlds.shapes import COLORS

    present = {tuple(int(v) for v in px) for px in np.asarray(image.convert("RGB")).reshape(-1, 3)}
    return {name for name, rgb in COLORS.items() if tuple(rgb) in present}


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
    assert (m["pope_precision"], m["pope_recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 2))


def test_pope_precision_and_recall_positive_is_yes():
    # 10 questions, 6 with "yes" as the label; the model says yes 5 times, 4 of them rightly, and one answer is neither
    c = dict.fromkeys(COUNT_FIELDS, 0.0)
    c.update(questions=10, correct=7, yes_answers=5, true_yes=4, label_yes=6)
    m = metrics_from_counts([c[f] for f in COUNT_FIELDS])
    assert m["pope_precision"] == pytest.approx(4 / 5)
    assert m["pope_recall"] == pytest.approx(4 / 6)
    p, r = 4 / 5, 4 / 6
    assert m["pope_f1"] == pytest.approx(2 * p * r / (p + r))  # the F1 already logged is their harmonic mean
    # the collapse the issue saw: "yes" to everything gives recall 1, precision = the share of yes labels
    c.update(correct=6, yes_answers=10, true_yes=6)
    m = metrics_from_counts([c[f] for f in COUNT_FIELDS])
    assert (m["pope_recall"], m["pope_precision"], m["pope_yes_ratio"]) == (1.0, pytest.approx(0.6), 1.0)
    # "no" to everything: no yes at all, precision and recall 0 (not a division by zero)
    c.update(correct=4, yes_answers=0, true_yes=0)
    m = metrics_from_counts([c[f] for f in COUNT_FIELDS])
    assert (m["pope_precision"], m["pope_recall"], m["pope_f1"]) == (0.0, 0.0, 0.0)


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
    dm = ImagePreferenceDataModule(
        str(tiny_llava), world / "train.jsonl", world / "val.jsonl", loader={"batch_size": 8}
    )
    trainer = quiet_trainer(callbacks=[callback])
    (results,) = trainer.validate(module, datamodule=dm, verbose=False)
    # The logged figures are those of the policy's own greedy answers, every one of them, scored by hand.
    probes = callback.probes()
    answers = generate_answers(
        module.policy, processor, [p.prompt for p in probes], [p.images for p in probes], max_new_tokens=6
    )
    assert [a for _, a in callback.last_answers] == answers
    counts = score(probes, answers)
    expected = {}
    for setting in ("single", "sequence2"):
        c = dict(zip(COUNT_FIELDS, counts[setting], strict=True))
        assert (c["captions"], c["questions"]) == (3, 3)  # every probe was asked
        metrics = metrics_from_counts(counts[setting])
        # chair_i has no denominator when no answer names an object; the others always have one
        assert {"chair_s", "object_recall", "caption_exact", "pope_accuracy", "pope_yes_ratio", "pope_f1"} <= set(
            metrics
        )
        expected |= {f"val/hallucination/{setting}/{name}": value for name, value in metrics.items()}
    logged = {k: v for k, v in results.items() if "/hallucination/" in k}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value), key
    # The ordinary validation metrics are still there: the SFT loss is the mean over the 16 validation
    # records of the chosen response's per-token NLL, computed here from the full logits.
    import torch

    from mmpo.logprobs import response_logprobs

    losses = []
    model = module.policy.eval()
    for batch in dm.val_dataloader():
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.row_media()).logits
        tokens = response_logprobs(logits, batch.input_ids, batch.response_mask)[: batch.num_pairs]
        losses.append(-tokens.sum(-1) / batch.response_mask[: batch.num_pairs].sum(-1))
    losses = torch.cat(losses)
    assert len(losses) == 16
    assert results["val/loss"] == pytest.approx(losses.mean().item(), rel=1e-4)
