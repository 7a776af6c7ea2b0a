"""POPE / CHAIR / MMHal-Bench on files in their real formats, written here: readers, scores by hand, bad
inputs, the callback in ``validate`` and ``mmpo eval-hallucination``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.trainers import quiet_trainer
from PIL import Image

from mmpo.benchmark_files import ChairSettings, MMHalSettings, PopeSettings, load_judge, read_pope
from mmpo.coco_synonyms import COCO_CLASSES, mentions, phrase_table, plural, read_synonyms
from mmpo.hallucination_benchmarks import (
    FIELDS,
    BenchmarkHallucinationEval,
    HallucinationBenchmarks,
    format_table,
    metrics_from_counts,
    pope_answer,
)

# ---------------------------------------------------------------- files in the benchmarks' formats


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


_Q = "COCO_val2014_00000000000"
POPE_RANDOM = [  # labels Y Y N N Y
    {"question_id": 1, "image": _Q + "1.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": _Q + "1.jpg", "text": "Is there a man in the image?", "label": "yes"},
    {"question_id": 3, "image": _Q + "2.jpg", "text": "Is there a dog in the image?", "label": "no"},
    {"question_id": 4, "image": _Q + "2.jpg", "text": "Is there a car in the image?", "label": "no"},
    {"question_id": 5, "image": _Q + "2.jpg", "text": "Is there a cat in the image?", "label": "yes"},
]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("benchmarks")
    images = root / "val2014"
    for i, colour in ((1, (200, 30, 30)), (2, (30, 200, 30)), (3, (30, 30, 200))):
        _image(images / f"COCO_val2014_{i:012d}.jpg", colour)
    pope = root / "pope"
    pope.mkdir()
    _jsonl(pope / "coco_pope_random.json", POPE_RANDOM)
    _jsonl(pope / "coco_pope_adversarial.json", [{**q, "label": "no"} for q in POPE_RANDOM[:2]])
    categories = [{"id": i + 1, "name": name, "supercategory": "x"} for i, name in enumerate(COCO_CLASSES)]
    cat = {c["name"]: c["id"] for c in categories}
    instances = {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (1, 2, 3)],
        "annotations": [  # image 1: person, dog, bicycle (person twice); image 2: cat, couch; image 3: none
            {"id": n, "image_id": image, "category_id": cat[name], "iscrowd": 0}
            for n, (image, name) in enumerate(
                [(1, "person"), (1, "person"), (1, "dog"), (1, "bicycle"), (2, "cat"), (2, "couch")]
            )
        ],
        "categories": categories,
    }
    (root / "instances_val2014.json").write_text(json.dumps(instances))
    refs = {"annotations": [{"image_id": 1, "id": 9, "caption": "A man next to a hot dog stand."},
                            {"image_id": 77, "id": 10, "caption": "A cat."}]}  # fmt: skip
    (root / "captions_val2014.json").write_text(json.dumps(refs))
    mmhal = root / "mmhal"
    _image(mmhal / "images" / "10010552063_2c4bd3a4d0_o.jpg", (9, 9, 9))
    _image(mmhal / "images" / "local.png", (90, 90, 90))
    records = [
        {"question_type": "attribute", "question": "What colour is the car?", "gt_answer": "red",
         "image_src": "https://c1.staticflickr.com/1/10010552063_2c4bd3a4d0_o.jpg", "image_content": ["car"]},
        {"question_type": "attribute", "question": "What colour is the sky?", "gt_answer": "blue",
         "image_src": "https://c1.staticflickr.com/1/10010552063_2c4bd3a4d0_o.jpg", "image_content": ["sky"]},
        {"question_type": "counting", "question": "How many dogs?", "gt_answer": "two", "image": "local.png",
         "image_content": ["dog"]},
    ]  # fmt: skip
    (mmhal / "response_template.json").write_text(json.dumps(records))
    return {"root": root, "images": images, "pope": pope, "instances": root / "instances_val2014.json",
            "captions": root / "captions_val2014.json", "mmhal": mmhal / "response_template.json",
            "mmhal_images": mmhal / "images"}  # fmt: skip


def keyword_judge(record: dict, answer: str) -> float:
    """6 when the reference answer's word is in the answer, else 1 (a stand-in for an LLM judge)."""
    return 6.0 if record["gt_answer"] in answer.lower() else 1.0


