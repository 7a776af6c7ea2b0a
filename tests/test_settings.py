"""Datamodule settings groups: the grouped form, the migration of the old flat keys (Python, YAML,
command line, saved hyper-parameters) and the CLI's processor link."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from lightning import LightningDataModule

from datamodules import (
    CurriculumSettings,
    DiffusionPreferenceDataModule,
    FrameSettings,
    ImagePreferenceDataModule,
    LoaderSettings,
    RankedPreferenceDataModule,
    VideoPreferenceDataModule,
)
from mmpo.cli import MMPOCLI, migrate_argv

REPO = Path(__file__).resolve().parents[1]
GROUPED = "flat settings are grouped now"


def test_flat_python_arguments_land_in_their_groups_with_a_warning():
    with pytest.warns(FutureWarning, match=r"batch_size → loader\.batch_size"):
        old = ImagePreferenceDataModule("p", batch_size=3, num_workers=2, seed=7, shuffle=False)
    new = ImagePreferenceDataModule("p", loader=LoaderSettings(batch_size=3, num_workers=2, seed=7, shuffle=False))
    assert old.loader == new.loader == LoaderSettings(3, None, 2, False, 7, None)
    with pytest.warns(FutureWarning, match=r"num_frames → frames\.num_frames"):
        video = VideoPreferenceDataModule("p", num_frames=5, frame_sampling="fps", target_fps=2.0)
    assert video.frames == FrameSettings(5, "fps", 2.0)
    with pytest.warns(FutureWarning, match=r"curriculum_stages → curriculum\.stages"):
        ranked = RankedPreferenceDataModule("p", curriculum_stages=3, curriculum_epochs_per_stage=2)
    assert ranked.curriculum == CurriculumSettings(stages=3, epochs_per_stage=2)
    with pytest.warns(FutureWarning, match=GROUPED):
        diffusion = DiffusionPreferenceDataModule(batch_size=5, eval_batch_size=2)
    assert (diffusion.loader.batch_size, diffusion.loader.eval_size) == (5, 2)


def test_settings_given_twice_or_unknown_are_errors():
    with pytest.raises(ValueError, match="batch_size and loader.batch_size are both set"):
        ImagePreferenceDataModule("p", batch_size=2, loader={"batch_size": 4})
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['num_frames'\]"):
        ImagePreferenceDataModule("p", num_frames=4)  # an image module has no frames group
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['batch'\]"):
        ImagePreferenceDataModule("p", loader={"batch": 4})
    with pytest.raises(ValueError, match="needs frames.target_fps"):
        VideoPreferenceDataModule("p", frames={"frame_sampling": "fps"})
    with pytest.raises(ValueError, match="loader.batch_size must be >= 1"):
        LoaderSettings(batch_size=0)
    with pytest.raises(ValueError, match="not both"):
        CurriculumSettings(stages=3, stage=0, epochs_per_stage=1)


def test_saved_hyperparameters_are_plain_values_that_rebuild_the_module(tmp_path):
    dm = RankedPreferenceDataModule(
        "p", train_file="t.jsonl", loader={"batch_size": 2, "seed": 5}, curriculum={"stages": 3}, serve_lists=False
    )
    hparams = dict(dm.hparams)
    assert hparams["loader"] == dataclasses.asdict(LoaderSettings(batch_size=2, seed=5))
    assert hparams["curriculum"] == {"stages": 3, "stage": None, "epochs_per_stage": None}
    # checkpoints are read with weights_only=True: nothing in the hyper-parameters may need unpickling
    torch.save({"datamodule_hyper_parameters": hparams}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["datamodule_hyper_parameters"]
    rebuilt = RankedPreferenceDataModule(**loaded)
    assert (rebuilt.loader, rebuilt.curriculum, rebuilt.files) == (dm.loader, dm.curriculum, dm.files)
    video = VideoPreferenceDataModule("p", frames=FrameSettings(num_frames=3))
    assert VideoPreferenceDataModule(**dict(video.hparams)).frames == FrameSettings(num_frames=3)


def test_a_checkpoint_written_before_the_groups_still_rebuilds_its_datamodule():
    # what save_hyperparameters stored for ImagePreferenceDataModule before the settings were grouped
    old = {
        "processor": "p", "train_file": "t.jsonl", "val_file": None, "test_file": None, "data_root": None,
        "batch_size": 8, "eval_batch_size": None, "num_workers": 1, "max_length": 64, "on_bad_sample": "skip",
        "shuffle": True, "seed": 3, "trust_remote_code": False, "image_placeholder": "<image>", "pin_memory": None,
    }  # fmt: skip
    with pytest.warns(FutureWarning, match=GROUPED):
        dm = ImagePreferenceDataModule(**old)
    assert dm.loader == LoaderSettings(batch_size=8, num_workers=1, seed=3)
    assert (dm.max_length, dm.on_bad_sample) == (64, "skip")


def _old_video_config(tmp_path: Path, tiny_llava: Path) -> Path:
    """A config in the flat form users wrote before the groups (and naming the processor)."""
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False},
        "model": {
            "class_path": "mmpo.module.PreferenceModule",
            "init_args": {
                "backbone": {
                    "class_path": "mmpo.backbones.VisionLanguageBackbone",
                    "init_args": {"model_name_or_path": str(tiny_llava)},
                },
                "loss": {"class_path": "mmpo.losses.DPOLoss"},
            },
        },
        "data": {
            "class_path": "datamodules.VideoPreferenceDataModule",
            "init_args": {
                "processor": str(tiny_llava),
                "train_file": "data/train.jsonl",
                "batch_size": 3,
                "num_workers": 2,
                "num_frames": 6,
                "frame_sampling": "uniform",
                "max_length": 512,
            },
        },
    }
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_old_yaml_and_command_line_keys_are_migrated_by_the_cli(tmp_path, tiny_llava):
    config = _old_video_config(tmp_path, tiny_llava)
    with pytest.warns(FutureWarning, match=r"old\.yaml: data\.init_args\.batch_size → loader\.batch_size") as seen:
        cli = MMPOCLI(args=["--config", str(config), "--data.init_args.seed=11", "--data.eval_batch_size=1"], run=False)
    message = str(seen[0].message)
    assert "num_frames → frames.num_frames" in message and "--data.eval_batch_size → loader.eval_batch_size" in message
    dm = cli.datamodule
    assert dm.loader == LoaderSettings(batch_size=3, eval_batch_size=1, num_workers=2, seed=11)
    assert dm.frames == FrameSettings(num_frames=6, frame_sampling="uniform")
    assert dm.max_length == 512
    # the same run written in the new form parses to the same datamodule, without a warning
    spec = yaml.safe_load(config.read_text())
    args = spec["data"]["init_args"]
    for key in ("batch_size", "num_workers", "num_frames", "frame_sampling"):
        args.pop(key)
    args.update(loader={"batch_size": 3, "num_workers": 2}, frames={"num_frames": 6})
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump(spec))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{GROUPED}.*")
        again = MMPOCLI(args=["--config", str(new), "--data.init_args.loader.seed=11"], run=False).datamodule
    assert (again.loader.batch_size, again.loader.seed, again.frames) == (3, 11, dm.frames)


class OwnDataModule(LightningDataModule):
    """A user's datamodule with a flat ``batch_size``: not an mmpo module, so never migrated."""

    def __init__(self, batch_size: int = 1) -> None:
        super().__init__()
        self.batch_size = batch_size


