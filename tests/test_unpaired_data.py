"""Unpaired records (prompt, images, completion, label): parsing, clear errors, the KL completions made by
rotating completions within a batch, the collated batch, and a few KTO / BCO training steps of a tiny LLaVA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.callbacks import LossesInMemory
from helpers.data import write_unpaired
from helpers.trainers import quiet_trainer

from datamodules import BadSampleError, UnpairedPreferenceDataModule, load_unpaired_records
from datamodules.vision_text.unpaired import UnpairedCollator, UnpairedDataset
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import BCOLoss, CombinedLoss, DPOLoss, KTOLoss, SFTLoss
from mmpo.module import LOSS_STATE_KEY, PreferenceModule

REPO = Path(__file__).resolve().parents[1]


def test_records_parse_with_images_labels_and_conversational_completions(world, tmp_path):
    rows = write_unpaired(world, tmp_path / "u.jsonl", n_pairs=2)
    rows[1]["completion"] = [{"role": "assistant", "content": [{"type": "text", "text": "no ."}]}]
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records, problems = load_unpaired_records(tmp_path / "u.jsonl", world)
    assert problems == [] and [r.id for r in records] == [r["id"] for r in rows]
    assert [r.desirable for r in records] == [True, False, True, False]
    assert [r.completion for r in records] == ["yes .", "no .", rows[2]["completion"], rows[3]["completion"]]
    first = records[0]
    assert first.images == [str((world / rows[0]["images"][0]).resolve())]
    assert first.prompt[0]["content"][0] == {"type": "image"}  # no placeholder: the image goes first (TRL)
    assert first.side == {"desirable": True} and first.shared_media


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label": None}, r"u.jsonl:2: missing field\(s\) label"),
        ({"completion": "   "}, r"u.jsonl:2: 'completion' response is empty"),
        ({"completion": None}, r"u.jsonl:2: missing field\(s\) completion"),
        ({"label": "yes"}, r"u.jsonl:2: 'label' must be true or false, got 'yes'"),
        ({"label": 1}, r"u.jsonl:2: 'label' must be true or false, got 1"),
        ({"images": ["missing.png"]}, r"u.jsonl:2: media file not found"),
    ],
)
def test_bad_records_name_file_and_line(world, tmp_path, change, message):
    rows = write_unpaired(world, tmp_path / "u.jsonl", n_pairs=2)
    rows[1] = {k: v for k, v in {**rows[1], **change}.items() if v is not None}
    (tmp_path / "u.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(BadSampleError, match=message):
        load_unpaired_records(tmp_path / "u.jsonl", world)
    records, problems = load_unpaired_records(tmp_path / "u.jsonl", world, on_bad_sample="skip")
    assert len(records) == 3 and len(problems) == 1 and "u.jsonl:2" in problems[0]


def _collated(records, processor, picks, samples_override=None):
    dataset = UnpairedDataset(records)
    samples = [dataset[i] for i in picks] if samples_override is None else samples_override
    return UnpairedCollator(processor)(samples), UnpairedCollator(processor)


def _response(batch, row: int) -> list[int]:
    p, n = batch.host_lengths()[0][row], batch.host_lengths()[1][row]
    return batch.input_ids[row, p : p + n].tolist()


def test_kl_completions_rotate_within_the_batch(world, tiny_llava, processor, tmp_path):
    write_unpaired(world, tmp_path / "u.jsonl", n_pairs=3)
    records, _ = load_unpaired_records(tmp_path / "u.jsonl", world)
    picks = [0, 3, 4]
    batch, collator = _collated(records, processor, picks)
    b = len(picks)
    assert batch.group_size == 2 and batch.num_groups == b and batch.shared_prompt
    assert batch.ids == [records[i].id for i in picks]
    assert batch.desirable.dtype == torch.bool and batch.desirable.tolist() == [True, False, True]
    assert batch.side_info()["desirable"] is batch.desirable
    for j, i in enumerate(picks):
        own, kl_source = records[i], records[picks[j - 1]]  # record j gets record j−1's (record 0 the last one's)
        assert _response(batch, j) == collator._encode_response(own.completion)
        assert _response(batch, b + j) == collator._encode_response(kl_source.completion)
        # both rows of the group hold the same prompt (the record's own, with its image)
        p = batch.host_lengths()[0][j]
        assert batch.host_lengths()[0][b + j] == p and torch.equal(batch.input_ids[j, :p], batch.input_ids[b + j, :p])
    assert batch.media["pixel_values"].shape[0] == b  # images stored once per group


def test_a_batch_of_one_record_takes_the_previous_record_in_the_file(world, processor, tmp_path):
    write_unpaired(world, tmp_path / "u.jsonl", n_pairs=2)
    records, _ = load_unpaired_records(tmp_path / "u.jsonl", world)
    dataset = UnpairedDataset(records)
    assert dataset[0]["kl_fallback"] == records[-1].completion and dataset[2]["kl_fallback"] == records[1].completion
    batch, collator = _collated(records, processor, [2])
    assert _response(batch, 1) == collator._encode_response(records[1].completion)
    # a skipped sample (None) leaves the rotation to the others; alone, a record uses its fallback
    batch, _ = _collated(records, processor, None, samples_override=[None, dataset[1], dataset[2]])
    assert batch.skipped == 1 and batch.ids == [records[1].id, records[2].id]
    assert _response(batch, 2) == collator._encode_response(records[2].completion)
    assert _response(batch, 3) == collator._encode_response(records[1].completion)
    with pytest.raises(ValueError, match="at least 2 records"):
        UnpairedDataset(records[:1])


def test_datamodule_serves_labelled_groups_and_refuses_what_cannot_work(world, tiny_llava, tmp_path):
    write_unpaired(world, tmp_path / "u.jsonl", n_pairs=3)
    dm = UnpairedPreferenceDataModule(
        str(tiny_llava), train_file=str(tmp_path / "u.jsonl"), data_root=str(world),
        loader={"batch_size": 4, "shuffle": False},
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [b.num_groups for b in batches] == [4, 2]
    assert batches[0].desirable.tolist() == [True, False, True, False] and batches[0].group_size == 2
    with pytest.raises(ValueError, match="cannot be cached"):
        dm.reference_cache_split("train")
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        UnpairedPreferenceDataModule(str(tiny_llava), train_file=str(tmp_path / "u.jsonl"), loader={"batch_size": 1})
    # a pair loss would read the KL completion as a rejected answer: refused, naming the records
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4)), DPOLoss())
    module.configure_model()
    with pytest.raises(ValueError, match=r"DPOLoss compares responses .* unpaired feedback .*KTOLoss"):
        module.compute(batches[0])
    kto_and_sft = PreferenceModule(
        VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4)), CombinedLoss([KTOLoss(), SFTLoss()])
    )
    kto_and_sft.configure_model()
    assert torch.isfinite(kto_and_sft.compute(batches[0])[0].losses).all()  # a mix with an unpaired loss runs


@pytest.mark.parametrize("loss", [KTOLoss(beta=0.1), BCOLoss(beta=0.1)], ids=repr)
def test_a_tiny_llava_trains_on_unpaired_data(world, tiny_llava, tmp_path, loss):
    write_unpaired(world, tmp_path / "u.jsonl", n_pairs=2)
    dm = UnpairedPreferenceDataModule(
        str(tiny_llava), train_file=str(tmp_path / "u.jsonl"), data_root=str(world), loader={"batch_size": 4}
    )  # one batch per epoch: both steps see the same 4 records
    torch.manual_seed(0)
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(backbone, loss, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), reference="adapter")
    rec = LossesInMemory()
    trainer = quiet_trainer(max_steps=2, num_sanity_val_steps=0, callbacks=[rec], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert len(rec.losses) == 2 and all(math.isfinite(x) for x in rec.losses)
    first = rec.metrics[0]
    # the reference is the policy at step 0 (disabled adapter, LoRA B = 0): every log-ratio is 0
    assert first["train/rewards/chosen_step"] == 0.0 and first["train/rewards/rejected_step"] == 0.0
    if isinstance(loss, KTOLoss):
        assert rec.losses[0] == pytest.approx(0.5)  # 1 − σ(0) for every example
        assert first["train/kl_step"] == 0.0
    else:
        assert rec.losses[0] == pytest.approx(math.log(2.0))  # −log σ(0)
        assert first["train/delta_step"] == 0.0
    assert "train/logps/accuracies_step" not in first  # no pair figures for unpaired groups
    # after one step on them the rewards of the same records moved apart in the labels' direction
    second = rec.metrics[1]
    assert second["train/rewards/chosen_step"] > second["train/rewards/rejected_step"]
    if isinstance(loss, BCOLoss):
        path = tmp_path / "last.ckpt"
        trainer.save_checkpoint(path)
        state = torch.load(path, weights_only=True)[LOSS_STATE_KEY]
        assert state == loss.state_dict() and state["count"] == 8  # 2 steps of 4 rewards


def test_kto_config_over_a_lora_config_builds_kto_on_unpaired_data(tiny_llava, monkeypatch):
    import yaml
    from transformers import AutoModelForImageTextToText

    from mmpo.cli import MMPOCLI

    monkeypatch.setattr(
        VisionLanguageBackbone, "load_pretrained", lambda self: AutoModelForImageTextToText.from_pretrained(tiny_llava)
    )
    base, partial = REPO / "configs/llava15_7b_dpo_lora.yaml", REPO / "configs/losses/kto_unpaired_lora.yaml"
    text = partial.read_text()
    assert f"mmpo fit --config configs/{base.name} --config configs/losses/{partial.name}" in text
    spec = yaml.safe_load(text)
    cli = MMPOCLI(args=["--config", str(base), "--config", str(partial), "--trainer.accelerator=cpu"], run=False)
    loss = cli.model.loss
    assert type(loss) is KTOLoss
    for key, value in spec["model"]["init_args"]["loss"]["init_args"].items():
        assert getattr(loss, key) == value, key
    assert cli.model.reference_mode == "adapter"
    dm = cli.datamodule
    assert type(dm) is UnpairedPreferenceDataModule and dm.files["train"] == "data/unpaired.jsonl"
    assert dm.loader.batch_size == 4 and dm.max_length == 2048  # the base config's other data settings stay
    assert dm.processor_name == "llava-hf/llava-1.5-7b-hf"  # linked from the backbone
