"""A run killed with SIGKILL in the middle of an epoch resumes to the same losses as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(world, tiny_llava, root: Path, extra: list[str], steps: int) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "mmpo.cli", "fit", "--config", str(REPO / "configs/quickstart.yaml"),
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        "--model.init_args.save_dir=null",
        f"--data.init_args.processor={tiny_llava}",
        f"--data.init_args.train_file={world}/train.jsonl",
        "--data.init_args.val_file=null",
        "--data.init_args.batch_size=4",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.deterministic=true", "--trainer.enable_checkpointing=true",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root}/ckpt", "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks+=helpers.callbacks.RecordLosses", f"--trainer.callbacks.path={root}/losses.jsonl",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _losses(root: Path) -> dict[int, tuple[float, list[str]]]:
    rows = [json.loads(line) for line in (root / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["ids"]) for r in rows}  # a replayed step overwrites the killed run's


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "steps"), [(5, 8), (15, 18)], ids=["first-epoch", "second-epoch"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(world, tiny_llava, tmp_path, kill_at, steps):
    # an epoch is 12 steps (48 pairs, 4 a step); checkpoints every 2 steps; killed one step after one
    straight = tmp_path / "straight"
    out = _run(world, tiny_llava, straight, [], steps)
    assert out.returncode == 0, out.stderr[-3000:]

    killed = tmp_path / "killed"
    kill = ["--trainer.callbacks+=helpers.callbacks.KillAtStep", f"--trainer.callbacks.step={kill_at}"]
    out = _run(world, tiny_llava, killed, kill, steps)
    assert out.returncode == -signal.SIGKILL  # really killed, mid-epoch
    assert (killed / "ckpt" / "last.ckpt").exists()
    assert not list((killed / "ckpt").glob(".*.tmp"))
    assert max(_losses(killed)) == kill_at

    out = _run(world, tiny_llava, killed, [f"--ckpt_path={killed}/ckpt/last.ckpt"], steps)
    assert out.returncode == 0, out.stderr[-3000:]

    want, got = _losses(straight), _losses(killed)
    assert sorted(want) == sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step][1] == want[step][1], f"step {step} saw other records"
        assert got[step][0] == pytest.approx(want[step][0], abs=1e-6), f"step {step}"
