"""``mmpo plot``: reward curves from a real run's CSV and TensorBoard logs, drawn into a PNG."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpo.cli import main
from mmpo.plot import DPI, FIGSIZE, find_logs, read_csv_metrics, read_tensorboard_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, EPOCHS = 3, 2
LOGGERS = (
    "[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: %(root)s, name: csv}},"
    " {class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: %(root)s, name: tb}}]"
)
CHOSEN, REJECTED = (44, 160, 44), (214, 39, 40)  # matplotlib's tab:green and tab:red


@pytest.fixture(scope="module")
def run(world, tiny_llava, tmp_path_factory) -> Path:
    """A short DPO run of the tiny LLaVA that logs every step to a CSVLogger and a TensorBoardLogger."""
    root = tmp_path_factory.mktemp("run")
    main([
        "fit",
        "--config", str(REPO / "configs/quickstart.yaml"),
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        "--model.init_args.save_dir=null",
        f"--data.init_args.train_file={world}/train.jsonl",
        f"--data.init_args.val_file={world}/val.jsonl",
        "--data.init_args.loader.batch_size=4",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.limit_train_batches={STEPS}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger={LOGGERS % {'root': root}}",
    ])  # fmt: skip
    return root


def _only(run: Path, name: str, dest: Path) -> Path:
    """A run directory holding one of the run's two logs."""
    shutil.copytree(run / name, dest / name)
    return dest


def _colour_pixels(image: Image.Image, rgb: tuple[int, int, int]) -> int:
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 8).sum())


def _check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)
        grey = np.asarray(image.convert("L"))
        assert (grey < 128).mean() > 0.005  # text, axes and curves, not a blank page
        # both reward curves are drawn (a few hundred pixels of each colour at least)
        assert _colour_pixels(image, CHOSEN) > 300 and _colour_pixels(image, REJECTED) > 300


@pytest.mark.slow
def test_csv_run_plots_to_a_png_named_on_stdout(run, tmp_path, capsys):
    run_dir = _only(run, "csv", tmp_path)
    main(["plot", str(run_dir)])
    out = capsys.readouterr().out
    png = run_dir / "reward_curves.png"
    assert f"wrote {png}" in out and "metrics.csv" in out
    _check_png(png)
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_tensorboard_run_plots_to_the_given_file(run, tmp_path, capsys):
    run_dir = _only(run, "tb", tmp_path / "tb-run")
    png = tmp_path / "figures" / "curves.png"
    main(["plot", str(run_dir), "--out", str(png)])
    assert f"wrote {png}" in capsys.readouterr().out
    _check_png(png)


@pytest.mark.slow
def test_the_logs_hold_the_run_figures_and_both_readers_agree(run):
    csv_file, tb_dir = find_logs(run)
    assert csv_file.name == "metrics.csv" and tb_dir.name == "version_0" and tb_dir.parent.name == "tb"
    from_csv, from_tb = read_csv_metrics(csv_file), read_tensorboard_metrics(tb_dir)
    steps, losses = from_csv["train/loss_step"]
    assert steps == list(range(STEPS * EPOCHS))
    # the first step's policy is the reference (LoRA's B starts at zero): DPO loss log 2, rewards 0
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-6)
    assert from_csv["train/rewards/chosen_step"][1][0] == 0.0
    assert len(from_csv["val/rewards/margins"][0]) == EPOCHS and len(from_csv["train/loss_epoch"][0]) == EPOCHS
    names = [f"{s}/{m}" for s in ("train", "val") for m in ("loss", "rewards/chosen", "rewards/margins")]
    for name in [n + "_step" if n.startswith("train") else n for n in names]:
        assert from_tb[name][0] == from_csv[name][0], name
        np.testing.assert_allclose(from_tb[name][1], from_csv[name][1], rtol=1e-6, err_msg=name)  # float32 in TB


@pytest.mark.slow
def test_the_newest_csv_version_is_read(run, tmp_path):
    old = tmp_path / "dpo" / "version_0" / "metrics.csv"
    new = tmp_path / "dpo" / "version_1" / "metrics.csv"
    for path, stamp in ((old, 2_000_000), (new, 1_000_000)):
        path.parent.mkdir(parents=True)
        shutil.copy(next((run / "csv").rglob("metrics.csv")), path)
        os.utime(path, (stamp, stamp))
    assert find_logs(tmp_path)[0] == old  # written last, whatever its version number
    os.utime(new, (3_000_000, 3_000_000))
    assert find_logs(tmp_path)[0] == new


def _fails(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["plot", *argv])
    return str(stop.value.code)


def test_clear_errors(tmp_path):
    assert "not a directory" in _fails([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    message = _fails([str(tmp_path / "empty")])
    assert "no logs" in message and "metrics.csv" in message and "TensorBoard" in message
    sft = tmp_path / "sft" / "version_0"
    sft.mkdir(parents=True)
    (sft / "metrics.csv").write_text("epoch,step,lr-AdamW,grad_norm\n0,0,0.001,1.5\n0,1,0.001,1.2\n")
    message = _fails([str(tmp_path / "sft")])
    assert "no reward metrics" in message and "lr-AdamW" in message
    assert not list(tmp_path.rglob("*.png"))
