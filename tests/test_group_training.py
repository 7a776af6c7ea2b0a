"""Training on groups of K responses end to end, and reference strategies as typed objects."""

import json
import math
import shutil

import pytest
import torch
from helpers.callbacks import LossesInMemory
from helpers.data import write_ranked
from helpers.trainers import quiet_trainer
from PIL import Image

from datamodules import ImagePreferenceDataModule, RankedPreferenceDataModule, VideoPreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss, PlackettLuceLoss, SimPOLoss
from mmpo.module import PreferenceModule
from mmpo.reference import (
    CachedReference,
    DisabledAdapter,
    FrozenCopy,
    NoReference,
    SeparateCheckpoint,
    resolve_reference,
)


def _fit(module, dm, root, steps):
    rec = LossesInMemory()
    trainer = quiet_trainer(max_steps=steps, num_sanity_val_steps=0, callbacks=[rec], default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    return rec


def _lora_backbone(path):
    return VisionLanguageBackbone(str(path), lora=LoraSettings(r=4, alpha=8, dropout=0.0))


@pytest.mark.parametrize("reference", ["adapter", "cached"])
def test_ranked_lists_train_with_a_list_loss(world, tiny_llava, tmp_path, reference):
    path = write_ranked(world, tmp_path / "ranked.jsonl")
    dm = RankedPreferenceDataModule(
        str(tiny_llava),
        train_file=str(path),
        data_root=str(world),
        serve_lists=True,
        loader={"batch_size": 3, "shuffle": False},
    )
    torch.manual_seed(0)
    module = PreferenceModule(_lora_backbone(tiny_llava), PlackettLuceLoss(beta=0.1), reference=reference)
    rec = _fit(module, dm, tmp_path, steps=2)
    # a fresh adapter is the reference: every log-ratio is 0, and the Plackett–Luce loss of 4 responses is log 4!
    assert rec.losses[0] == pytest.approx(math.log(24), abs=1e-5)
    assert rec.losses[1] < rec.losses[0]  # the first step moved the policy toward the ranking
    assert rec.metrics[0]["train/rewards/ranking_accuracy_step"] == 0.0  # all rewards tie at 0 before training


def test_ranked_lists_refuse_mixed_list_sizes_and_the_pair_curriculum(world, tiny_llava, tmp_path):
    path = write_ranked(world, tmp_path / "ranked.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["responses"], rows[0]["scores"] = rows[0]["responses"][:3], rows[0]["scores"][:3]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = RankedPreferenceDataModule(str(tiny_llava), train_file=str(path), data_root=str(world), serve_lists=True)
    with pytest.raises(ValueError, match=r"one list size per file, found K in \[3, 4\]"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="curriculum"):
        RankedPreferenceDataModule(str(tiny_llava), train_file=str(path), serve_lists=True, curriculum={"stages": 2})


def test_cache_notices_other_rejected_images_under_the_same_names(world, tiny_llava, tmp_path):
    # VDPO-style pairs: the rejected answer is the chosen one, shown with other images
    data = tmp_path / "vdpo"
    shutil.copytree(world, data)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:8]]
    for i, r in enumerate(rows):
        r["rejected"] = r["chosen"]
        r["rejected_images"] = [f"rejected-{i}.png"]
        Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(data / f"rejected-{i}.png")
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def first_loss():
        dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(data / "train.jsonl"), loader={"batch_size": 4})
        torch.manual_seed(0)
        module = PreferenceModule(
            _lora_backbone(tiny_llava), DPOLoss(beta=0.1), reference="cached",
            reference_cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        return _fit(module, dm, tmp_path / "root", steps=1).losses[0]

    assert first_loss() == pytest.approx(math.log(2), abs=1e-5)  # a fresh adapter is its own reference
    for i in range(8):  # other rejected images, same file names
        Image.new("RGB", (32, 32), (0, 10 * i, 200)).save(data / f"rejected-{i}.png")
    assert first_loss() == pytest.approx(math.log(2), abs=1e-5)  # a stale cache would not give ln 2
    assert len(list((tmp_path / "cache").glob("train-*.safetensors"))) == 2


def test_random_frame_windows_refuse_the_cache(tiny_llava):
    from datamodules import PreferenceDataset

    dm = VideoPreferenceDataModule(str(tiny_llava), frames={"frame_sampling": "random_segment", "num_frames": 4})
    dm.datasets["train"] = PreferenceDataset([], frame_sampling="random_segment", num_frames=4)
    with pytest.raises(ValueError, match="random_segment.*cannot be cached"):
        dm.reference_cache_split("train")
    uniform = VideoPreferenceDataModule(str(tiny_llava), frames={"num_frames": 4})
    uniform.datasets["val"] = PreferenceDataset([], frame_sampling="uniform", num_frames=4)
    eight = VideoPreferenceDataModule(str(tiny_llava), frames={"num_frames": 8})
    eight.datasets["val"] = PreferenceDataset([], frame_sampling="uniform", num_frames=8)
    a, b = uniform.reference_cache_split("val").settings, eight.reference_cache_split("val").settings
    assert a["num_frames"] == 4 and b["num_frames"] == 8 and a["frame_sampling"] == "uniform"


def test_reference_names_resolve_to_strategies(tiny_llava):
    lora, full = _lora_backbone(tiny_llava), VisionLanguageBackbone(str(tiny_llava))
    assert isinstance(resolve_reference("auto", DPOLoss(), lora), DisabledAdapter)
    assert isinstance(resolve_reference("auto", DPOLoss(), full), FrozenCopy)
    assert isinstance(resolve_reference("auto", SimPOLoss(), lora), NoReference)
    cached = resolve_reference("cached", DPOLoss(), lora, cache_dir="c")
    assert isinstance(cached, CachedReference) and cached.cache_dir == "c"
    with pytest.raises(ValueError, match="needs a LoRA backbone"):
        resolve_reference(DisabledAdapter(), DPOLoss(), full)
    with pytest.raises(ValueError, match="uses no reference model"):
        resolve_reference("cached", SimPOLoss(), lora)
    with pytest.raises(ValueError, match="one of"):
        resolve_reference("frozen", DPOLoss(), lora)


def test_separate_checkpoint_reference_is_that_models_statistics(world, tiny_llava, tmp_path):
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    other = build_tiny_llava(tmp_path / "other", words=vocabulary(), seed=1)  # same shapes, other weights
    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 2, "shuffle": False}
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = PreferenceModule(_lora_backbone(tiny_llava), DPOLoss(), reference=SeparateCheckpoint(str(other)))
    module.configure_model()
    assert module.reference_mode == "checkpoint" and not any(
        p.requires_grad for p in module.reference.model.parameters()
    )
    assert all(not n.startswith("reference") for n in module.state_dict())  # the reference stays out of checkpoints
    _, _, ref = module.compute(batch)
    expected = VisionLanguageBackbone(str(other)).build().eval()
    with torch.no_grad():
        want = VisionLanguageBackbone(str(other)).statistics(expected, batch)
    torch.testing.assert_close(ref.logps, want.logps)
    own = PreferenceModule(_lora_backbone(tiny_llava), DPOLoss(), reference="adapter")
    own.configure_model()
    _, _, own_ref = own.compute(batch)
    assert not torch.allclose(own_ref.logps, ref.logps)  # it really is the other model


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("cached", CachedReference),
        (
            {"class_path": "mmpo.reference.SeparateCheckpoint", "init_args": {"model_name_or_path": "sft"}},
            SeparateCheckpoint,
        ),
        ({"class_path": "mmpo.reference.FrozenCopy"}, FrozenCopy),
    ],
)
def test_reference_strategies_parse_from_yaml(tiny_llava, reference, expected):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PreferenceModule, "model")
    config = {
        "model": {
            "backbone": {
                "class_path": "mmpo.backbones.VisionLanguageBackbone",
                "init_args": {"model_name_or_path": str(tiny_llava)},
            },
            "loss": {"class_path": "mmpo.losses.DPOLoss"},
            "reference": reference,
        }
    }
    module = parser.instantiate_classes(parser.parse_object(config)).model
    assert isinstance(module.reference, expected)
