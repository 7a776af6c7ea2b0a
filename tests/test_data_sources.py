"""Where preference records come from: TRL's implicit-prompt form, JSON and Parquet files read with
errors that name the file and row, saved and hub datasets by name, and processor keyword arguments."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from datamodules import BadSampleError, ImagePreferenceDataModule, load_preference_records
from datamodules.core.records import source_kind, split_implicit_prompt


def _rows(world: Path, n: int = 6) -> list[dict]:
    return [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:n]]


def _conversation(row: dict, answer: str) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def test_implicit_prompt_conversations_give_the_explicit_records_batches(world, tiny_llava, tmp_path):
    rows = _rows(world)
    explicit = [
        {**r, "prompt": _conversation(r, "")[:1], "chosen": _conversation(r, r["chosen"])[1:],
         "rejected": _conversation(r, r["rejected"])[1:]}
        for r in rows
    ]  # fmt: skip
    implicit = [
        {"id": r["id"], "images": r["images"], "chosen": _conversation(r, r["chosen"]),
         "rejected": _conversation(r, r["rejected"])}
        for r in rows
    ]  # fmt: skip
    batches = []
    for name, data in (("explicit", explicit), ("implicit", implicit)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
        dm = ImagePreferenceDataModule(
            str(tiny_llava), train_file=str(path), data_root=str(world), loader={"batch_size": 6, "shuffle": False}
        )
        dm.setup("fit")
        record = dm.datasets["train"].records[0]
        assert record.prompt == explicit[0]["prompt"] and record.chosen == rows[0]["chosen"]
        batches.append(next(iter(dm.train_dataloader())))
    a, b = batches
    assert a.ids == b.ids
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.media["pixel_values"], b.media["pixel_values"])


def test_implicit_prompt_strings_split_before_the_space_as_trl_does():
    split = split_implicit_prompt("Is it red? Answer: yes.", "Is it red? Answer: no.", "r")
    assert split == {"prompt": "Is it red? Answer:", "chosen": " yes.", "rejected": " no."}
    with pytest.raises(BadSampleError, match="share no start"):
        split_implicit_prompt("yes", "no", "f.jsonl:3")
    with pytest.raises(BadSampleError, match="f.jsonl:4: .*'chosen' is the start of the other"):
        split_implicit_prompt("same", "same but longer", "f.jsonl:4")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(BadSampleError, match="its response is empty"):
        split_implicit_prompt(msgs, msgs, "f.jsonl:5")


def test_json_errors_name_the_file_line_and_element_and_bad_elements_can_be_skipped(world, tmp_path):
    rows = _rows(world, 3)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a", "chosen": "b",\n "rejected": }]')
    with pytest.raises(BadSampleError, match=r"broken\.json: malformed JSON \(.* at line 2, column 14\)"):
        load_preference_records(broken, data_root=world)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([rows[0], "not a record", rows[1], {**rows[2], "chosen": ""}]))
    with pytest.raises(BadSampleError, match=r"mixed\.json\[1\]: expected a JSON object, got str"):
        load_preference_records(mixed, data_root=world)
    records, problems = load_preference_records(mixed, data_root=world, on_bad_sample="skip")
    assert [r.id for r in records] == [rows[0]["id"], rows[1]["id"]]
    assert [p.split(":")[0].rsplit("/", 1)[-1] for p in problems] == ["mixed.json[1]", "mixed.json[3]"]
    lines = tmp_path / "lines.json"  # JSON Lines under a .json name
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    assert [r.id for r in load_preference_records(lines, data_root=world)[0]] == [r["id"] for r in rows]


def test_parquet_rows_are_read_in_order_and_an_unreadable_file_is_named(world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(world, 5)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # three row groups
    records, problems = load_preference_records(path, data_root=world)
    assert [r.id for r in records] == [r["id"] for r in rows] and not problems
    assert records[4].where.endswith("pairs.parquet[4]")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(BadSampleError, match=r"bad\.parquet: not a readable Parquet file"):
        load_preference_records(bad, data_root=world)


def test_a_saved_dataset_directory_is_read_by_name_and_its_splits_chosen(world, tiny_llava, tmp_path):
    import datasets

    rows = _rows(world, 4)
    # TRL's vision datasets hold decoded images; paths relative to the directory work as well
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    (saved / "images").mkdir()
    for row in rows:
        shutil.copy(world / row["images"][0], saved / row["images"][0])
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(saved), loader={"shuffle": False})
    dm.setup("fit")
    assert source_kind(str(saved)) == "saved"
    assert [r.id for r in dm.datasets["train"].records] == [r["id"] for r in rows]
    assert dm.datasets["train"].records[0].where == f"{saved}[0]"
    assert dm.datasets["train"].records[0].images[0] == str((saved / rows[0]["images"][0]).resolve())

    both = tmp_path / "both"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:3]), "test": datasets.Dataset.from_list(rows[3:])}
    ).save_to_disk(str(both))
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\]; name one as .*:SPLIT"):
        load_preference_records(str(both), data_root=world)
    records, _ = load_preference_records(f"{both}:test", data_root=world)
    assert [r.id for r in records] == [rows[3]["id"]] and records[0].where == f"{both}:test[0]"


def test_a_hub_dataset_id_is_loaded_through_datasets_with_its_split(world, monkeypatch):
    import datasets

    rows = _rows(world, 2)
    asked = []

    def fake_load_dataset(name, split=None):
        asked.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert source_kind("openbmb/RLAIF-V-Dataset") == "hub" and source_kind("data/train.jsonl") == "file"
    records, _ = load_preference_records("someone/pairs:train", data_root=world)
    assert asked == [("someone/pairs", "train")] and records[1].where == "someone/pairs:train[1]"

    def offline(name, split=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"hub dataset 'someone/pairs' could not be loaded \(ConnectionError"):
        load_preference_records("someone/pairs", data_root=world)


def test_processor_kwargs_reach_the_processor_and_the_cache_fingerprint(world, tiny_llava):
    plain = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"))
    raw = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(world / "train.jsonl"), processor_kwargs={"do_normalize": False}
    )
    assert plain.processor.image_processor.do_normalize and not raw.processor.image_processor.do_normalize
    for dm in (plain, raw):
        dm.setup("fit")
    a = next(iter(plain.reference_cache_split("train").collator([plain.datasets["train"][0]]).media.values()))
    b = next(iter(raw.reference_cache_split("train").collator([raw.datasets["train"][0]]).media.values()))
    assert b.min() >= 0 and a.min() < 0  # unnormalised pixels stay in [0, 1]
    assert raw.cache_settings("train")["processor_kwargs"] == {"do_normalize": False}
    assert "processor_kwargs" not in plain.cache_settings("train")  # caches written before stay valid
    assert raw.hparams["processor_kwargs"] == {"do_normalize": False}


def test_pair_records_carry_their_side_information_into_the_batch(world, tiny_llava, tmp_path):
    rows = _rows(world, 4)
    rows[0].update(scores=[2.5, -1.0], weight=0.5, dimension_id=3, soft_label=0.9, orientations=[1, -1])
    rows[1].update(scores=[0.0, 1.0], weight=2.0, dimension_id=0, soft_label=0.25, orientations=[0, 1])
    path = tmp_path / "side.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), loader={"batch_size": 2, "shuffle": False}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.scores.tolist() == [[2.5, -1.0], [0.0, 1.0]]
    assert batch.weights.tolist() == [0.5, 2.0] and batch.dimension_ids.tolist() == [3, 0]
    assert batch.soft_labels.tolist() == [0.8999999761581421, 0.25]  # float32
    assert batch.orientations.tolist() == [[1.0, -1.0], [0.0, 1.0]]  # (B, D)
    plain = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2})
    plain.setup("fit")
    assert next(iter(plain.train_dataloader())).side_info() == {}
    # side information reaches the loss only: the reference cache's data fingerprint ignores it
    from mmpo.reference.cache import data_fingerprint

    records = dm.datasets["train"].records
    bare = [dataclasses.replace(r, side={}) for r in records]
    assert data_fingerprint(records, {}) == data_fingerprint(bare, {})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scores", [1.0], "'scores' must be two finite numbers"),
        ("scores", [1.0, float("nan")], "'scores' must be two finite numbers"),
        ("weight", -1, "'weight' must be a finite number >= 0"),
        ("dimension_id", 1.5, "'dimension_id' must be an integer >= 0"),
        ("soft_label", 1.5, r"'soft_label' must be a number in \[0, 1\]"),
        ("orientations", [1, 2], "'orientations' must be a non-empty list of 1, -1 or 0"),
        ("orientations", [], "'orientations' must be a non-empty list"),
        ("orientations", [True], "'orientations' must be a non-empty list"),
    ],
)
def test_bad_side_information_is_a_bad_record_naming_the_field(world, tmp_path, field, value, message):
    row = {**_rows(world, 1)[0], field: value}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BadSampleError, match=rf"bad\.jsonl:1: {message}"):
        load_preference_records(path, data_root=world)
    assert load_preference_records(path, data_root=world, on_bad_sample="skip")[0] == []


def test_scores_from_the_data_steer_madpo_in_the_module(world, tiny_llava, tmp_path):
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.losses import MADPOLoss, madpo_weights
    from mmpo.module import PreferenceModule

    rows = _rows(world, 2)
    rows[0]["scores"], rows[1]["scores"] = [3.0, -0.5], [0.0, 4.0]  # an easy pair, and one the labels dispute
    path = tmp_path / "scored.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), loader={"batch_size": 2, "shuffle": False}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4)), MADPOLoss())
    module.configure_model()
    with torch.no_grad():
        out, _, _ = module.compute(batch)
    # a fresh adapter is its own reference: each pair's DPO loss is ln 2, weighted by MADPO's w(h)
    weights = madpo_weights(torch.tensor([3.5, -4.0]), c_max=2.0, c_min=0.5, lam=1.0, tau=MADPOLoss().tau)
    torch.testing.assert_close(out.losses, weights * math.log(2), rtol=1e-5, atol=1e-6)
    assert weights[0] != weights[1]