def out_of_range_judge(record: dict, answer: str) -> float:
    return 7.0


# ---------------------------------------------------------------- the synonym table


def test_caption_mentions_by_hand():
    table = phrase_table()
    # synonyms and plurals map to the class; "hot dog" is one object and no dog; each mention counts
    assert mentions("A man and two women eat hot dogs next to a dog.", table) == ["person", "person", "hot dog", "dog"]
    assert mentions("Two traffic-lights, three buses, knives, skis and mice.", table) == [
        "traffic light", "bus", "knife", "skis", "mouse",
    ]  # fmt: skip
    # a young animal is the animal, not a person; "orange" before an object is a colour; a field is no ball
    assert mentions("A baby elephant and an orange cat on a baseball field.", table) == ["elephant", "cat"]
    assert mentions("A bowl with an orange.", table) == ["bowl", "orange"]
    assert mentions("Puppies on a sofa near a TV.", table) == ["dog", "couch", "tv"]
    assert mentions("A quiet empty street at night.", table) == []  # a caption that names no object
    assert mentions("", table) == []
    assert [plural(w) for w in ("bus", "couch", "toothbrush", "sandwich", "teddy bear", "person", "man", "knife")] == [
        "buses", "couches", "toothbrushes", "sandwiches", "teddy bears", "persons", "men", "knives",
    ]  # fmt: skip
    assert plural("lady") == "ladies" and plural("toy") == "toys"


def test_phrase_table_covers_coco_and_keeps_to_given_classes():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    table = phrase_table()
    for name in COCO_CLASSES:  # every class names itself, singular and plural
        assert mentions(name, table) == [name] and mentions(plural(name), table) == [name], name
    # classes outside the annotation file's categories name nothing: their presence cannot be checked
    only = phrase_table(classes={"dog", "cat"})
    assert mentions("a dog chases a cat past a car and a man", only) == ["dog", "cat"]


