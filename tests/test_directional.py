"""Directional preference alignment (DPA) on ranked data: per-response reward vectors scored along unit
directions, one record per direction with the direction written into its prompt; errors name the record."""

from __future__ import annotations

import json
import math

import pytest

from datamodules import RankedPreferenceDataModule
from datamodules.core.records import BadSampleError
from datamodules.ranked.directional import DirectionSettings, directional_scores

REWARDS = [[0.9, 0.8], [0.5, 0.1], [0.2, -0.5]]  # (helpfulness, verbosity) of three responses


def _raw(**extra):
    return {"id": "q1", "prompt": "<image> what is shown ?", "responses": ["long", "medium", "short"], **extra}


def test_directions_become_unit_vectors_and_bad_ones_are_refused():
    s = DirectionSettings(directions=[[3.0, 4.0], [0.0, -2.0]])
    assert s.directions == [[0.6, 0.8], [0.0, -1.0]]
    for bad, message in [
        ([[0.0, 0.0]], "zero vector"),
        ([[1.0], [1.0, 0.0]], "same number of dimensions"),
        ([[1.0, math.nan]], "finite numbers"),
    ]:
        with pytest.raises(ValueError, match=message):
            DirectionSettings(directions=bad)
    with pytest.raises(ValueError, match="1 names for 2"):
        DirectionSettings(directions=[[1.0, 0.0]], names=["helpfulness"])
    with pytest.raises(ValueError, match="must contain"):
        DirectionSettings(directions=[[1.0, 0.0]], template="no placeholder")


def test_each_direction_scores_the_responses_and_writes_itself_into_the_prompt():
    s = DirectionSettings(directions=[[1.0, 0.0], [1.0, -1.0]], names=["helpfulness", "verbosity"])
    items, notes = s.expand(_raw(rewards=REWARDS), "f.jsonl:1")
    assert notes == [] and [i["id"] for i in items] == ["q1@v0", "q1@v1"]
    assert items[0]["scores"] == [0.9, 0.5, 0.2]
    h = 1 / math.sqrt(2)
    assert items[1]["scores"] == pytest.approx([h * 0.1, h * 0.4, h * 0.7])  # verbosity now counts against
    assert items[1]["prompt"] == "<image> what is shown ? (preference direction: helpfulness 0.71, verbosity -0.71)"
    assert "rewards" not in items[0] and _raw(rewards=REWARDS)["prompt"] == "<image> what is shown ?"
    assert directional_scores(REWARDS, [0.0, 1.0]) == [0.8, 0.1, -0.5]


def test_message_prompts_get_the_direction_after_the_last_user_text():
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is shown ?"}]}]
    s = DirectionSettings(directions=[[1.0, 0.0]])
    (item,), _ = s.expand(_raw(prompt=prompt, rewards=REWARDS), "f.jsonl:1")
    assert item["prompt"][0]["content"][-1] == {"type": "text", "text": " (preference direction: dim0 1.00, dim1 0.00)"}
    assert len(prompt[0]["content"]) == 2  # the raw record is left as it was
    unconditioned = DirectionSettings(directions=[[1.0, 0.0]], condition_prompt=False)
    (item,), _ = unconditioned.expand(_raw(prompt=prompt, rewards=REWARDS), "f.jsonl:1")
    assert item["prompt"] == prompt


def test_a_direction_that_ties_every_response_is_noted_not_served():
    s = DirectionSettings(directions=[[1.0, 0.0], [0.0, 1.0]])
    items, notes = s.expand(_raw(rewards=[[1.0, 0.3], [1.0, 0.2], [1.0, 0.1]]), "f.jsonl:4")
    assert [i["id"] for i in items] == ["q1@v1"]
    assert notes == ["f.jsonl:4: direction 0 gives every response the same score: no pair along it"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "needs 'rewards'"),
        ({"rewards": REWARDS, "scores": [1, 2, 3]}, "not both"),
        ({"rewards": REWARDS[:2]}, "3 lists of 2 finite numbers"),
        ({"rewards": [[1.0], [2.0], [3.0]]}, "3 lists of 2 finite numbers"),
        ({"rewards": [[1.0, math.inf], [2.0, 0.0], [3.0, 0.0]]}, "finite numbers"),
    ],
)
def test_bad_rewards_name_the_record(extra, message):
    with pytest.raises(BadSampleError, match=rf"f\.jsonl:2: .*{message}"):
        DirectionSettings(directions=[[1.0, 0.0]]).expand(_raw(**extra), "f.jsonl:2")


def test_the_datamodule_serves_each_direction_s_best_and_worst_with_the_direction_in_the_prompt(
    world, tiny_llava, tmp_path
):
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:2]]
    records = []
    for i, r in enumerate(rows):
        responses = [r["chosen"], r["rejected"], "square square square ."]
        rewards = [[1.0, 0.5], [0.0, 0.0], [0.6, -0.5]]  # helpful and long, neither, less helpful and short
        records.append({"id": f"d{i}", "images": r["images"], "prompt": r["prompt"], "responses": responses,
                        "rewards": rewards})  # fmt: skip
    path = tmp_path / "rewards.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    direction = {"directions": [[1.0, 0.0], [0.0, -1.0]], "names": ["helpfulness", "verbosity"]}
    dm = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), pair_strategy="best_vs_worst",
        direction=direction, loader={"batch_size": 4, "shuffle": False},
    )  # fmt: skip
    dm.setup("fit")
    pairs = {p.id: p for p in dm.datasets["train"].pairs}
    # along helpfulness response 0 is best and 1 worst; along "less verbose" response 2 is best and 0 worst
    assert sorted(pairs) == ["d0@v0#0>1", "d0@v1#2>0", "d1@v0#0>1", "d1@v1#2>0"]
    text = json.dumps(pairs["d0@v1#2>0"].record.prompt)
    assert "(preference direction: helpfulness 0.00, verbosity -1.00)" in text
    # the tiny tokenizer knows only the world's words, so compare with the same data served unconditioned:
    # each prompt is longer by the direction's tokens
    plain = RankedPreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), pair_strategy="best_vs_worst",
        direction={**direction, "condition_prompt": False}, loader={"batch_size": 4, "shuffle": False},
    )  # fmt: skip
    plain.setup("fit")
    conditioned, bare = next(iter(dm.train_dataloader())), next(iter(plain.train_dataloader()))
    assert bool((conditioned.prompt_lengths > bare.prompt_lengths).all())
    assert dm.hyperparameters()["direction"]["names"] == ["helpfulness", "verbosity"]
