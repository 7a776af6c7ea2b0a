"""``mmpo mia-demo``: MIA-DPO end to end on the shapes world, on the CPU, no downloads.

1. Write the shapes world and a random-init tiny LLaVA whose vocabulary covers MIA-DPO's prompts;
   pretrain its vision tower on shapes-world scenes (a stand-in for CLIP: :mod:`mmpo.tiny.vision`)
   and its language model on labelled caption lists, text only (a stand-in for an LLM's language
   pretraining, which is where a real model learns to follow "In Image2, ...":
   :mod:`mmpo.tiny.language`).
2. SFT on single images only (``configs/mia_dpo/sft.yaml``); half the prompts show their one image under a
   sequence label (``Image3: <image>\nIn Image3, ...``) so that the prompt's words are known, and 1,000
   text-only labelled caption lists are mixed in, as LLaVA mixes text conversations into its SFT data.
3. Measure the SFT model: hallucination probes on single images and on two- and three-image sequences
   (``mmpo validate`` with ``configs/mia_dpo/dpo.yaml``, whose LoRA starts at zero).
4. Build MIA-DPO pairs from the single-image training set with the SFT model
   (``mmpo build-negatives --config configs/mia_dpo/build.yaml``).
5. DPO on the built pairs plus a replay of a quarter of the SFT records (single images and text lists, with
   the world's own rejected answers), so that single images are not forgotten (``configs/mia_dpo/dpo.yaml``),
   then measure again. The reference (the SFT model) is cached: its log-probs are computed once, before
   the first step, and read from disk in every epoch.

Everything lands under ``--workdir`` (default ``runs/mia_dpo``, where the configs point); the table is
printed and written to ``results.json``. Each stage is the ordinary command on its config, so any of
them can be rerun alone.

Probe seeds: ``configs/mia_dpo/dpo.yaml`` probes with seed 0 (``TUNING_PROBE_SEED``), the scenes the
recipe was tuned on; ``--probe-seed`` reports on other scenes. ``--seeds`` (several draws, mean ± std)
and ``--ablation`` (the attention filter against keeping every wrong answer and against a random
subset as large) run in :mod:`mmpo.recipes.mia_ablation`, which reports on ``REPORT_PROBE_SEED`` (1)
unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

__all__ = [
    "MIA_WORDS",
    "REPORT_PROBE_SEED",
    "ROWS",
    "TUNING_PROBE_SEED",
    "WORLD",
    "command_line_parser",
    "main",
    "prepare",
    "probe_callback",
    "probe_figures",
    "resolve_config",
    "stage_cli",
    "write_replay_split",
    "write_sft_split",
]

PLACEHOLDER = "runs/mia_dpo"
# The world the demonstration uses: one object per scene, captions weighted up.
WORLD = {"max_objects": 1, "task_weights": {"caption": 0.5, "color": 0.2, "presence": 0.3}}
MODEL = {"image_size": 64, "patch_size": 16, "vision_width": 128}
# Stands in for CLIP's pretraining: the tower learns to see shapes before the language model meets it.
VISION_PRETRAINING = {"steps": 2000, "batch_size": 64, "lr": 2e-3}
# Stands in for an LLM's language pretraining: lists of up to 5 labelled captions, a question about one.
LANGUAGE_PRETRAINING = {"steps": 1000, "batch_size": 32, "lr": 1e-3, "max_items": 5}
# Share of SFT prompts that show their one image under a sequence label, and the largest label.
SFT_LABELLED = {"fraction": 0.5, "max_label": 5}
# Text-only labelled caption lists mixed into the SFT data (as LLaVA mixes text conversations into its SFT).
SFT_TEXT_LISTS = 1000
# Share of the SFT records (single images and text lists, with the world's rejected answers) replayed in DPO.
REPLAY_FRACTION = 0.25
# Words of MIA-DPO's prompt rewriting ("Image2: <image>", "In Image2, ...", pic-in-pic phrasings).
MIA_WORDS = ("In", ",", ":", *(f"Image{i}" for i in range(1, 10)))
# The probe seed the recipe was tuned on (dpo.yaml's), and the held-out one that --seeds / --ablation report on.
TUNING_PROBE_SEED, REPORT_PROBE_SEED = 0, 1

ROWS = [
    ("chair_s", "captions with an invented object (CHAIR_s)"),
    ("chair_i", "named objects that are invented (CHAIR_i)"),
    ("object_recall", "target objects named"),
    ("caption_exact", "exact captions"),
    ("pope_accuracy", "yes/no presence accuracy (POPE)"),
    ("pope_precision", "yes/no: precision (positive = yes)"),
    ("pope_recall", "yes/no: recall"),
    ("pope_f1", "yes/no: F1"),
    ("pope_yes_ratio", "yes/no: share of yes"),
]


def write_sft_split(
    data: Path, seed: int, fraction: float = SFT_LABELLED["fraction"], text_lists: int = SFT_TEXT_LISTS
) -> Path:
    """``data/sft_train.jsonl``: the training records, ``fraction`` of their prompts sequence-labelled, and text.

    A labelled prompt shows the record's single image as ``Image{k}: <image>\nIn Image{k}, <question>``
    with k drawn from 1..``SFT_LABELLED["max_label"]``: the words of MIA-DPO's sequence prompt. Each record's
    draw depends only on (seed, record id). After them come ``text_lists`` text-only records, labelled
    caption lists as in the language pretraining (:func:`mmpo.tiny.language.labelled_list_example`),
    as LLaVA's SFT mixes text-only conversations into its image data so that the language model keeps
    what it knew.
    """
    from augment.mia.prompts import labelled_image_prompt
    from datamodules.core.atomic import atomic_write_text
    from mmpo.tiny.language import labelled_list_example

    lines = []
    for line in (data / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        rng = random.Random(f"mmpo-mia-demo/sft/{seed}/{record['id']}")
        if rng.random() < fraction:
            record["prompt"] = labelled_image_prompt(record["prompt"], rng.randint(1, SFT_LABELLED["max_label"]))
        lines.append(json.dumps(record))
    rng = random.Random(f"mmpo-mia-demo/sft-text/{seed}")
    for i in range(text_lists):
        example = labelled_list_example(rng, SFT_LABELLED["max_label"], WORLD["max_objects"], WORLD["task_weights"])
        lines.append(json.dumps({"id": f"text-{i:06d}", **example}))
    out = data / "sft_train.jsonl"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def write_replay_split(data: Path, seed: int, fraction: float = REPLAY_FRACTION) -> Path:
    """``data/dpo_replay.jsonl``: a seeded ``fraction`` of ``sft_train.jsonl``, replayed in the preference stage.

    The records (single images and text lists, in file order) keep the world's own rejected answer (a
    changed colour or shape, the opposite yes/no), so the preference stage keeps seeing single images next
    to the multi-image pairs it learns from.
    """
    from datamodules.core.atomic import atomic_write_text

    lines = (data / "sft_train.jsonl").read_text().splitlines()
    rng = random.Random(f"mmpo-mia-demo/replay/{seed}")
    kept = sorted(rng.sample(range(len(lines)), round(fraction * len(lines))))
    out = data / "dpo_replay.jsonl"
    atomic_write_text(out, "".join(lines[i] + "\n" for i in kept))
    return out


def prepare(
    workdir: Path,
    n_train: int,
    n_val: int,
    seed: int,
    vision_steps: int | None = None,
    language_steps: int | None = None,
    sft_text_lists: int = SFT_TEXT_LISTS,
) -> None:
    """Write the shapes world, its SFT and replay splits and the pretrained tiny LLaVA under ``workdir``.

    The world, the model and its two pretrainings are reused when already there with the same settings;
    the splits are cheap and rewritten from the world each time.
    """
    from augment.mia.prompts import PIC_IN_PIC_PHRASINGS
    from datamodules.worlds.shapes import tokenize, vocabulary, write_shapes_world
    from mmpo.tiny.language import pretrain_tiny_language_model
    from mmpo.tiny.llava import build_tiny_llava
    from mmpo.tiny.vision import pretrain_tiny_vision_tower

    write_shapes_world(workdir / "data", n_train=n_train, n_val=n_val, seed=seed, overwrite=True, **WORLD)
    write_sft_split(workdir / "data", seed, text_lists=sft_text_lists)
    write_replay_split(workdir / "data", seed)
    print(f"[mmpo] shapes world: {n_train} train / {n_val} val records in {workdir / 'data'}")
    words = set(vocabulary()) | set(MIA_WORDS)
    for phrasing in PIC_IN_PIC_PHRASINGS:
        words |= set(tokenize(phrasing))
    path = build_tiny_llava(workdir / "tiny-llava", words=sorted(words), seed=seed, **MODEL)
    print(f"[mmpo] tiny LLaVA checkpoint at {path}")
    vision = {**VISION_PRETRAINING, **({"steps": vision_steps} if vision_steps is not None else {})}
    report = pretrain_tiny_vision_tower(path, max_objects=WORLD["max_objects"], seed=seed, **vision)
    state = "reused" if report["reused"] else f"{report['seconds']} s"
    print(f"[mmpo] vision tower pretrained ({state}): held-out scenes recognised {report['accuracy']:.3f}")
    language = {**LANGUAGE_PRETRAINING, **({"steps": language_steps} if language_steps is not None else {})}
    report = pretrain_tiny_language_model(
        path, max_objects=WORLD["max_objects"], task_weights=WORLD["task_weights"], seed=seed, **language
    )
    state = "reused" if report["reused"] else f"{report['seconds']} s"
    print(
        f"[mmpo] language model pretrained on labelled caption lists ({state}): held-out answers exact "
        f"{report['accuracy']:.3f} (by list length {report['accuracy_by_items']})"
    )


def resolve_config(config: Path, workdir: Path) -> Path:
    """A copy of ``config`` under ``workdir`` with its ``runs/mia_dpo`` paths pointed at ``workdir``."""
    resolved = workdir / f"{config.stem}.resolved.yaml"
    resolved.write_text(config.read_text().replace(PLACEHOLDER, str(workdir)))
    return resolved


def stage_cli(config: Path, workdir: Path, extra: list[str]):
    """The ``mmpo`` CLI on ``config`` with its ``runs/mia_dpo`` paths pointed at ``workdir`` (not run)."""
    from mmpo.recipes.quickstart import run_config

    return run_config(config, workdir, extra, placeholder=PLACEHOLDER)


def probe_callback(trainer, probes: int | None = None, seed: int | None = None):
    """The trainer's :class:`~mmpo.hallucination.HallucinationEval`, with ``probes`` per kind and ``seed`` if given."""
    from mmpo.hallucination import HallucinationEval

    for callback in trainer.callbacks:
        if isinstance(callback, HallucinationEval):
            if probes is not None:
                callback.n_captions = callback.n_questions = probes
            if seed is not None:
                callback.seed = seed
            callback._probes = None  # drawn again with the new settings
            return callback
    raise ValueError("the preference config has no mmpo.hallucination.HallucinationEval callback")