def test_user_synonym_files(tmp_path):
    text = tmp_path / "synonyms.txt"
    text.write_text("# class, synonyms\ndog, pooch, hound\n\nperson, fellow\n")
    assert read_synonyms(text) == {"dog": ("pooch", "hound"), "person": ("fellow",)}
    (tmp_path / "s.json").write_text(json.dumps({"Dog": ["Pooch"]}))
    assert read_synonyms(tmp_path / "s.json") == {"dog": ("pooch",)}
    (tmp_path / "bad.txt").write_text("dog, pooch\ncat, , kitty\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: an empty name"):
        read_synonyms(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text(json.dumps({"dog": "pooch"}))
    with pytest.raises(ValueError, match=r"bad.json: expected"):
        read_synonyms(tmp_path / "bad.json")


# ---------------------------------------------------------------- POPE


def test_pope_answer_rules():
    # POPE's rule: the first sentence says no when it holds "no" or "not"; anything else is yes
    for answer, said in [("Yes, there is a dog.", True), ("There is no dog in the image.", False), ("No", False),
                         ("I do not see one", False), ("Yes. But not a big one.", True), ("", True),
                         ("Nope", True), ("no, none.", False)]:  # fmt: skip
        assert pope_answer(answer, "pope") is said, answer
    assert [pope_answer(a, "first_word") for a in ("Yes, it is.", "no", "There is no dog.", "")] == [
        True, False, None, None,
    ]  # fmt: skip


def test_pope_scores_by_hand(files):
    bench = HallucinationBenchmarks(
        pope=PopeSettings(
            [str(p) for p in sorted(files["pope"].glob("*.json"))], str(files["images"]), answer_rule="first_word"
        )
    )
    assert list(bench.load()) == ["pope_adversarial", "pope_random"]  # split names from the file names
    counts, answers = bench.score(
        {"pope_random": ["yes", "No, it is not.", "yes", "no", "maybe"], "pope_adversarial": ["yes", "yes"]}
    )
    # labels Y Y N N Y: TP 1 (q1), FN 2 (q2, q5 unparsable), FP 1 (q3), TN 1 (q4)
    assert dict(zip(FIELDS["pope"], counts["pope_random"], strict=True)) == {
        "questions": 5, "label_yes": 3, "said_yes": 2, "true_yes": 1, "true_no": 1, "unparsable": 1,
    }  # fmt: skip
    m = bench.metrics(counts)
    assert m["pope_random"] == pytest.approx(
        {"accuracy": 2 / 5, "precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5, "yes_ratio": 2 / 5, "unparsable": 1 / 5}
    )
    # all labels no, all answers yes: nothing right, no recall denominator, precision 0
    assert m["pope_adversarial"] == {"accuracy": 0.0, "precision": 0.0, "f1": 0.0, "yes_ratio": 1.0, "unparsable": 0.0}
    assert [a["said"] for a in answers["pope_random"]] == [True, False, True, False, None]
    assert [a["question_id"] for a in answers["pope_random"]] == [1, 2, 3, 4, 5]
    # sharded over two ranks, the counts add up to the same
    halves = [bench.score({t: [a["answer"] for a in answers[t]][r::2] for t in answers}, r, 2)[0] for r in (0, 1)]
    assert [x + y for x, y in zip(halves[0]["pope_random"], halves[1]["pope_random"], strict=True)] == counts[
        "pope_random"
    ]
    table = format_table(m)
    assert "| pope | accuracy | precision | recall | f1 | yes_ratio | unparsable |" in table
    assert "| pope_random | 0.4000 | 0.5000 | 0.3333 | 0.4000 | 0.4000 | 0.2000 |" in table


def test_pope_split_names_and_limits(files):
    random_file = files["pope"] / "coco_pope_random.json"
    bench = HallucinationBenchmarks(pope=PopeSettings([f"mine={random_file}"], str(files["images"]), max_questions=2))
    assert {t: len(r) for t, r in bench.load().items()} == {"pope_mine": 2}
    with pytest.raises(ValueError, match="pope.files is empty"):
        PopeSettings([])
    with pytest.raises(ValueError, match="two POPE files for the split 'random'"):
        HallucinationBenchmarks(pope=PopeSettings([str(random_file)] * 2, str(files["images"]))).load()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question_id": 7, "image": "COCO_val2014_000000000001.jpg", "text": "Is', "not a JSON object"),
        ({"question_id": 7, "image": "COCO_val2014_000000000001.jpg", "text": "Is there?", "label": "maybe"},
         "label must be 'yes' or 'no'"),
        ({"question_id": 7, "image": "COCO_val2014_000000000009.jpg", "text": "Is there?", "label": "no"},
         "COCO_val2014_000000000009.jpg not found"),
        ({"question_id": 7, "image": "COCO_val2014_000000000001.jpg", "label": "no"}, "expected an object"),
    ],
)  # fmt: skip
def test_bad_pope_lines_name_file_and_line(files, tmp_path, line, message):
    path = _jsonl(tmp_path / "coco_pope_popular.json", [POPE_RANDOM[0], line])
    with pytest.raises(ValueError, match=rf"coco_pope_popular.json:2: .*{message}"):
        read_pope(path, files["images"])
    with pytest.raises(ValueError, match="answer_rule"):
        PopeSettings([str(path)], answer_rule="last_word")
    with pytest.raises(ValueError, match="no benchmark"):
        HallucinationBenchmarks()


# ---------------------------------------------------------------- CHAIR


CAPTIONS = [
    "A man rides past his dog and two hot dogs.",  # person, dog, hot dog (hallucinated)
    "A kitten sleeps on a sofa next to an orange cat.",  # cat, couch, cat: all present
    "An empty room.",  # no mention
]


