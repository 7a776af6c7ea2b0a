"""``mmpo predict``: the policy's greedy responses, one JSONL line per record, with every reference mode."""

import json
import os

import pytest
import torch
from helpers.trainers import quiet_trainer
from PIL import Image
from transformers import AutoModelForImageTextToText

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.cli import main
from mmpo.generation import generate_answers
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.prediction import JsonlPredictionWriter, PredictSettings

MAX_NEW_TOKENS = 6
N_RECORDS = 7  # not a multiple of the batch size (3) nor of two ranks


def _records(world, n=N_RECORDS):
    return [json.loads(line) for line in (world / "val.jsonl").read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def small_split(world):
    """The first 7 validation records as a split of their own (beside the world's, for its images)."""
    path = world / "predict-7.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(world)))
    return path


def _rows(split) -> list[dict]:
    return [json.loads(line) for line in split.read_text().splitlines()]


def _expected(model, processor, split) -> list[str]:
    """What ``generate`` gives for each record's own prompt and image, greedy, one prompt at a time."""
    rows = _rows(split)
    images = [[Image.open(split.parent / p).convert("RGB") for p in r["images"]] for r in rows]
    prompts = [r["prompt"] if "<image>" in r["prompt"] else "<image> " + r["prompt"] for r in rows]
    return generate_answers(model, processor, prompts, images, batch_size=1, max_new_tokens=MAX_NEW_TOKENS)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("reference", ["cached", "adapter", "none"])
def test_predict_writes_one_greedy_response_per_record_with_any_reference(
    small_split, tiny_llava, processor, tmp_path, reference
):
    args = [
        "predict", "--config", "configs/quickstart.yaml",
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        f"--model.init_args.reference={reference}", "--model.init_args.save_dir=null",
        f"--model.init_args.predict.max_new_tokens={MAX_NEW_TOKENS}",
        "--data.init_args.train_file=null", "--data.init_args.val_file=null",
        f"--data.init_args.test_file={small_split}", "--data.init_args.loader.batch_size=3",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if reference == "none":  # a reference-free loss; predict does not use the loss either
        args.append("--model.init_args.loss=mmpo.losses.SimPOLoss")
    main(args)  # before: RuntimeError("no cached reference log-probs for the test split"); no file anywhere
    rows = _rows(small_split)
    lines = _lines(tmp_path / "predictions.jsonl")
    assert [line["id"] for line in lines] == [r["id"] for r in rows]  # one per record, in the split's order
    assert all(set(line) == {"id", "prompt", "response"} for line in lines)
    for line, r in zip(lines, rows, strict=True):  # the prompt as the model saw it: template, one <image>
        assert line["prompt"].count("<image>") == 1 and r["prompt"].rstrip(" .?") in line["prompt"].replace(" ?", "?")
    # a fresh adapter is the identity: the policy's answers are the base model's
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    want = _expected(base, processor, small_split)
    assert [line["response"] for line in lines] == want
    assert all(line["response"] for line in lines)
    assert not list(tmp_path.glob(".predictions*"))  # no temporary or part file left behind


def _trained_looking_module(tiny_llava, **kwargs) -> PreferenceModule:
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(backbone, DPOLoss(), reference="adapter", **kwargs)
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # the policy now differs from its reference (the base model)
    return module


def test_predict_generates_with_the_policy_not_the_reference(small_split, tiny_llava, processor, tmp_path):
    out = tmp_path / "out" / "answers.jsonl"
    module = _trained_looking_module(tiny_llava, predict=PredictSettings(str(out), max_new_tokens=MAX_NEW_TOKENS))
    dm = ImagePreferenceDataModule(str(tiny_llava), test_file=str(small_split), loader={"batch_size": 4})
    predictions = quiet_trainer(default_root_dir=str(tmp_path)).predict(module, datamodule=dm)
    rows = _rows(small_split)
    lines = _lines(out)
    assert [line["id"] for line in lines] == [r["id"] for r in rows]
    want = _expected(module.policy, processor, small_split)
    assert [line["response"] for line in lines] == want
    assert [r for p in predictions for r in p["responses"]] == want  # also returned by trainer.predict
    base = _expected(AutoModelForImageTextToText.from_pretrained(tiny_llava), processor, small_split)
    assert want != base  # the adapter changed the answers: they are the policy's


def test_a_crash_while_writing_keeps_the_previous_predictions(small_split, tiny_llava, tmp_path, monkeypatch):
    module = _trained_looking_module(tiny_llava, predict=PredictSettings(max_new_tokens=2))
    dm = ImagePreferenceDataModule(str(tiny_llava), test_file=str(small_split), loader={"batch_size": 4})
    target = tmp_path / "predictions.jsonl"
    target.write_text("previous run\n")

    class Killed(BaseException):  # not a KeyboardInterrupt, which Lightning turns into sys.exit
        pass

    def killed(src, dst):
        raise Killed("killed while renaming")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        quiet_trainer(default_root_dir=str(tmp_path)).predict(module, datamodule=dm)
    assert target.read_text() == "previous run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]  # the temporary file is gone


def test_a_writer_of_the_users_own_replaces_the_default(small_split, tiny_llava, tmp_path):
    module = _trained_looking_module(tiny_llava, predict=PredictSettings(max_new_tokens=2))
    dm = ImagePreferenceDataModule(str(tiny_llava), test_file=str(small_split), loader={"batch_size": 4})
    mine = JsonlPredictionWriter(tmp_path / "mine.jsonl")
    quiet_trainer(default_root_dir=str(tmp_path), callbacks=[mine]).predict(module, datamodule=dm)
    assert len(_lines(tmp_path / "mine.jsonl")) == N_RECORDS
    assert not (tmp_path / "predictions.jsonl").exists()


@pytest.mark.slow
def test_two_ranks_write_one_file_in_dataset_order(small_split, tiny_llava, processor, tmp_path):
    out = tmp_path / "predictions.jsonl"
    # built in each process (a built transformers model does not survive the trip to a spawned one)
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(backbone, DPOLoss(), predict=PredictSettings(str(out), max_new_tokens=MAX_NEW_TOKENS))
    dm = ImagePreferenceDataModule(str(tiny_llava), test_file=str(small_split), loader={"batch_size": 2})
    trainer = quiet_trainer(devices=2, strategy="ddp_spawn", default_root_dir=str(tmp_path))
    trainer.predict(module, datamodule=dm)
    # 7 records on 2 ranks (4 batches each way): the sampler serves record 0 a second time; it is written once
    assert [line["id"] for line in _lines(out)] == [r["id"] for r in _rows(small_split)]
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    assert [line["response"] for line in _lines(out)] == _expected(base, processor, small_split)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the parts are gone


def test_predict_from_a_training_checkpoint_uses_its_weights(world, small_split, tiny_llava, processor, tmp_path):
    from peft import PeftModel

    common = [
        "--config", "configs/quickstart.yaml",
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        "--model.init_args.optimizer.init_args.lr=0.05",  # two large steps: answers the base model does not give
        f"--data.init_args.train_file={world}/train.jsonl", "--data.init_args.val_file=null",
        "--data.init_args.loader.batch_size=4", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    main(["fit", *common, f"--model.init_args.save_dir={tmp_path}/adapter", "--trainer.max_steps=2",
          "--trainer.enable_checkpointing=true"])  # fmt: skip
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    main(["predict", *common, "--model.init_args.save_dir=null", f"--data.init_args.test_file={small_split}",
          f"--model.init_args.predict.max_new_tokens={MAX_NEW_TOKENS}", f"--ckpt_path={ckpt}"])  # fmt: skip
    got = [line["response"] for line in _lines(tmp_path / "predictions.jsonl")]
    trained = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava), tmp_path / "adapter")
    assert got == _expected(trained, processor, small_split)  # the checkpoint's weights, as exported
    assert got != _expected(AutoModelForImageTextToText.from_pretrained(tiny_llava), processor, small_split)