def probe_figures(results: list[dict]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items() if "/hallucination/" in k}


def _table(before: dict, after: dict, settings: list[str]) -> list[str]:
    lines = [f"{'':<46}" + "".join(f"{s + ' SFT':>16}{s + ' +DPO':>16}" for s in settings)]
    for key, label in ROWS:
        cells = []
        for s in settings:
            name = f"val/hallucination/{s}/{key}"
            cells += [f"{before[name]:>16.3f}" if name in before else f"{'-':>16}"]
            cells += [f"{after[name]:>16.3f}" if name in after else f"{'-':>16}"]
        lines.append(f"{label:<46}" + "".join(cells))
    return lines


def command_line_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmpo mia-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=PLACEHOLDER, help="where data, models and results go")
    parser.add_argument("--configs", default="configs/mia_dpo", help="directory holding sft.yaml, build.yaml, dpo.yaml")
    parser.add_argument("--n-train", type=int, default=3000, help="single-image training records")
    parser.add_argument("--n-val", type=int, default=256, help="validation records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vision-steps", type=int, default=None, help=f"vision pretraining steps ({VISION_PRETRAINING['steps']})"
    )
    parser.add_argument(
        "--language-steps",
        type=int,
        default=None,
        help=f"language pretraining steps ({LANGUAGE_PRETRAINING['steps']})",
    )
    parser.add_argument(
        "--sft-text-lists", type=int, default=SFT_TEXT_LISTS, help="text-only labelled lists in the SFT data"
    )
    parser.add_argument("--sft-epochs", type=int, default=None, help="override sft.yaml's max_epochs")
    parser.add_argument("--dpo-epochs", type=int, default=None, help="override dpo.yaml's max_epochs")
    parser.add_argument(
        "--build-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of build.yaml, e.g. selection.min_perplexity=1.2 (repeatable)",
    )
    parser.add_argument("--probes", type=int, default=None, help="override the probes per kind and setting")
    parser.add_argument("--prepare-only", action="store_true", help="only write the data and the tiny model")
    parser.add_argument(
        "--probe-seed",
        type=int,
        default=None,
        help=f"seed of the reported probe scenes (default: dpo.yaml's {TUNING_PROBE_SEED}, the scenes the recipe "
        f"was tuned on; with --seeds or --ablation: {REPORT_PROBE_SEED}, held out)",
    )
    parser.add_argument(
        "--balance-yes-no",
        action="store_true",
        help="build: as many presence pairs with chosen 'yes' as with 'no' (selection.balance_yes_no)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="run the whole demo for each seed: mean ± std table"
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="one build, three preference stages: every wrong answer kept, attention-filtered, random subset as large",
    )
    parser.add_argument(
        "--attention-quantile",
        default="0.5",
        help="--ablation's attention filter: a quantile of the wrong answers' ratios per format and count, "
        "or 'paper' for the paper's thresholds (default 0.5)",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="ABLATION_JSON",
        help="no training: one table over the ablation.json files of several --seeds/--ablation runs (one process "
        "per seed, say), written with the pooled histograms to --workdir",
    )
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = command_line_parser()
    args = parser.parse_args(argv)
    if args.report is not None:
        from mmpo.recipes.mia_ablation import merge

        return merge([Path(f) for f in args.report], Path(args.workdir), args.attention_quantile)
    if args.seeds is not None or args.ablation:
        from mmpo.recipes.mia_ablation import run

        return run(args, parser)

    start = time.perf_counter()
    workdir, configs = Path(args.workdir), Path(args.configs)
    for name in ("sft.yaml", "build.yaml", "dpo.yaml"):
        if not (configs / name).is_file():
            parser.error(f"{configs / name} not found: run from the repository root or pass --configs")
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    prepare(workdir, args.n_train, args.n_val, args.seed, args.vision_steps, args.language_steps, args.sft_text_lists)
    if args.prepare_only:
        return {}
    stage("prepare (world, model, vision and language pretraining)", t0)

    t0 = time.perf_counter()
    print("[mmpo] stage 1/3: SFT on single images")
    sft_extra = [f"--trainer.max_epochs={args.sft_epochs}"] if args.sft_epochs else []
    sft = stage_cli(configs / "sft.yaml", workdir, sft_extra)
    sft.trainer.fit(sft.model, datamodule=sft.datamodule)
    stage("sft", t0)

    t0 = time.perf_counter()
    dpo_extra = [f"--trainer.max_epochs={args.dpo_epochs}"] if args.dpo_epochs else []
    dpo = stage_cli(configs / "dpo.yaml", workdir, dpo_extra)
    probe_callback(dpo.trainer, args.probes, args.probe_seed)
    before = probe_figures(dpo.trainer.validate(dpo.model, datamodule=dpo.datamodule, verbose=False))
    stage("probe SFT model", t0)

    t0 = time.perf_counter()
    print("[mmpo] stage 2/3: MIA-DPO pairs from the single-image training set")
    from augment.mia.build import main as build_main

    overrides = [f"--{kv}" for kv in args.build_arg]
    overrides += ["--selection.balance_yes_no=true"] if args.balance_yes_no else []
    build = build_main(["--config", str(resolve_config(configs / "build.yaml", workdir)), *overrides])
    if build.summary["kept"] == 0:
        raise SystemExit(f"mmpo mia-demo: the build kept no pair; see {workdir / 'mia-data' / 'summary.json'}")
    stage("build", t0)

    t0 = time.perf_counter()
    print("[mmpo] stage 3/3: DPO with LoRA on the MIA-DPO pairs and the single-image replay")
    dpo.trainer.fit(dpo.model, datamodule=dpo.datamodule)
    stage("dpo", t0)
    t0 = time.perf_counter()
    after = probe_figures(dpo.trainer.validate(dpo.model, datamodule=dpo.datamodule, verbose=False))
    stage("probe DPO model", t0)

    settings = sorted({k.split("/")[2] for k in before}, key=lambda s: (s != "single", s))
    total = time.perf_counter() - start
    lines = ["", "mmpo mia-demo: hallucination probes on held-out shapes-world scenes, before and after MIA-DPO", ""]
    lines += _table(before, after, settings)
    lines += [
        "",
        f"MIA-DPO pairs: {build.summary['kept']} kept of {build.summary['total']} generated "
        f"({build.summary['samples_per_second']} samples/s with attention)",
        f"stage seconds: {seconds}; total {total:.0f} s",
    ]
    print("\n".join(lines))
    results = {"before": before, "after": after, "build": build.summary, "seconds": seconds, "total_seconds": total}
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results