def _chair(files: dict, **kw) -> HallucinationBenchmarks:
    return HallucinationBenchmarks(chair=ChairSettings(str(files["instances"]), str(files["images"]), **kw))


def test_chair_scores_by_hand(files):
    bench = _chair(files)
    assert [(r["image_id"], sorted(r["objects"])) for r in bench.load()["chair"]] == [
        (1, ["bicycle", "dog", "person"]), (2, ["cat", "couch"]), (3, []),
    ]  # fmt: skip
    counts, answers = bench.score({"chair": CAPTIONS})
    # 3 captions, 1 with a hallucination; 6 mentions, 1 hallucinated; objects 3 + 2 + 0, of which
    # person, dog, cat, couch named; 10 + 11 + 3 words
    assert dict(zip(FIELDS["chair"], counts["chair"], strict=True)) == {
        "captions": 3, "hallucinated_captions": 1, "mentions": 6, "hallucinated_mentions": 1, "objects": 5,
        "recalled": 4, "words": 24,
    }  # fmt: skip
    assert bench.metrics(counts)["chair"] == pytest.approx(
        {"chair_s": 1 / 3, "chair_i": 1 / 6, "recall": 4 / 5, "words": 24 / 3}
    )
    assert answers["chair"][0]["named"] == ["person", "dog", "hot dog"]
    assert answers["chair"][0]["hallucinated"] == ["hot dog"]
    # an image without objects: every mention is a hallucination; no mention at all: no chair_i
    counts, _ = bench.score({"chair": ["", "", "Two people and a cat."]})
    assert bench.metrics(counts)["chair"] == pytest.approx({"chair_s": 1 / 3, "chair_i": 2 / 2, "recall": 0.0,
                                                            "words": 5 / 3})  # fmt: skip
    counts, _ = bench.score({"chair": ["", "", ""]})
    assert bench.metrics(counts)["chair"] == {"chair_s": 0.0, "recall": 0.0, "words": 0.0}


def test_chair_reference_captions_synonyms_and_sampling(files, tmp_path):
    # the reference caption of image 1 names a hot dog: it counts as present, as in CHAIR
    bench = _chair(files, reference_captions=str(files["captions"]))
    counts, _ = bench.score({"chair": CAPTIONS})
    assert bench.metrics(counts)["chair"]["chair_i"] == 0.0
    # a user synonym adds to the table, or replaces it
    (tmp_path / "syn.txt").write_text("dog, pooch\n")
    added = _chair(files, synonyms=str(tmp_path / "syn.txt"))
    assert added.score({"chair": ["a pooch and a man", "", ""]})[1]["chair"][0]["named"] == ["dog", "person"]
    replaced = _chair(files, synonyms=str(tmp_path / "syn.txt"), replace_synonyms=True)
    assert replaced.score({"chair": ["a pooch and a man", "", ""]})[1]["chair"][0]["named"] == ["dog"]
    # a seeded draw of images, the same for the same seed
    drawn = [[r["image_id"] for r in _chair(files, num_images=2, seed=s).load()["chair"]] for s in (0, 0, 1, 2, 3)]
    assert drawn[0] == drawn[1] and all(len(d) == 2 == len(set(d)) for d in drawn)
    assert len({tuple(d) for d in drawn}) > 1


