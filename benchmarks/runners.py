"""One measured training run per framework; each runs in its own child process (see bench_dpo.py).

Both runs train LoRA r=16 (alpha 32, no dropout) on the language model's linear layers with the
disabled adapter as the reference, sigmoid DPO (beta 0.1), AdamW at a constant 1e-5 without weight
decay, no gradient checkpointing, loader in the main process. A callback stamps the end of every
optimizer step; the timed window runs from the end of the last warm-up step (or from the start of
training, with no warm-up) to the end of the last step, so it holds data loading and collation,
the forward and backward passes, and the optimizer step.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from presets import LORA, LORA_TARGETS, RESPONSE_TOKENS, Preset

__all__ = ["StepClock", "peak_memory", "rss_now_mb", "run_mmpo", "run_trl"]

LEARNING_RATE = 1e-5
BETA = 0.1


class StepClock:
    """Timestamps of the start of training and of each step's end (CUDA synchronised)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.start = 0.0
        self.ends: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.start = self._now()

    def step(self) -> None:
        self.ends.append(self._now())

    def summary(self, warmup: int, pairs_per_step: int) -> dict[str, Any]:
        stamps = [self.start, *self.ends]
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        timed = stamps[-1] - stamps[warmup]
        n = len(self.ends) - warmup
        if n <= 0:
            raise RuntimeError(f"ran {len(self.ends)} steps, no timed step after {warmup} warm-up steps")
        median = statistics.median(steps[warmup:])
        return {
            "timed_steps": n,
            "timed_seconds": timed,
            "pairs_per_s": n * pairs_per_step / timed,
            "pairs_per_s_median_step": pairs_per_step / median,  # less sensitive to a busy machine's stalls
            "step_seconds": [round(s, 4) for s in steps],
        }


def rss_now_mb() -> float:
    """The process's resident memory now (Linux ``VmRSS``; the peak so far where that is unreadable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(cuda: bool, imports_rss_mb: float) -> dict[str, Any]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    # what training added on top of the libraries (model classes imported at load time included)
    out = {"peak_rss_mb": rss_mb, "imports_rss_mb": imports_rss_mb, "above_imports_mb": rss_mb - imports_rss_mb}
    if cuda:
        import torch

        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_mb"] = out.get("peak_cuda_mb", rss_mb)
    return out


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_mmpo(
    preset: Preset,
    model_dir: Path,
    data: Path,
    images: int,
    steps: int,
    warmup: int,
    shared_prefix: bool,
    cached_reference: bool = False,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """Train with mmpo through a Lightning Trainer, as users do.

    With ``cached_reference`` the reference log-probs of the whole data set are computed before the
    first step (timed on its own as ``cache_seconds``, outside the timed window) and read back during
    training instead of running the reference. ``callbacks`` are added to the Trainer's (the sync audit
    uses this).
    """
    import functools
    import shutil
    import tempfile

    import lightning as L
    import torch

    from datamodules import ImagePreferenceDataModule
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.losses import DPOLoss
    from mmpo.module import PreferenceModule

    imports_rss_mb = rss_now_mb()
    cuda = preset.device == "cuda"
    batch = preset.batch[images]
    clock = StepClock(cuda)
    seen: dict[str, int] = {}

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            clock.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if not seen:
                seen["response_tokens"] = int(batch_.response_mask[0].sum())
                seen["prompt_tokens"] = int(batch_.prompt_lengths[0])
                seen["sequence_width"] = int(batch_.input_ids.shape[1])
            clock.step()

    lora = LoraSettings(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=LORA_TARGETS)
    backbone = VisionLanguageBackbone(str(model_dir), lora=lora, dtype=preset.dtype, shared_prefix=shared_prefix)
    cache_dir = tempfile.mkdtemp(prefix="mmpo-bench-cache-")
    module = PreferenceModule(
        backbone,
        DPOLoss(beta=BETA),
        optimizer=functools.partial(torch.optim.AdamW, lr=LEARNING_RATE, weight_decay=0.0),
        reference="cached" if cached_reference else "auto",
        reference_cache_dir=cache_dir,
    )
    cache_time: dict[str, float] = {}
    prepare = module.reference.prepare  # the strategy's pass over the data (caching, for reference: cached)

    def timed_prepare(owner, splits):
        t0 = clock._now()
        prepare(owner, splits)
        cache_time["cache_seconds"] = cache_time.get("cache_seconds", 0.0) + clock._now() - t0

    module.reference.prepare = timed_prepare
    dm = ImagePreferenceDataModule(
        processor=str(model_dir),
        train_file=str(data),
        max_length=None,
        loader={"batch_size": batch, "num_workers": 0, "seed": 0},
    )
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if preset.dtype == "bfloat16" else "32-true",
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*(callbacks or []), Timer()],  # added ones first: their batch-end hooks run before the clock syncs
    )
    L.seed_everything(0, verbose=False)
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        **({"cache_seconds": cache_time.get("cache_seconds", 0.0)} if cached_reference else {}),
        **clock.summary(warmup, batch),
        **peak_memory(cuda, imports_rss_mb),
        **seen,
        "trainable_params": _trainable(module.policy),
        "loss": float(trainer.callback_metrics.get("train/loss_step", float("nan"))),
    }


def _trl_dataset(data: Path):
    import datasets

    root = data.parent
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    for row in rows:
        row["images"] = [str(root / p) for p in row["images"]]
        row.pop("id", None)
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("images", datasets.Sequence(datasets.Image()))


def run_trl(preset: Preset, model_dir: Path, data: Path, images: int, steps: int, warmup: int) -> dict[str, Any]:
    """Train with TRL's DPOTrainer: model path, processor, PIL-image data set and a peft config."""
    import tempfile

    import torch
    from peft import LoraConfig
    from transformers import AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    imports_rss_mb = rss_now_mb()
    cuda = preset.device == "cuda"
    batch = preset.batch[images]
    clock = StepClock(cuda)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step()

    processor = AutoProcessor.from_pretrained(model_dir)
    dataset = _trl_dataset(data)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=None,  # no truncation: every response keeps its 128 tokens
            gradient_checkpointing=False,
            bf16=preset.dtype == "bfloat16",
            use_cpu=not cuda,
            dataloader_num_workers=0,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            model_init_kwargs={"dtype": preset.dtype},
        )
        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS,
            bias="none",
        )
        trainer = DPOTrainer(
            model=str(model_dir),
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=peft_config,
            callbacks=[Timer()],
        )
        first = trainer.data_collator([dataset[0]])
        completion = first["completion_mask"]
        result = trainer.train()
    return {
        **clock.summary(warmup, batch),
        **peak_memory(cuda, imports_rss_mb),
        "response_tokens": int(completion[0].sum()),
        "prompt_tokens": int(completion.shape[1] - completion[0].sum()),
        "trainable_params": _trainable(trainer.model),
        "loss": float(result.training_loss),
        "torch_threads": torch.get_num_threads(),
    }


def check_response_tokens(result: dict[str, Any]) -> None:
    if result.get("response_tokens") != RESPONSE_TOKENS:
        raise RuntimeError(f"expected {RESPONSE_TOKENS} response tokens, the run saw {result.get('response_tokens')}")
