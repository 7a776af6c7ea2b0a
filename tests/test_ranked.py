"""Ranked multi-response records: validation, pair expansion, Curry-DPO curriculum, dataset + collator."""

import copy
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from datamodules.core.records import BadSampleError, PreferenceRecord
from datamodules.ranked.lists import (
    RankedPreferenceDataset,
    RankedRecord,
    curriculum_order,
    expand_pairs,
    load_ranked_records,
    parse_ranked_record,
)
from datamodules.vision_text.collator import VisionPreferenceCollator

# Four responses, 2 and 3 tied: scores 4.0 > 2.5 = 2.5 > 1.0.
MIDDLE_TIE = [4.0, 2.5, 1.0, 2.5]
# Four responses, 0 and 1 tied for best: 3 = 3 > 1 > 0.
TOP_TIE = [3.0, 3.0, 1.0, 0.0]
RESPONSES = ["a red circle .", "a blue square .", "a green triangle .", "a yellow diamond ."]


@pytest.fixture(scope="module")
def tiny_processor():
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_processor

    return build_tiny_processor(vocabulary())


def _record(scores=None, ranking=None, rid="q", root=Path(".")) -> RankedRecord:
    raw = {"id": rid, "prompt": "describe the image .", "responses": list(RESPONSES)}
    if scores is not None:
        raw["scores"] = scores
    if ranking is not None:
        raw["ranking"] = ranking
    return parse_ranked_record(raw, "mem:1", root)


def _write(tmp_path: Path, rows: list, name="ranked.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _image(tmp_path: Path, name="a.png", color=(255, 0, 0)) -> str:
    Image.new("RGB", (64, 64), color).save(tmp_path / name)
    return name


def _triples(pairs):
    return [(p.chosen_index, p.rejected_index, p.gap) for p in pairs]


@pytest.mark.parametrize(
    ("scores", "strategy", "want"),
    [
        (MIDDLE_TIE, "best_vs_worst", [(0, 2, 3.0)]),
        (MIDDLE_TIE, "all_pairs", [(0, 1, 1.5), (0, 3, 1.5), (0, 2, 3.0), (1, 2, 1.5), (3, 2, 1.5)]),
        (MIDDLE_TIE, "adjacent", [(0, 1, 1.5), (0, 3, 1.5), (1, 2, 1.5), (3, 2, 1.5)]),
        (MIDDLE_TIE, "best_vs_rest", [(0, 1, 1.5), (0, 3, 1.5), (0, 2, 3.0)]),
        (TOP_TIE, "best_vs_worst", [(0, 3, 3.0)]),
        (TOP_TIE, "all_pairs", [(0, 2, 2.0), (0, 3, 3.0), (1, 2, 2.0), (1, 3, 3.0), (2, 3, 1.0)]),
        (TOP_TIE, "adjacent", [(0, 2, 2.0), (1, 2, 2.0), (2, 3, 1.0)]),
        (TOP_TIE, "best_vs_rest", [(0, 2, 2.0), (0, 3, 3.0)]),
    ],
)
def test_pair_strategies_hand_checked(scores, strategy, want):
    rec = _record(scores)
    pairs = expand_pairs(rec, strategy)
    assert _triples(pairs) == want
    for p in pairs:
        i, j = p.chosen_index, p.rejected_index
        assert scores[i] > scores[j]  # ties never pair; chosen is the higher score
        assert isinstance(p.record, PreferenceRecord)
        assert p.id == p.record.id == f"q#{i}>{j}" and p.source_id == "q"
        assert (p.record.chosen, p.record.rejected) == (RESPONSES[i], RESPONSES[j])
        assert p.record.where == "mem:1" and p.record.prompt == rec.prompt


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown pair strategy 'best'"):
        expand_pairs(_record(MIDDLE_TIE), "best")


def test_ranking_becomes_scores_and_agreeing_scores_win():
    # ranking best first: 0, 3, 1, 2 -> scores K - position
    assert _record(ranking=[0, 3, 1, 2]).scores == [4.0, 2.0, 1.0, 3.0]
    assert _record(ranking=[0, 3, 1, 2]).order() == [0, 3, 1, 2]
    assert _triples(expand_pairs(_record(ranking=[0, 3, 1, 2]), "best_vs_rest")) == [
        (0, 3, 1.0),
        (0, 1, 2.0),
        (0, 2, 3.0),
    ]
    # both given and consistent: scores kept (gaps and ties), ranking only checked
    assert _record([4.0, 2.5, 1.0, 3.0], ranking=[0, 3, 1, 2]).scores == [4.0, 2.5, 1.0, 3.0]
    assert _record(MIDDLE_TIE, ranking=[0, 3, 1, 2]).scores == MIDDLE_TIE  # either order of a tie agrees
    assert _record([4, 1, 2, 3]).scores == [4.0, 1.0, 2.0, 3.0]  # integer scores are fine


def test_message_responses_equal_plain_ones_and_raw_is_not_mutated(tmp_path):
    img = _image(tmp_path)
    conv = {
        "id": "c",
        "images": [img],
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "describe the image ."}]}],
        "responses": [
            [{"role": "assistant", "content": [{"type": "text", "text": "a red circle ."}]}],
            [{"role": "assistant", "content": "no ."}],
        ],
        "scores": [1, 0],
    }
    before = copy.deepcopy(conv)
    rec = parse_ranked_record(conv, "mem:1", tmp_path)
    assert conv == before
    assert rec.responses == ["a red circle .", "no ."]
    assert rec.prompt[0]["content"][0] == {"type": "image"}  # image attached first, as parse_record does
    assert rec.images == [str((tmp_path / img).resolve())]