def test_bad_coco_files(files, tmp_path):
    data = json.loads(files["instances"].read_text())
    (tmp_path / "a.json").write_text(json.dumps({**data, "annotations": [{"image_id": 1, "category_id": 999}]}))
    with pytest.raises(ValueError, match=r"a.json: annotations\[0\]: unknown image_id or category_id"):
        _chair({"instances": tmp_path / "a.json", "images": files["images"]}).load()
    (tmp_path / "b.json").write_text(json.dumps({**data, "images": [{"id": 1, "file_name": "missing.jpg"}],
                                                 "annotations": []}))  # fmt: skip
    with pytest.raises(ValueError, match=r"b.json: image 1: image .*missing.jpg not found"):
        _chair({"instances": tmp_path / "b.json", "images": files["images"]}).load()
    (tmp_path / "refs.json").write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"refs.json: annotations\[0\]: no caption"):
        _chair(
            {"instances": files["instances"], "images": files["images"]}, reference_captions=str(tmp_path / "refs.json")
        ).load()
    (tmp_path / "c.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="expected COCO instances"):
        _chair({"instances": tmp_path / "c.json", "images": files["images"]}).load()


# ---------------------------------------------------------------- MMHal-Bench


def test_mmhal_scores_by_hand(files):
    settings = MMHalSettings(str(files["mmhal"]), str(files["mmhal_images"]), judge=f"{__name__}.keyword_judge")
    bench = HallucinationBenchmarks(mmhal=settings)
    records = bench.load()["mmhal"]
    # the URL's file name is looked up in the image folder; nothing is downloaded
    assert [r["image"].name for r in records] == ["10010552063_2c4bd3a4d0_o.jpg"] * 2 + ["local.png"]
    counts, answers = bench.score({"mmhal": ["It is red.", "Green.", "There are two dogs."]})
    assert [a["score"] for a in answers["mmhal"]] == [6.0, 1.0, 6.0]
    assert bench.metrics(counts) == {
        "mmhal": pytest.approx(
            {"score": 13 / 3, "hallucination_rate": 1 / 3, "score_attribute": 3.5, "score_counting": 6.0}
        )
    }
    assert "| mmhal | 4.3333 | 0.3333 | 3.5000 | 6.0000 |" in format_table(bench.metrics(counts))
    # without a judge, the answers are kept, unscored
    plain = HallucinationBenchmarks(mmhal=MMHalSettings(str(files["mmhal"]), str(files["mmhal_images"])))
    counts, answers = plain.score({"mmhal": ["a", "b", "c"]})
    assert plain.rows() == [] and plain.metrics(counts) == {} and "score" not in answers["mmhal"][0]


def test_mmhal_bad_inputs(files, tmp_path):
    bad = HallucinationBenchmarks(
        mmhal=MMHalSettings(str(files["mmhal"]), str(files["mmhal_images"]), judge=f"{__name__}.out_of_range_judge")
    )
    with pytest.raises(ValueError, match=r"response_template.json: record 0: the judge gave 7.0"):
        bad.score({"mmhal": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="cannot be imported"):
        load_judge("no_such_module.judge")
    with pytest.raises(ValueError, match="names no callable"):
        load_judge("json")
    with pytest.raises(ValueError, match="names no callable"):
        load_judge("json.no_such_name")
    assert load_judge("json:dumps") is json.dumps and load_judge(keyword_judge) is keyword_judge
    (tmp_path / "my_judge.py").write_text("class Judge:\n    def __call__(self, record, answer):\n        return 2.5\n")
    assert load_judge(f"{tmp_path / 'my_judge.py'}:Judge")({}, "") == 2.5  # a file's class, instantiated
    with pytest.raises(ValueError, match="cannot be imported"):
        load_judge(f"{tmp_path / 'missing.py'}:Judge")
    records = json.loads(files["mmhal"].read_text())
    (tmp_path / "m.json").write_text(json.dumps([records[0], {**records[2], "image": "nowhere.png"}]))
    with pytest.raises(ValueError, match=r"m.json: record 1: image .*nowhere.png not found"):
        HallucinationBenchmarks(mmhal=MMHalSettings(str(tmp_path / "m.json"), str(files["mmhal_images"]))).load()


def test_metrics_without_a_denominator_are_left_out():
    assert all(metrics_from_counts(kind, [0.0] * len(fields)) == {} for kind, fields in FIELDS.items())
    assert format_table({}) == ""


# ---------------------------------------------------------------- on a model


def _all(files, **pope) -> dict:
    return {
        "pope": PopeSettings([str(files["pope"] / "coco_pope_random.json")], str(files["images"]), max_new_tokens=3),
        "chair": ChairSettings(str(files["instances"]), str(files["images"]), max_new_tokens=5),
        "mmhal": MMHalSettings(
            str(files["mmhal"]), str(files["mmhal_images"]), judge=f"{__name__}.keyword_judge", max_new_tokens=4
        ),
    }


def test_validate_logs_and_writes_the_benchmark_metrics(files, world, tiny_llava, tmp_path):
    from datamodules import ImagePreferenceDataModule
    from mmpo.backbones import VisionLanguageBackbone
    from mmpo.losses import SFTLoss
    from mmpo.module import PreferenceModule

    out = tmp_path / "report" / "hallucination.json"
    callback = BenchmarkHallucinationEval(**_all(files), batch_size=8, output_json=str(out))
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava)), SFTLoss())
    dm = ImagePreferenceDataModule(
        str(tiny_llava), world / "train.jsonl", world / "val.jsonl", loader={"batch_size": 8}
    )
    (results,) = quiet_trainer(callbacks=[callback], limit_val_batches=1).validate(module, datamodule=dm, verbose=False)
    # the logged figures are those of the policy's own answers, rescored here
    said = {t: [a.get("answer", a.get("caption")) for a in rows] for t, rows in callback.last_answers.items()}
    assert {t: len(a) for t, a in said.items()} == {"pope_random": 5, "chair": 3, "mmhal": 3}
    counts, _ = callback.benchmarks.score(said)
    expected = callback.benchmarks.metrics(counts)
    # precision needs a "yes" said; the others always have a denominator here
    assert {"accuracy", "recall", "f1", "yes_ratio", "unparsable"} <= set(expected["pope_random"])
    assert set(expected) == {"pope_random", "chair", "mmhal"}
    flat = {f"val/hallucination/{g}/{k}": v for g, m in expected.items() for k, v in m.items()}
    assert {k for k in results if "/hallucination/" in k} == set(flat)
    for key, value in flat.items():
        assert results[key] == pytest.approx(value), key
    report = json.loads(out.read_text())
    assert report["stage"] == "val" and report["metrics"].keys() == expected.keys()
    assert all(report["metrics"][g] == pytest.approx(m) for g, m in expected.items())
    assert report["counts"]["pope_random"]["questions"] == 5 and report["counts"]["chair"]["captions"] == 3
    assert [a["index"] for a in report["answers"]["mmhal"]] == [0, 1, 2]


