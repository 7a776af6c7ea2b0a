"""A run killed with SIGKILL in the middle of an epoch resumes to the same losses as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import write_ranked

REPO = Path(__file__).resolve().parents[1]


def _run(world, tiny_llava, root: Path, extra: list[str], steps: int) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "-m", "mmpo.cli", "fit", "--config", str(REPO / "configs/quickstart.yaml"),
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        "--model.init_args.save_dir=null",
        f"--data.init_args.processor={tiny_llava}",
        f"--data.init_args.train_file={world}/train.jsonl",
        "--data.init_args.val_file=null",
        "--data.init_args.loader.batch_size=4",
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
    # One intra-op thread: the tiny model gains nothing from more, and on a busy machine oversubscribed
    # threads made an 8-step run take 81 s instead of 5 s. Every run of a comparison uses the same setting.
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _losses(root: Path) -> dict[int, tuple[float, list[str], int | None]]:
    rows = [json.loads(line) for line in (root / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["ids"], r["stage"]) for r in rows}  # a replayed step overwrites the killed run's


def _kill_resume_and_compare(world, tiny_llava, tmp_path, kills: tuple[int, ...], steps: int, extra: list[str]):
    """Run straight to ``steps``; run again, SIGKILLed after each step of ``kills`` and resumed from ``last.ckpt``.

    Every step of the killed-and-resumed run must see the records, stage and loss (to 1e-6) of the straight run.
    """
    straight = tmp_path / "straight"
    out = _run(world, tiny_llava, straight, extra, steps)
    assert out.returncode == 0, out.stderr[-3000:]

    killed = tmp_path / "killed"
    resume: list[str] = []
    for kill_at in kills:
        kill = ["--trainer.callbacks+=helpers.callbacks.KillAtStep", f"--trainer.callbacks.step={kill_at}"]
        out = _run(world, tiny_llava, killed, [*extra, *kill, *resume], steps)
        assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]  # really killed, mid-epoch
        assert (killed / "ckpt" / "last.ckpt").exists()
        assert not [p for p in (killed / "ckpt").iterdir() if ".tmp" in p.name]
        assert max(_losses(killed)) == kill_at
        resume = [f"--ckpt_path={killed}/ckpt/last.ckpt"]

    out = _run(world, tiny_llava, killed, [*extra, *resume], steps)
    assert out.returncode == 0, out.stderr[-3000:]

    want, got = _losses(straight), _losses(killed)
    assert sorted(want) == sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step][1] == want[step][1], f"step {step} saw other records"
        assert got[step][2] == want[step][2], f"step {step} served another curriculum stage"
        assert got[step][0] == pytest.approx(want[step][0], abs=1e-6), f"step {step}"
    return want


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(world, tiny_llava, tmp_path):
    # an epoch is 12 steps (48 pairs, 4 a step); checkpoints every 2 steps; killed one step after one, in
    # the first epoch (step 5) and, after resuming, in the second (step 15)
    _kill_resume_and_compare(world, tiny_llava, tmp_path, (5, 15), 18, [])


@pytest.mark.slow
def test_sigkill_with_loader_workers_resumes_at_the_epoch_boundary_like_an_uninterrupted_run(
    world, tiny_llava, tmp_path
):
    # Two loader workers, epochs cut to 4 steps: the last checkpoint before the kill (step 5) is the one
    # after the first epoch's last batch. Lightning makes the training iterator before it advances the
    # epoch, and workers are handed indices as soon as they start: the loader must start them at the
    # first batch, or the second epoch replays the first one's order. (Mid-epoch with workers: below.)
    extra = ["--data.init_args.loader.num_workers=2", "--trainer.limit_train_batches=4"]
    _kill_resume_and_compare(world, tiny_llava, tmp_path, (5,), 6, extra)


@pytest.mark.slow
def test_sigkill_mid_curriculum_resumes_the_stage_and_order_of_an_uninterrupted_run(world, tiny_llava, tmp_path):
    # Curry-DPO: 6 ranked records, 3 pairs each (best_vs_rest), 3 stages of 6 pairs, one epoch (3 steps,
    # batch 2) per stage, 2 loader workers, checkpoints every 2 steps. Killed after step 5, it resumes
    # from step 4, in the middle of stage 1; killed again after step 7, it resumes from step 6, the end
    # of stage 1: the next batch is stage 2's first, as in the straight run.
    ranked = write_ranked(world, tmp_path / "ranked.jsonl")
    extra = [
        "--data=datamodules.RankedPreferenceDataModule", f"--data.init_args.train_file={ranked}",
        f"--data.init_args.data_root={world}",
        "--data.init_args.loader.batch_size=2", "--data.init_args.loader.num_workers=2",
        "--data.init_args.curriculum.stages=3", "--data.init_args.curriculum.epochs_per_stage=1",
        "--trainer.reload_dataloaders_every_n_epochs=1",
    ]  # fmt: skip
    want = _kill_resume_and_compare(world, tiny_llava, tmp_path, (5, 7), 8, extra)
    assert [want[step][2] for step in range(1, 9)] == [0, 0, 0, 1, 1, 1, 2, 2]
