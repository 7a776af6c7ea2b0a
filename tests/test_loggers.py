"""Logging: TensorBoard is a dependency and Lightning's default logger; the W&B and MLflow configs log a run."""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from mmpo.cli import MMPOCLI, main

REPO = Path(__file__).resolve().parents[1]
LOGGING = {"mlflow": "MLFlowLogger", "wandb": "WandbLogger"}


def _dependency_names() -> set[str]:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() for d in spec["project"]["dependencies"]}


def test_tensorboard_and_matplotlib_are_core_dependencies():
    assert {"tensorboard", "matplotlib"} <= _dependency_names()
    assert not {"wandb", "mlflow", "mlflow-skinny"} & _dependency_names()  # the configs name them, users install them


def test_a_config_without_a_logger_logs_to_tensorboard(tiny_llava, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    config = REPO / "configs/llava15_7b_dpo_lora.yaml"
    assert "logger" not in yaml.safe_load(config.read_text())["trainer"]  # the real-model configs leave it to Lightning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = MMPOCLI(
            args=[
                "--config", str(config),
                f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
                "--trainer.accelerator=cpu",
                f"--trainer.default_root_dir={tmp_path}",
            ],
            run=False,
        )  # fmt: skip
    assert isinstance(cli.trainer.logger, TensorBoardLogger)
    assert Path(cli.trainer.logger.log_dir) == tmp_path / "lightning_logs" / "version_0"
    assert not [w for w in caught if "tensorboardX" in str(w.message)]  # Lightning's CSV fallback warning is gone


def test_the_quickstart_configs_keep_their_csv_logger():
    # `mmpo plot runs/quickstart/dpo` (docs/getting-started.md) reads the CSV files these write
    for name, run in (("quickstart_sft.yaml", "sft"), ("quickstart.yaml", "dpo")):
        logger = yaml.safe_load((REPO / "configs" / name).read_text())["trainer"]["logger"]
        assert logger["class_path"] == "lightning.pytorch.loggers.CSVLogger"
        assert logger["init_args"] == {"save_dir": "runs/quickstart", "name": run}


def _header_command(name: str) -> list[str]:
    """The ``mmpo ...`` usage line of a logging config's header, as an argument list."""
    text = (REPO / "configs" / "logging" / f"{name}.yaml").read_text()
    (command,) = re.findall(r"^#\s+(mmpo .*)$", text, re.M)
    return command.split()[1:]


@pytest.mark.parametrize("name", sorted(LOGGING))
def test_logging_config_replaces_the_logger_of_a_complete_config(name, capsys, monkeypatch):
    # parsed only, so this runs without wandb / mlflow installed
    argv = _header_command(name)
    assert argv == ["fit", "--config", "configs/quickstart.yaml", "--config", f"configs/logging/{name}.yaml"]
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    assert stop.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    logger = printed["trainer"]["logger"]
    assert logger["class_path"] == f"lightning.pytorch.loggers.{LOGGING[name]}"
    written = yaml.safe_load((REPO / "configs/logging" / f"{name}.yaml").read_text())["trainer"]["logger"]
    for key, value in written["init_args"].items():
        assert logger["init_args"][key] == value, key
    assert printed["model"]["init_args"]["loss"]["class_path"] == "mmpo.losses.DPOLoss"  # the rest is the quickstart's


def _fit(name: str, world: Path, tiny_llava: Path, tmp_path: Path, monkeypatch) -> None:
    """The config's header command, run in ``tmp_path`` on the tiny model: 2 steps, then 1 validation batch."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    main([
        *_header_command(name),
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        "--model.init_args.save_dir=null",
        f"--data.init_args.train_file={world}/train.jsonl",
        f"--data.init_args.val_file={world}/val.jsonl",
        "--data.init_args.loader.batch_size=4",
        f"--trainer.default_root_dir={tmp_path}/root",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
    ])  # fmt: skip


@pytest.mark.slow
def test_mlflow_config_logs_a_run_offline(world, tiny_llava, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the MLflow config needs `pip install mlflow`")
    # MLflow 3 refuses a folder store unless told (the config's header says so); nothing leaves the machine
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _fit("mlflow", world, tiny_llava, tmp_path, monkeypatch)
    (run,) = [p for p in (tmp_path / "runs/mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert (run / "tags/mlflow.runName").is_file() and (run / "params/max_length").read_text() == "128"
    rows = [line.split() for line in (run / "metrics/train/loss_step").read_text().splitlines()]
    assert [int(step) for _, _, step in rows] == [0, 1]
    # the first step's policy is the reference (LoRA's B starts at zero): DPO loss log 2
    assert math.isclose(float(rows[0][1]), math.log(2), rel_tol=1e-6)
    for metric in ("val/loss", "val/rewards/margins", "val/rewards/accuracies", "train/rewards/chosen_step"):
        assert (run / "metrics" / metric).is_file(), metric


@pytest.mark.slow
def test_wandb_config_logs_a_run_offline(world, tiny_llava, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the W&B config needs `pip install wandb`")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(var, value)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    try:
        _fit("wandb", world, tiny_llava, tmp_path, monkeypatch)
        wandb.finish()  # Lightning leaves the run open (for notebooks); the process would close it at exit
    finally:
        wandb.teardown()
    (log,) = (tmp_path / "runs/wandb/wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()  # the run's record log, which `wandb sync` uploads: keys and JSON values as text
    for metric in (b"train/loss_step", b"val/loss", b"val/rewards/margins", b"train/rewards/chosen_step"):
        assert metric in data, metric
    assert b"0.693147" in data  # the first step's loss, log 2