def test_the_command_writes_json_and_a_table(files, tiny_llava, tmp_path, capsys):
    from mmpo.cli import main

    out = tmp_path / "eval.json"
    main(["eval-hallucination", str(tiny_llava), "--pope", str(files["pope"] / "coco_pope_random.json"),
          "--pope-images", str(files["images"]), "--coco-annotations", str(files["instances"]),
          "--coco-images", str(files["images"]), "--captions", "2", "--caption-tokens", "4", "--max-new-tokens", "2",
          "--mmhal", str(files["mmhal"]), "--mmhal-images", str(files["mmhal_images"]), "--max-questions", "2",
          "--judge", f"{__name__}:keyword_judge", "--device", "cpu", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["stage"] == "eval" and report["model"] == str(tiny_llava)
    assert {t: len(a) for t, a in report["answers"].items()} == {"pope_random": 2, "chair": 2, "mmhal": 2}
    assert "| pope_random |" in printed and "| chair |" in printed and "| mmhal |" in printed
    # the printed table holds the written metrics
    assert f"{report['metrics']['mmhal']['score']:.4f}" in printed
    assert report["counts"]["mmhal"]["answers"] == 2


def test_the_command_refuses_bad_files_before_loading_a_model(files, tmp_path, capsys):
    from mmpo.recipes.eval_hallucination import main

    bad = _jsonl(tmp_path / "coco_pope_random.json", [{**POPE_RANDOM[0], "label": "Y"}])
    with pytest.raises(SystemExit) as e:
        main(["no/such-model", "--pope", str(bad), "--pope-images", str(files["images"])])
    assert e.value.code == 2 and "coco_pope_random.json:1: label must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no/such-model"])
    assert "nothing to evaluate" in capsys.readouterr().err