def test_curry_dpo_curriculum_stages():
    # p: R1..R4 scored 4 > 3 > 2 > 1; q: gaps 9, 5, 3 against its best.
    p = _record([4.0, 3.0, 2.0, 1.0], rid="p")
    q = _record([10.0, 1.0, 7.0, 5.0], rid="q")
    pairs = expand_pairs(p, "best_vs_rest") + expand_pairs(q, "best_vs_rest")

    def ids(stages):
        return [[x.id for x in s] for s in stages]

    # Curry-DPO: stage i = the i-th easiest pair of every prompt, (R1,R4) then (R1,R3) then (R1,R2)
    assert ids(curriculum_order(pairs, stages=3)) == [["q#0>1", "p#0>3"], ["q#0>3", "p#0>2"], ["q#0>2", "p#0>1"]]
    # one stage: gap descending, the tie at gap 3 (p#0>3, q#0>2) broken by id
    assert ids(curriculum_order(pairs)) == [["q#0>1", "q#0>3", "p#0>3", "q#0>2", "p#0>2", "p#0>1"]]
    assert [x.gap for x in curriculum_order(pairs)[0]] == [9.0, 5.0, 3.0, 3.0, 2.0, 1.0]
    # fewer stages than pairs per prompt: contiguous runs (r * n // m); more: trailing stages empty
    assert ids(curriculum_order(pairs, stages=2)) == [["q#0>1", "q#0>3", "p#0>3", "p#0>2"], ["q#0>2", "p#0>1"]]
    assert ids(curriculum_order(pairs, stages=4))[3] == []
    assert curriculum_order(list(reversed(pairs)), stages=3) == curriculum_order(pairs, stages=3)  # input order free
    with pytest.raises(ValueError, match="positive integer"):
        curriculum_order(pairs, stages=0)