def test_a_users_own_datamodule_keeps_its_flat_keys():
    argv = ["fit", "--data.class_path", f"{__name__}.OwnDataModule", "--data.init_args.batch_size=4"]
    assert migrate_argv(argv) == argv
    moved = migrate_argv(["fit", "--data.class_path=datamodules.ImagePreferenceDataModule", "--data.batch_size", "4"])
    assert moved[-2:] == ["--data.init_args.loader.batch_size", "4"]


def test_the_processor_defaults_to_the_backbone_checkpoint_and_an_explicit_one_is_kept(tmp_path, tiny_llava):
    config = _old_video_config(tmp_path, tiny_llava)
    spec = yaml.safe_load(config.read_text())
    del spec["data"]["init_args"]["processor"]
    config.write_text(yaml.safe_dump(spec))
    with pytest.warns(FutureWarning, match=GROUPED):
        linked = MMPOCLI(args=["--config", str(config)], run=False).datamodule
    assert linked.processor_name == str(tiny_llava)
    other = tmp_path / "processor-elsewhere"
    with pytest.warns(FutureWarning, match=GROUPED):
        kept = MMPOCLI(args=["--config", str(config), f"--data.init_args.processor={other}"], run=False).datamodule
    assert kept.processor_name == str(other)
    with pytest.raises(ValueError, match="no processor: pass processor="):
        ImagePreferenceDataModule(train_file="t.jsonl").collator()