def test_an_adapter_folder_loads_on_its_base(tiny_llava, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from mmpo.recipes.eval_hallucination import load_model

    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # no processor beside it: the base model's is used
    model, processor = load_model(str(tmp_path / "adapter"), device="cpu")
    assert isinstance(model, PeftModel) and not model.training
    assert processor.tokenizer.get_vocab() == type(processor).from_pretrained(tiny_llava).tokenizer.get_vocab()
    saved = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    loaded = model.state_dict()
    assert saved and all((loaded[k] == v).all() for k, v in saved.items())


def test_callback_from_yaml(files):
    import lightning as L
    from helpers.config import instantiate
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[L.Callback])
    cfg = parser.parse_string(
        "callbacks:\n"
        "  - class_path: mmpo.hallucination_benchmarks.BenchmarkHallucinationEval\n"
        "    init_args:\n"
        f"      pope: {{files: [{files['pope'] / 'coco_pope_random.json'}], image_root: {files['images']}}}\n"
        f"      mmhal: {{file: {files['mmhal']}, judge: {__name__}.keyword_judge, max_questions: 2}}\n"
        "      output_json: hallucination.json\n"
    )
    (callback,) = instantiate(parser, cfg).callbacks
    assert isinstance(callback, BenchmarkHallucinationEval) and callback.output_json == "hallucination.json"
    assert callback.benchmarks.pope.answer_rule == "pope" and callback.benchmarks.chair is None
    assert callback.benchmarks.mmhal.judge == f"{__name__}.keyword_judge"


def test_the_shapes_world_benchmark_files_read_back_and_an_oracle_scores_perfectly(tmp_path):
    # the files of the docs' runnable example (datamodules.worlds.shapes_benchmarks) in the real formats
    from datamodules.worlds.shapes_benchmarks import write_shapes_benchmarks

    out = tmp_path / "bench"
    summary = write_shapes_benchmarks(out, n=12, seed=3)
    assert summary["images"] == 12 and summary["pope_questions_per_split"] == 24
    files = [str(out / f"shapes_pope_{s}.json") for s in ("random", "adversarial")]
    pope = PopeSettings(files=files, image_root=str(out / "images"))
    chair = ChairSettings(annotations=str(out / "instances.json"), image_root=str(out / "images"), num_images=None)
    mmhal = MMHalSettings(
        file=str(out / "mmhal.json"), image_root=str(out / "images"), judge=f"{out / 'judge.py'}:judge"
    )
    bench = HallucinationBenchmarks(pope, chair, mmhal)
    items = bench.load()
    assert len(items["mmhal"]) == summary["mmhal_questions"] > 0
    instances = json.loads((out / "instances.json").read_text())
    truth: dict[int, list[str]] = {}
    names = {c["id"]: c["name"] for c in instances["categories"]}
    for a in instances["annotations"]:
        truth.setdefault(a["image_id"], []).append(names[a["category_id"]])
    ids = {i["file_name"]: i["id"] for i in instances["images"]}
    said = {
        task: [("yes ." if r["label"] else "no .") for r in records]
        for task, records in items.items()
        if task.startswith("pope_")
    }
    said["chair"] = [" and ".join(truth[ids[Path(r["image"]).name]]) + " ." for r in items["chair"]]
    said["mmhal"] = [f"the {r['question'].split()[3]} is {r['record']['gt_answer']} ." for r in items["mmhal"]]
    counts, _ = bench.score(said)
    metrics = bench.metrics(counts)
    for split in ("pope_random", "pope_adversarial"):
        assert metrics[split]["accuracy"] == 1.0 and metrics[split]["yes_ratio"] == 0.5
    assert metrics["chair"]["chair_s"] == 0.0 and metrics["chair"]["recall"] == 1.0
    assert metrics["mmhal"]["score"] == 6.0 and metrics["mmhal"]["hallucination_rate"] == 0.0