GOOD = {"id": "ok", "prompt": "describe the image .", "responses": ["a red circle .", "no ."], "scores": [1, 0]}
BAD_CASES = {
    "one response": ({"responses": ["a red circle ."], "scores": [1]}, "at least 2 responses"),
    "responses not a list": ({"responses": "a red circle ."}, "'responses' must be a list"),
    "missing responses": ({"responses": None}, "missing field(s) responses"),
    "missing prompt": ({"prompt": None}, "missing field(s) prompt"),
    "score count": ({"scores": [3, 2, 1]}, "3 score(s) for 2 responses"),
    "nan score": ({"scores": [1.0, float("nan")]}, "NaN"),
    "inf score": ({"scores": [float("inf"), 0.0]}, "NaN or infinity at index(es) [0]"),
    "huge int score": ({"scores": [10**400, 0]}, "NaN or infinity"),
    "text score": ({"scores": ["high", 0]}, "'scores' must be a list of numbers"),
    "bool score": ({"scores": [True, False]}, "'scores' must be a list of numbers"),
    "ranking repeats": ({"scores": None, "ranking": [0, 0]}, "permutation of 0..1"),
    "ranking length": ({"scores": None, "ranking": [0, 1, 2]}, "permutation of 0..1"),
    "ranking floats": ({"scores": None, "ranking": [0.0, 1.0]}, "list of response indices"),
    "ranking contradicts scores": ({"ranking": [1, 0]}, "puts response 1 (score 0) above response 0 (score 1)"),
    "neither": ({"scores": None}, "needs 'scores'"),
    "empty response": ({"responses": ["a red circle .", "  "]}, "'responses[1]' response is empty"),
    "empty message": (
        {"responses": ["a red circle .", [{"role": "assistant", "content": ""}]]},
        "'responses[1]' response is empty",
    ),
    "all tied": ({"responses": ["yes .", "no .", "a red circle ."], "scores": [2, 2, 2]}, "same score 2"),
    "identical texts": ({"responses": ["yes .", "yes ."]}, "responses 0 and 1 are identical but scored 1 and 0"),
    "image count": ({"images": ["a.png"], "prompt": "<image> and <image> ?"}, "2 image placeholder(s) but 1"),
    "image missing": ({"images": ["nope.png"]}, "media file not found"),
    "malformed json": ("{not json", "malformed JSON"),
}


def _bad_row(case):
    patch, _ = BAD_CASES[case]
    return patch if isinstance(patch, str) else {**GOOD, "id": case, **patch}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_name_file_and_line(tmp_path, case):
    _image(tmp_path)
    path = _write(tmp_path, [GOOD, _bad_row(case)])  # the bad record is on line 2
    with pytest.raises(BadSampleError) as err:
        load_ranked_records(path)
    assert str(err.value).startswith(f"{path}:2: ")
    assert BAD_CASES[case][1] in str(err.value)


def test_skip_mode_counts_every_bad_record(tmp_path):
    _image(tmp_path)
    cases = sorted(BAD_CASES)
    path = _write(tmp_path, [GOOD, *(_bad_row(c) for c in cases), {**GOOD, "id": "ok2"}])
    records, problems = load_ranked_records(path, on_bad_sample="skip")
    assert [r.id for r in records] == ["ok", "ok2"]
    assert len(problems) == len(cases)
    assert [p.split(": ", 1)[0] for p in problems] == [f"{path}:{line}" for line in range(2, 2 + len(cases))]
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_ranked_records(path, on_bad_sample="ignore")


