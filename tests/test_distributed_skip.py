"""Under DDP every rank takes the same decision on a skipped or non-finite step (2 CPU processes, gloo).

Before, a rank whose batch was all bad records, or whose loss was NaN, returned None from
``training_step`` and Lightning stopped the run ("Skipping the `training_step` by returning None in
distributed training is not supported"), and a stop on one rank left the other to fail or wait.
"""

import contextlib
import datetime
import functools
import json
import multiprocessing
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from helpers.trainers import quiet_trainer
from lightning import Callback

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.diagnostics import count_device_syncs
from mmpo.losses import DPOLoss, LCPOLoss
from mmpo.module import PreferenceModule

pytestmark = pytest.mark.slow


class _PoisonOneRank(PreferenceModule):
    """A NaN loss (``poison="loss"``) or an infinite gradient (``"gradient"``, before DDP's all-reduce, so
    every rank receives it) on one rank at one training step. Each rank's error is saved to
    ``<error_dir>/rank<r>.error``.

    Defined at module level: it travels to the spawned processes. (Lightning calls ``on_exception`` in
    the parent only, so the ranks' errors are caught here.)
    """

    def __init__(self, *args, poison_rank: int, poison_step: int, error_dir: str, poison="loss", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.poison_rank, self.poison_step, self.error_dir, self.poison = poison_rank, poison_step, error_dir, poison

    def compute(self, batch, split="train"):
        out, policy, reference = super().compute(batch, split)
        if split == "train" and self.global_rank == self.poison_rank and self.trainer.global_step == self.poison_step:
            if self.poison == "loss":
                out.losses = out.losses * float("nan")
            else:
                policy.logps.register_hook(lambda g: g * float("inf"))
        return out, policy, reference

    def _saving_errors(self, hook, *args):
        try:
            return hook(*args)
        except Exception as e:
            Path(self.error_dir, f"rank{self.global_rank}.error").write_text(f"{type(e).__name__}: {e}")
            # the first rank to exit makes torch.multiprocessing end the others: wait (30 s at most)
            # until every rank has saved its error
            with contextlib.suppress(RuntimeError):
                torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            raise

    def training_step(self, batch, batch_idx):
        return self._saving_errors(super().training_step, batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        return self._saving_errors(super().on_before_optimizer_step, optimizer)


class _Record(Callback):
    """Each rank's trainable weights at the start and after every step, and its logged figures, saved
    to ``<out>/rank<r>.pt`` as they come."""

    def __init__(self, out) -> None:
        self.out = out
        self.weights: list[dict[str, torch.Tensor]] = []
        self.syncs: dict[str, int] = {}

    def _snapshot(self, trainer, pl_module) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})
        self._save(trainer)

    def _save(self, trainer) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        loss_state = trainer.lightning_module.loss.state_dict()
        record = {"weights": self.weights, "metrics": metrics, "syncs": self.syncs, "loss_state": loss_state}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        self._snapshot(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:  # what the second step (forward, agreement, backward, optimizer step) reads back
            self._counting = count_device_syncs()
            self._syncs = self._counting.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            self._counting.__exit__(None, None, None)
            self.syncs = {re.sub(r":\d+ ", " ", k): n for k, n in self._syncs.sites("mmpo/").items()}
        self._snapshot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)  # with the epoch's figures


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging when a rank waits for another forever; the spawned ranks are ended."""

    def expire(signum, frame):
        for child in multiprocessing.active_children():
            child.kill()
        raise TimeoutError(f"the distributed run did not end within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _module(tiny_llava, cls=PreferenceModule, optimizer=None, loss=None, **kwargs):
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    optimizer = optimizer or functools.partial(torch.optim.SGD, lr=0.5)
    return cls(backbone, loss or DPOLoss(beta=0.1), optimizer=optimizer, **kwargs)


def _data(tiny_llava, train_file):
    loader = {"batch_size": 1, "shuffle": False}  # rank r serves records r, r + 2, r + 4, ...
    return ImagePreferenceDataModule(str(tiny_llava), train_file=str(train_file), on_bad_sample="skip", loader=loader)


def _fit(module, dm, out, devices=2, **trainer_args):
    out.mkdir(parents=True, exist_ok=True)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = quiet_trainer(
        devices=devices, strategy=strategy, limit_val_batches=0, callbacks=[_Record(out)], default_root_dir=str(out),
        **trainer_args,
    )  # fmt: skip
    # the policy and its LoRA weights are drawn in configure_model from the global RNG, which spawned ranks
    # inherit from this process at launch: seeded, a one-process run and a DDP run start from one initialisation
    torch.manual_seed(0)
    with _deadline(300):
        trainer.fit(module, datamodule=dm)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(devices)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_rank_whose_records_are_all_bad_adds_nothing_and_the_run_goes_on(world, tiny_llava, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:6]]
    bad = [{**r, "images": ["images/corrupt.png"]} if i % 2 else r for i, r in enumerate(rows)]
    _write(data / "half-bad.jsonl", bad)  # rank 1 gets records 1, 3, 5: every one corrupt
    _write(data / "good.jsonl", rows[::2])  # what rank 0 trains on

    ranks = _fit(_module(tiny_llava), _data(tiny_llava, data / "half-bad.jsonl"), tmp_path / "ddp", max_epochs=1)
    (single,) = _fit(_module(tiny_llava), _data(tiny_llava, data / "good.jsonl"), tmp_path / "one", 1, max_epochs=1)

    zero, one = ranks
    assert len(zero["weights"]) == len(one["weights"]) == 4  # the start and three steps on each rank
    assert all(_same(a, b) for a, b in zip(zero["weights"], one["weights"], strict=True))  # never apart
    steps = zip(zero["weights"], zero["weights"][1:], strict=False)
    assert all(not _same(before, after) for before, after in steps)  # every step trained
    # rank 1's empty batches add zero gradients and rank 0's loss counts for both: one process on the
    # good records alone takes the same steps
    for got, want in zip(zero["weights"], single["weights"], strict=True):
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-4)
    # the skips of both ranks are counted, on both
    assert zero["metrics"]["train/data/skipped"] == one["metrics"]["train/data/skipped"] == 3
    # a step reads back two values, as on one process: the gathered table (in place of the loss check)
    # and the gradient check
    assert zero["syncs"] == one["syncs"] == {"mmpo/module.py _agreed_step": 1, "mmpo/module.py _grads_finite": 1}


def test_a_stateful_loss_keeps_one_state_on_every_rank_when_a_rank_has_no_records(world, tiny_llava, tmp_path):
    """LCPO's eta moves with the posteriors of every rank's pairs; a rank whose records were all skipped takes
    part in that reduction with none (no hang), so the ranks agree with one process on the good records.
    (Before ``_fit`` seeded the generator, the two started from different LoRA weights when earlier tests
    had used it, and their eta differed by 2.6e-4 in a full-suite run.)"""
    data = tmp_path / "data"
    shutil.copytree(world, data)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:4]]
    bad = [{**r, "images": ["images/corrupt.png"]} if i % 2 else r for i, r in enumerate(rows)]
    _write(data / "half-bad.jsonl", bad)  # rank 1 gets records 1 and 3: both corrupt
    _write(data / "good.jsonl", rows[::2])

    def fit(train_file, out, devices):
        module = _module(tiny_llava, loss=LCPOLoss(eta_init=0.9, eta_rate=0.5))
        return _fit(module, _data(tiny_llava, train_file), out, devices, max_epochs=1)

    ranks = fit(data / "half-bad.jsonl", tmp_path / "ddp", 2)
    torch.rand(1000)  # an earlier test's use of the generator does not reach the seeded run
    (single,) = fit(data / "good.jsonl", tmp_path / "one", 1)
    etas = [r["loss_state"]["eta"] for r in ranks]
    assert etas[0] == etas[1] != 0.9
    assert ranks[0]["metrics"]["train/data/skipped"] == 2  # rank 1 trained on nothing, yet its eta moved
    # the weights agree to float32 rounding (as in the test above), so the posteriors and eta do too
    assert etas[0] == pytest.approx(single["loss_state"]["eta"], rel=1e-6)
    assert _same(ranks[0]["weights"][0], single["weights"][0])  # one LoRA initialisation


def test_a_nan_on_one_rank_skips_that_step_on_every_rank(world, tiny_llava, tmp_path):
    # AdamW with weight decay moves weights even on a zero gradient: the optimizer step must not run
    adamw = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    module = _module(
        tiny_llava, _PoisonOneRank, adamw, on_nonfinite="skip", poison_rank=1, poison_step=1, error_dir=str(tmp_path)
    )
    zero, one = _fit(module, _data(tiny_llava, world / "train.jsonl"), tmp_path / "ddp", max_steps=3)

    assert all(_same(a, b) for a, b in zip(zero["weights"], one["weights"], strict=True))
    start, first, poisoned, third = zero["weights"]
    assert not _same(first, start)
    assert _same(poisoned, first)  # the NaN step moved no weight, on either rank (identical above)
    assert not _same(third, poisoned)  # and training went on
    assert zero["metrics"]["train/nonfinite_steps"] == one["metrics"]["train/nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in third.values())


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_nonfinite_step_on_one_rank_stops_every_rank_with_the_same_message(world, tiny_llava, tmp_path, poison):
    out = tmp_path / "ddp"
    module = _module(
        tiny_llava, _PoisonOneRank, on_nonfinite="stop", poison_rank=1, poison_step=1, error_dir=str(out),
        poison=poison,
    )  # fmt: skip
    with pytest.raises(Exception, match=f"non-finite {'train loss' if poison == 'loss' else 'gradient'}"):
        _fit(module, _data(tiny_llava, world / "train.jsonl"), out, max_steps=3)  # within the deadline: no rank waits
    errors = [(out / f"rank{r}.error").read_text() for r in range(2)]
    assert errors[0] == errors[1]  # both ranks stopped, with the same message
    # the second step: rank 0 serves record 2, rank 1 record 3 (rank r serves records r, r + 2, ...)
    if poison == "loss":
        want = "FloatingPointError: non-finite train loss on rank(s) [1], records [['train-000003']]"
    else:  # the all-reduced gradient is infinite on both ranks: both batches are named
        want = "FloatingPointError: non-finite gradient on records ['train-000002', 'train-000003']"
    assert errors[0].startswith(want) and "on_nonfinite='skip'" in errors[0]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [len(r["weights"]) for r in ranks] == [2, 2]  # the start and the first step: none after it
