"""``mmpo pami-demo``: VDPO against PaMi-VDPO on the synthetic video world, on the CPU, no downloads.

1. Write the video world (8 frames of 64 px, one or two moving shapes) and yes/no questions in the probes' form
   about training clips (:mod:`mmpo.recipes.pami_data`); build a tiny video-LLM over the world's and the probes'
   words, by default a Qwen2-VL whose tokens see two frames (:mod:`mmpo.recipes.pami_qwen`; ``--family
   llava_next_video``: a LLaVA-NeXT-Video seeing one frame a token), and pretrain its vision tower. Then the
   language model on the questions as text (``--language-steps``), then the language model (and projector) on
   fresh clips rendered in memory (``--video-steps``); 0 skips either.
2. The pretrained model is the SFT model by default; ``--sft-epochs N`` fine-tunes it (full model, tower
   frozen, ``SFTLoss``) on the written open and yes/no questions first. One SFT model is shared by every seed.
3. For each seed, from the SFT model with the same LoRA, steps, batch and learning rate: VDPO (one random
   augmentation per record, ``DPOLoss``) and PaMi-VDPO (K fixed candidates, ``PaMiSelector`` keeping one,
   ``MultiInstanceVDPOLoss``); the reference is the SFT model (the adapter disabled). A seed sets the data
   order, the LoRA initialisation and the candidate draws.
4. The video hallucination probes (``VideoHallucinationEval``, probe seed 0, clips never trained on) and the
   held-out open questions answered exactly (greedy, the first 30 of each kind), before (the SFT model) and after
   each run; mean and standard deviation over seeds.
5. Prompt-awareness: the SFT model's PaMi score (mean per-token JS divergence) of each augmentation on held-out
   direction and colour questions, and how often PaMi-VDPO's selector kept each augmentation, or judged it
   identical to the original, for each question type.

The table is printed and written with every per-seed figure to ``--workdir``/``results.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import time
from pathlib import Path

import lightning as L

from mmpo.recipes.pami_data import (
    AWARENESS_KINDS,
    EVAL_PROBE_SEED,
    FAMILIES,
    TRAIN_PROBE_SEED,
    WITH_SHAPE_COLOR,
    WORLD,
    prepare,
    question_type,
)
from mmpo.recipes.report import spread

__all__ = ["CANDIDATES", "SelectionCounter", "main", "merge_counts", "probe", "prompt_awareness", "train"]

# PaMi-VDPO's fixed candidates: two that break time (reverse, shuffle), one that removes motion (static), two
# that keep it (crop, colour jitter), so a prompt-aware choice has something to choose between.
CANDIDATES = ["reverse", "shuffle", "static", "crop", "color_jitter"]
METRICS = ("basic_acc", "hallucinated_acc", "pair_acc", "yes_ratio", "unparsable")
TYPES = ("temporal", "semantic", "relation", "overall")


def _trainer(callbacks=(), max_steps: int = -1, max_epochs: int | None = None, progress: bool = False) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,  # validation runs for the probes; one batch of the ordinary loss is enough
        max_steps=max_steps,
        max_epochs=max_epochs,
        callbacks=list(callbacks),
    )


def _module(model: Path, loss, lr: float, lora_rank: int | None = None, candidates=None, save_dir=None):
    import torch

    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.module import PreferenceModule

    lora = LoraSettings(r=lora_rank, alpha=2 * lora_rank, dropout=0.0) if lora_rank else None
    backbone = VisionLanguageBackbone(str(model), lora=lora, freeze_vision_tower=True)
    optimizer = functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)
    return PreferenceModule(backbone, loss, optimizer=optimizer, candidates=candidates, save_dir=save_dir)


def _videos(model: Path, train: Path | None, val: Path, batch_size: int, seed: int, negatives=None, shuffle=True):
    from datamodules import VideoPreferenceDataModule, VideoVDPODataModule

    common = {
        "train_file": str(train) if train else None,
        "val_file": str(val),
        "loader": {"batch_size": batch_size, "seed": seed, "shuffle": shuffle},
        "frames": {"num_frames": WORLD["num_frames"]},
    }
    if negatives is None:
        return VideoPreferenceDataModule(str(model), **common)
    return VideoVDPODataModule(str(model), negatives=negatives, **common)


def probe(module, datamodule, n_probes: int, seed: int = EVAL_PROBE_SEED) -> dict[str, float]:
    """The video hallucination probes of ``module``'s policy: ``{"<type>/<metric>": value}``."""
    from mmpo.video_hallucination import VideoHallucinationEval

    callback = VideoHallucinationEval(
        n_probes=n_probes,
        seed=seed,
        clip_frames=WORLD["num_frames"],
        size=WORLD["size"],
        max_objects=WORLD["max_objects"],
        speeds=WORLD["speeds"],
        batch_size=32,
        max_new_tokens=2,
    )
    (results,) = _trainer([callback]).validate(module, datamodule=datamodule, verbose=False)
    prefix = "val/video_hallucination/"
    return {k[len(prefix) :]: float(v) for k, v in results.items() if k.startswith(prefix)}