def test_parquet_rows_with_ranking_or_scores(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [
        {"id": "s", "prompt": "yes or no ?", "responses": ["yes .", "no ."], "scores": [0.5, 0.25], "ranking": None},
        {"id": "r", "prompt": "yes or no ?", "responses": ["yes .", "no ."], "scores": None, "ranking": [1, 0]},
        {"id": "t", "prompt": "yes or no ?", "responses": ["yes .", "no ."], "scores": [1.0, 1.0], "ranking": None},
    ]
    path = tmp_path / "ranked.parquet"
    pd.DataFrame(rows).to_parquet(path)
    records, problems = load_ranked_records(path, on_bad_sample="skip")
    assert [(r.id, r.scores) for r in records] == [("s", [0.5, 0.25]), ("r", [1.0, 2.0])]
    assert len(problems) == 1 and problems[0].startswith(f"{path}[2]: ") and "same score" in problems[0]


def _dataset_file(tmp_path: Path) -> Path:
    red, blue = _image(tmp_path, "red.png", (220, 40, 40)), _image(tmp_path, "blue.png", (40, 80, 220))
    return _write(
        tmp_path,
        [
            {
                "id": "p",
                "images": [red],
                "prompt": "<image> describe the image .",
                "responses": RESPONSES,
                "scores": MIDDLE_TIE,
            },
            {
                "id": "q",
                "images": [blue],
                "prompt": "what color is the square ?",
                "responses": ["the square is red .", "the square is blue ."],
                "ranking": [1, 0],
            },
        ],
    )


def test_dataset_items_collate_with_higher_scored_response_in_chosen_rows(tiny_processor, tmp_path):
    records, _ = load_ranked_records(_dataset_file(tmp_path))
    ds = RankedPreferenceDataset(records, strategy="best_vs_rest")
    assert ds.lists is records
    assert [p.id for p in ds.pairs] == ["p#0>1", "p#0>3", "p#0>2", "q#1>0"]
    items = [ds[i] for i in range(len(ds))]
    assert set(items[0]) == {"record", "images"} and items[0]["images"][0].size == (64, 64)
    batch = VisionPreferenceCollator(tiny_processor)(items)
    assert batch.ids == ["p#0>1", "p#0>3", "p#0>2", "q#1>0"]
    assert batch.num_pairs == 4 and batch.media["pixel_values"].shape == (4, 3, 48, 48)  # once per pair
    tok = tiny_processor.tokenizer

    def tokens(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    for b, pair in enumerate(ds.pairs):
        rec = next(r for r in records if r.id == pair.source_id)
        i, j = pair.chosen_index, pair.rejected_index
        assert rec.scores[i] > rec.scores[j]
        chosen_row, rejected_row = b, b + batch.num_pairs
        assert batch.input_ids[chosen_row][batch.response_mask[chosen_row]].tolist() == tokens(rec.responses[i])
        assert batch.input_ids[rejected_row][batch.response_mask[rejected_row]].tolist() == tokens(rec.responses[j])
    # q ranked response 1 first: "blue" is chosen
    assert tok.convert_ids_to_tokens(batch.input_ids[3][batch.response_mask[3]].tolist())[3] == "blue"


def test_dataset_stages(tmp_path):
    records, _ = load_ranked_records(_dataset_file(tmp_path))
    ds = RankedPreferenceDataset(records, strategy="all_pairs", stages=3)
    assert ds.num_stages == 3 and len(ds) == 6  # p: 5 pairs (one tie), q: 1
    first = ds.stage(0)
    assert len(ds) == 6 and ds.current_stage is None  # stage() leaves the dataset as it was
    # p's 5 pairs by gap: 0>2 (3.0) first, then four at 1.5 by id; r * 3 // 5 -> stages 0,0,1,1,2
    assert [p.id for p in first.pairs] == ["p#0>2", "p#0>1", "q#1>0"]  # q's only pair (gap 1.0) is its easiest
    assert [first[i]["record"].id for i in range(len(first))] == ["p#0>2", "p#0>1", "q#1>0"]
    ds.set_stage(1)
    assert [p.id for p in ds.pairs] == ["p#0>3", "p#1>2"] and len(ds) == 2
    ds.set_stage(2)
    assert [p.id for p in ds.pairs] == ["p#3>2"]
    ds.set_stage(None)
    assert len(ds) == 6
    with pytest.raises(IndexError, match="3 stage"):
        ds.set_stage(3)
    assert RankedPreferenceDataset(records, strategy="best_vs_worst").num_stages == 1


def test_dataset_undecodable_image_raises_or_yields_none(tiny_processor, tmp_path):
    path = _dataset_file(tmp_path)
    (tmp_path / "blue.png").write_bytes(b"not a png")
    records, _ = load_ranked_records(path)
    with pytest.raises(BadSampleError, match=rf"^{re.escape(str(path))}:2: cannot decode image"):
        RankedPreferenceDataset(records, strategy="best_vs_worst")[1]
    ds = RankedPreferenceDataset(records, strategy="best_vs_worst", on_bad_sample="skip")
    assert ds[1] is None
    batch = VisionPreferenceCollator(tiny_processor, on_bad_sample="skip")([ds[0], ds[1]])
    assert batch.ids == ["p#0>2"] and batch.skipped == 1