class SelectionCounter(L.Callback):
    """Counts, per question type, which augmentation PaMi-VDPO's selector kept (with a non-zero weight) and which
    candidates it judged semantically identical to the original (score under the schedule's threshold).

    A Lightning callback: after each training step it reads the selector's ``last`` scores and choice, the
    batch's response tags and record ids, and the type of each record's question.

    Args:
        selector: the run's :class:`mmpo.pami.PaMiSelector`.
        kinds: record id to question type (:func:`mmpo.recipes.pami_data.question_type`).

    Attributes:
        kept: ``{type: {augmentation: groups where it was kept}}``.
        identical: ``{type: {augmentation: groups where it was judged identical}}``.
        groups: ``{type: groups seen}``.
    """

    def __init__(self, selector, kinds: dict[str, str]) -> None:
        super().__init__()
        self.selector, self.kinds = selector, kinds
        self.kept: dict[str, dict[str, int]] = {}
        self.identical: dict[str, dict[str, int]] = {}
        self.groups: dict[str, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last, threshold = self.selector.last, self.selector.schedule.identical_threshold
        for g, (record, tags) in enumerate(zip(batch.ids, last["tags"], strict=True)):
            kind = self.kinds.get(record, "other")
            self.groups[kind] = self.groups.get(kind, 0) + 1
            for index, weight in zip(last["keep"][g, 1:].tolist(), last["weights"][g].tolist(), strict=True):
                if weight > 0:
                    _count(self.kept, kind, tags[index])  # keep holds positions in the group, the original at 0
            for tag, score in zip(tags[1:], last["scores"][g].tolist(), strict=True):
                if not score >= threshold:  # NaN counts as identical, as the selector judges it
                    _count(self.identical, kind, tag)

    def counts(self) -> dict:
        """``{"kept", "identical", "groups"}``, as :func:`merge_counts` adds them up over runs."""
        return {"kept": self.kept, "identical": self.identical, "groups": self.groups}


def _count(table: dict[str, dict[str, int]], kind: str, tag: str, n: int = 1) -> None:
    row = table.setdefault(kind, {})
    row[tag] = row.get(tag, 0) + n


def merge_counts(total: dict, counts: dict) -> dict:
    """Add one run's :meth:`SelectionCounter.counts` into ``total`` (in place) and return it."""
    for name in ("kept", "identical"):
        for kind, row in counts[name].items():
            for tag, n in row.items():
                _count(total.setdefault(name, {}), kind, tag, n)
    for kind, n in counts["groups"].items():
        total.setdefault("groups", {})[kind] = total.get("groups", {}).get(kind, 0) + n
    return total


def train(method: str, sft: Path, data: dict, args, seed: int, kinds: dict[str, str]) -> tuple[dict, dict]:
    """One preference run from the SFT model; returns the probes after it and (PaMi-VDPO) the selections."""
    from datamodules import VideoNegativeSettings
    from mmpo.losses import DPOLoss, MultiInstanceVDPOLoss
    from mmpo.pami import PaMiSelector

    L.seed_everything(seed, verbose=False)
    if method == "vdpo":
        negatives, loss, selector = VideoNegativeSettings(num_candidates=1, sampling="random"), DPOLoss(beta=0.1), None
    else:
        negatives = VideoNegativeSettings(augmentations=CANDIDATES, num_candidates=len(CANDIDATES), sampling="fixed")
        loss, selector = MultiInstanceVDPOLoss(beta=0.1), PaMiSelector(num_selected=1)
    module = _module(sft, loss, args.lr, args.lora_rank, candidates=selector)
    dm = _videos(sft, data["sft"], data["val"], args.batch_size, seed, negatives)
    counter = [SelectionCounter(selector, kinds)] if selector else []
    _trainer(counter, max_steps=args.dpo_steps).fit(module, datamodule=dm)
    figures = probe(module, dm, args.probes, args.probe_seed)
    open_answers = open_question_accuracy(module.policy, data["val"], processor=dm.processor)
    figures |= {f"open/{kind}": share for kind, share in open_answers.items()}
    return figures, (counter[0].counts() if counter else {})


def prompt_awareness(sft: Path, awareness: Path, args) -> dict[str, dict[str, float]]:
    """Mean PaMi score (nats) of each of `CANDIDATES` per question type, the SFT model as the scorer."""
    import torch

    from datamodules import VideoNegativeSettings
    from mmpo.losses import MultiInstanceVDPOLoss
    from mmpo.pami import PaMiSelector

    kinds = {(r := json.loads(line))["id"]: r["kind"] for line in awareness.read_text().splitlines()}
    selector = PaMiSelector(num_selected=1)
    module = _module(sft, MultiInstanceVDPOLoss(), args.lr, args.lora_rank, candidates=selector)
    module.configure_model()
    module.policy.eval()
    negatives = VideoNegativeSettings(augmentations=CANDIDATES, num_candidates=len(CANDIDATES), sampling="fixed")
    dm = _videos(sft, awareness, awareness, 16, 0, negatives, shuffle=False)
    dm.setup("fit")
    sums: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for batch in dm.train_dataloader():
            scores = selector.scores(module, batch)  # (B, K)
            for record, tags, row in zip(batch.ids, batch.response_tags, scores.tolist(), strict=True):
                for tag, value in zip(tags[1:], row, strict=True):
                    sums.setdefault(kinds[record], {}).setdefault(tag, []).append(value)
    return {kind: {tag: statistics.fmean(v) for tag, v in by_tag.items()} for kind, by_tag in sums.items()}


def open_question_accuracy(model, val: Path, per_kind: int = 30, processor=None) -> dict[str, float]:
    """Share of held-out open questions (the first ``per_kind`` of each kind in ``val``) whose greedy answer is
    the chosen one, word for word (spaces before the final "." ignored): does the model read the clip?

    ``model`` is a checkpoint directory, or a loaded model (a PEFT-wrapped one too) with its ``processor``.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from datamodules.vision_text.video_io import read_video
    from mmpo.generation import generate_answers

    if processor is None:
        processor = AutoProcessor.from_pretrained(model)
        model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    by_kind: dict[str, list[dict]] = {}
    for line in val.read_text().splitlines():
        record = json.loads(line)
        by_kind.setdefault(record["kind"], []).append(record)

    def words(text: str) -> list[str]:
        return text.replace(".", " .").split()

    accuracy = {}
    for kind, records in sorted(by_kind.items()):
        records = records[:per_kind]
        clips = [read_video(val.parent / r["videos"][0], WORLD["num_frames"])[0].numpy() for r in records]
        answers = generate_answers(model, processor, [r["prompt"] for r in records], videos=clips)
        accuracy[kind] = statistics.fmean(words(a) == words(r["chosen"]) for a, r in zip(answers, records, strict=True))
    return accuracy


def _table(before: dict, after: dict[str, list[dict]]) -> list[str]:
    lines = [f"{'probe type / metric':<28}{'SFT':>12}{'VDPO':>14}{'PaMi-VDPO':>14}"]
    keys = [f"{kind}/{metric}" for kind in TYPES for metric in METRICS]
    keys += sorted(k for k in before if k.startswith("open/"))  # held-out open questions answered exactly
    for key in keys:
        cells = [f"{before.get(key, float('nan')):>12.3f}"]
        cells += [f"{spread([run[key] for run in after[m]], sep='±'):>14}" for m in ("vdpo", "pami")]
        lines.append(f"{key:<28}" + "".join(cells))
    return lines


def _awareness_lines(scores: dict, selections: dict, threshold: float) -> list[str]:
    lines = [f"{'question':<12}" + "".join(f"{tag:>14}" for tag in CANDIDATES)]
    for kind in [k for k in AWARENESS_KINDS if k in scores]:
        lines.append(f"{kind:<12}" + "".join(f"{scores.get(kind, {}).get(t, float('nan')):>14.4f}" for t in CANDIDATES))
    lines += ["", "PaMi-VDPO training, by question type (all seeds): share of kept candidates per augmentation"]
    for kind, counts in sorted(selections.get("kept", {}).items()):
        total = sum(counts.values())
        shares = "  ".join(f"{tag} {counts.get(tag, 0) / total:.2f}" for tag in CANDIDATES)
        lines.append(f"{kind:<20} ({total:>4} kept)  {shares}")
    lines += [
        "",
        f"share of groups where each augmentation was judged identical (score < {threshold:g} nats: no rejection)",
    ]
    for kind, groups in sorted(selections.get("groups", {}).items()):
        counts = selections.get("identical", {}).get(kind, {})
        shares = "  ".join(f"{tag} {counts.get(tag, 0) / groups:.2f}" for tag in CANDIDATES)
        lines.append(f"{kind:<20} ({groups:>4} groups)  {shares}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="mmpo pami-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/pami_demo", help="where data, models and results go")
    parser.add_argument("--seeds", type=int, default=3, help="preference runs per method (seeds 0..n-1)")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world, the model and the SFT stage")
    parser.add_argument("--n-train", type=int, default=400, help="world training records (open questions)")
    parser.add_argument(
        "--n-yes-no", type=int, default=300, help="yes/no probe pairs on training clips (2 records each)"
    )
    parser.add_argument(
        "--n-val", type=int, default=200, help="world validation records (awareness: its direction/colour)"
    )
    parser.add_argument(
        "--family",
        choices=list(FAMILIES),
        default="qwen2_vl",
        help="the tiny video-LLM: Qwen2-VL (two frames a token, the default) or LLaVA-NeXT-Video (a frame a token)",
    )
    parser.add_argument(
        "--vision-steps", type=int, default=None, help="vision tower pretraining steps (default 300, Qwen2-VL 2000)"
    )
    parser.add_argument(
        "--language-steps",
        type=int,
        default=4000,
        help="pretrain the language model on the questions as text first (0: not)",
    )
    parser.add_argument(
        "--tower-positions", action="store_true", help="the tower's pretraining also regresses each patch's place"
    )
    parser.add_argument(
        "--speeds",
        type=int,
        nargs=2,
        default=WORLD["speeds"],
        metavar=("LEAST", "MOST"),
        help="px per frame of the world's objects (at 64 px frames)",
    )
    parser.add_argument(
        "--shape-color-questions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the world also asks motion-free colour questions (what color is the circle ?), scored for awareness",
    )
    parser.add_argument(
        "--video-steps",
        type=int,
        default=2000,
        help="then train projector and language model on fresh clips (0: not)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=8,
        help="the tower's patch side: LLaVA at 48 px frames (8: 9 tokens a frame, 4: 36), Qwen2-VL at 64 px "
        "(8: 16 tokens for two frames)",
    )
    parser.add_argument(
        "--sft-epochs",
        type=int,
        default=0,
        help="SFT epochs on the written records (0: the pretrained model is the SFT model)",
    )
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--dpo-steps", type=int, default=30, help="optimizer steps of each preference run")
    parser.add_argument("--batch-size", type=int, default=8, help="records per step (SFT uses twice as many)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the preference runs (LoRA)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--reuse-sft", action="store_true", help="use the SFT model already in --workdir (same data settings)"
    )
    parser.add_argument("--probes", type=int, default=60, help="probe pairs per measurement (types take turns)")
    parser.add_argument(
        "--probe-seed",
        type=int,
        default=EVAL_PROBE_SEED,
        help=f"seed of the evaluation probes (default {EVAL_PROBE_SEED}); tune settings on another one",
    )
    args = parser.parse_args(argv)
    if args.vision_steps is None:
        args.vision_steps = FAMILIES[args.family]
    if args.probe_seed == TRAIN_PROBE_SEED + args.world_seed:
        parser.error(f"--probe-seed {args.probe_seed} is the seed of the training yes/no questions; take another")
    if args.tower_positions and args.family != "llava_next_video":
        parser.error(
            "--tower-positions is a head of the LLaVA-NeXT-Video tower's pretraining (--family llava_next_video)"
        )
    previous = dict(WORLD)
    WORLD["speeds"] = list(args.speeds)  # every clip the demo writes, renders or probes reads WORLD
    WORLD["task_weights"] = dict(WITH_SHAPE_COLOR) if args.shape_color_questions else None
    try:
        return _demo(args)
    finally:
        WORLD.update(previous)


def _kind(record: dict) -> str:
    """A record's question type, ``yes/no`` added for the yes/no questions' records."""
    return question_type(record["prompt"]) + (" yes/no" if record["chosen"] in ("yes .", "no .") else "")


def _demo(args: argparse.Namespace) -> dict:
    from augment.video.pami import CloseToFar

    start, seconds = time.perf_counter(), {}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepared = prepare(
        workdir, args.n_train, args.n_yes_no, args.n_val, args.world_seed, args.vision_steps,
        patch_size=args.patch_size, language_steps=args.language_steps, video_steps=args.video_steps,
        tower_positions=args.tower_positions, family=args.family,
    )  # fmt: skip
    vision = prepared["vision"]
    done = "reused" if vision["reused"] else "trained"
    if args.family == "qwen2_vl":
        shares = ", ".join(f"{name} {share:.3f}" for name, share in vision["accuracy"].items())
        print(f"[mmpo] video tower: held-out object cells labelled right: {shares} ({done})")
    else:
        print(
            f"[mmpo] video tower: held-out frames recognised {vision['accuracy']:.3f}, object patches' colour "
            f"{vision['patch_accuracy']:.3f} ({done})"
        )
    if prepared["language"] is not None:
        print(f"[mmpo] language model: held-out text questions answered exactly {prepared['language']['accuracy']:.3f}")
    if prepared["video"] is not None:
        shares = ", ".join(f"{kind} {share:.2f}" for kind, share in prepared["video"]["accuracy"].items())
        print(f"[mmpo] video-language pretraining: held-out clips' questions answered exactly: {shares}")
    seconds["prepare"] = round(time.perf_counter() - t0, 1)
    data = prepared["files"]
    kinds = {(r := json.loads(line))["id"]: _kind(r) for line in data["sft"].read_text().splitlines()}

    t0 = time.perf_counter()
    print("[mmpo] stage 1/3: SFT on open and yes/no questions")
    from mmpo.losses import SFTLoss

    L.seed_everything(args.world_seed, verbose=False)
    sft = workdir / "sft-model"
    if args.sft_epochs == 0:  # the pretrained model, as it is, stands in for the SFT model
        shutil.rmtree(sft, ignore_errors=True)
        shutil.copytree(prepared["model"], sft)
    elif not (args.reuse_sft and (sft / "config.json").is_file()):
        module = _module(prepared["model"], SFTLoss(), args.sft_lr, save_dir=str(sft))
        dm = _videos(prepared["model"], data["sft"], data["val"], 2 * args.batch_size, args.world_seed)
        _trainer(max_epochs=args.sft_epochs, progress=True).fit(module, datamodule=dm)
    seconds["sft"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    before = probe(
        _module(sft, SFTLoss(), args.lr), _videos(sft, None, data["val"], 16, 0), args.probes, args.probe_seed
    )
    seconds["probe SFT"] = round(time.perf_counter() - t0, 1)

    print("[mmpo] stage 2/3: prompt-awareness of the SFT model's scores")
    t0 = time.perf_counter()
    awareness = prompt_awareness(sft, data["awareness"], args)
    answered = open_question_accuracy(sft, data["val"])
    before |= {f"open/{kind}": share for kind, share in answered.items()}
    print("[mmpo] SFT model, held-out open questions answered exactly: " + ", ".join(
        f"{kind} {share:.2f}" for kind, share in answered.items()
    ))  # fmt: skip
    seconds["awareness"] = round(time.perf_counter() - t0, 1)

    after: dict[str, list[dict]] = {"vdpo": [], "pami": []}
    selections: dict = {}
    for seed in range(args.seeds):
        for method in ("vdpo", "pami"):
            print(f"[mmpo] stage 3/3: {method} seed {seed} ({args.dpo_steps} steps)")
            t0 = time.perf_counter()
            figures, counts = train(method, sft, data, args, seed, kinds)
            after[method].append(figures)
            if counts:
                merge_counts(selections, counts)
            seconds[f"{method} seed {seed}"] = round(time.perf_counter() - t0, 1)

    total = round(time.perf_counter() - start, 1)
    lines = [
        "",
        f"mmpo pami-demo: video hallucination probes ({args.probes} pairs, probe seed {args.probe_seed}) and held-out",
        "open questions answered exactly (open/<kind>, greedy, 30 of each kind),",
        f"SFT model and after {args.dpo_steps} steps of each method, mean±std over {args.seeds} seed(s)",
        "",
    ]
    lines += _table(before, after)
    lines += ["", "Prompt-awareness: SFT model's mean per-token JS (nats) of each candidate, held-out questions", ""]
    lines += _awareness_lines(awareness, selections, CloseToFar().identical_threshold)
    lines += ["", f"stage seconds: {seconds}; total {total:.0f} s"]
    print("\n".join(lines))
    results = {
        "before": before,
        "after": after,
        "awareness": {"scores": awareness, **selections},
        "open_questions": answered,
        "settings": {k: v for k, v in vars(args).items()},
        "vision": vision,
        "language": prepared["language"],
        "video_language": prepared["video"],
        "counts": prepared["counts"],
        "seconds": seconds,
        "total_seconds": total,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results
