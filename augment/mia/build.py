"""``mmpo build-negatives``: MIA-DPO preference data from a single-image dataset, resumable.

For each source record (one image, a question, its ground-truth answer) the builder draws a format
(sequence, grid collage, pic-in-pic) and companions from the same dataset, lets the base model answer
the augmented input greedily with one layer's attention (:mod:`augment.mia.generate`), and keeps the
answer as *rejected* when MIA-DPO's rule says it is a hallucination (:mod:`augment.mia.select`); the
ground truth is *chosen*. The output directory then holds:

- ``train.jsonl`` + ``images/``: the preference dataset, read directly by
  :class:`datamodules.ImagePreferenceDataModule` (every record also carries its ``mia`` details);
- ``decisions.jsonl``: one line per augmented sample, kept or dropped, with answer, ratio,
  perplexity and the drop reason;
- ``summary.json``: kept/dropped by reason and per format, skipped source records, throughput, and
  every answer's target-attention ratio by format and image count, wrong and right apart
  (``ratios``), with how well the ratio tells them apart (``ratio_auc``) and the thresholds applied;
- ``progress.json``: the resumption state.

With a selection that needs the whole build (a calibrated ``attention_quantile``, the ablation
``filter`` ``none`` / ``random_matched``, ``balance_yes_no``: :mod:`augment.mia.calibrate`), the
chunks write every *candidate* (a wrong answer passing every check but attention) to
``candidates.jsonl`` with its images and provisional decisions to ``decisions.pending.jsonl``; once all
are generated, ``train.jsonl`` and ``decisions.jsonl`` are written whole from them
(:mod:`augment.mia.candidates`, whose ``write_selection`` writes the ablation's other training files).

Work goes in chunks of source records. A chunk's images are written first (temporary name, then
rename), then its lines are appended to the two JSONL files and flushed to disk, then
``progress.json`` is replaced atomically with the new line count and byte offsets. A restart reads
``progress.json``, cuts both JSONL files back to the recorded offsets (removing any line of an
unfinished chunk, whole or partial) and continues with the next chunk. Every draw derives from the
seed and the record index and chunks always start at the same records, so an interrupted and
resumed build writes the same files as an uninterrupted one.

    mmpo build-negatives --config configs/mia_dpo/build.yaml [--generation.batch_size 16 ...]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from augment.mia.build_config import BuildConfig, config_fingerprint
from augment.mia.calibrate import answer_status, group_key, ratio_auc, ratio_distribution
from augment.mia.candidates import (
    CANDIDATES_FILE,
    PENDING_DECISIONS_FILE,
    finalise_decisions,
    read_jsonl,
)
from augment.mia.formats import AugmentedSample, ImagePool, SourceSample, build_augmented
from augment.mia.generate import GenerationResult, generate_with_attention, num_layers
from augment.mia.select import SelectionConfig, SelectionSummary, select_rejected
from augment.mia.source import SourceRecord, read_source
from datamodules.core.atomic import append_durably, atomic_file, atomic_write_text

__all__ = [
    "BuildResult",
    "SourceRecord",
    "build_negatives",
    "command_line_parser",
    "main",
    "read_source",
]

_PROGRESS, _TRAIN, _DECISIONS, _SUMMARY = "progress.json", "train.jsonl", "decisions.jsonl", "summary.json"
_FORMAT_ORDER = ("sequence", "grid", "pic_in_pic")


@dataclass
class BuildResult:
    """What a build did: the output directory, the summary dict and whether it was already complete."""

    output: Path
    summary: dict
    already_complete: bool


# --------------------------------------------------------------------------- output files


def _atomic_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _save_png(image: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def _pool_copy(source: str, images_dir: Path) -> str:
    """Hard-link (else copy) a source image into ``images/pool/`` once; returns the path relative to the output."""
    src = Path(source)
    name = hashlib.sha1(str(src).encode()).hexdigest()[:16] + src.suffix.lower()
    dest = images_dir / "pool" / name
    if not dest.exists():
        with atomic_file(dest) as tmp:
            tmp.unlink()  # a hard link needs a free name
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
    return f"images/pool/{name}"


def _write_images(aug: AugmentedSample, record_id: str, out: Path, corrupted_target: bool) -> list[str]:
    """Write the images a training record needs; returns their paths relative to ``out``."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    if aug.format != "sequence":
        _save_png(aug.images[0], images_dir / f"{record_id}.png")
        return [f"images/{record_id}.png"]
    paths = []
    for i, key in enumerate(aug.keys):
        if i == aug.target_index and corrupted_target:
            _save_png(aug.images[i], images_dir / f"{record_id}-target.png")
            paths.append(f"images/{record_id}-target.png")
        else:
            paths.append(_pool_copy(key, images_dir))
    return paths


# --------------------------------------------------------------------------- the build


def _record_rng(seed: int, index: int, k: int) -> random.Random:
    return random.Random(f"mmpo-mia-dpo/{seed}/{index}/{k}")


def _augment(
    config: BuildConfig, source: SourceRecord, index: int, k: int, pool: ImagePool, corrupted: bool
) -> AugmentedSample:
    rng = _record_rng(config.seed, index, k)
    formats = [f for f in _FORMAT_ORDER if config.formats.weights.get(f, 0) > 0]
    fmt = rng.choices(formats, weights=[config.formats.weights[f] for f in formats])[0]
    sample = SourceSample(source.image, pool.loader(source.image), source.question, source.answer)
    return build_augmented(sample, pool, fmt, rng, **config.formats.options(fmt, corrupted))


def _noisy(config: BuildConfig, fmt: str) -> bool:
    return getattr(config.formats, fmt).noise_std > 0


def _load_model(settings: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(
        settings.model,
        attn_implementation="eager",
        dtype=getattr(torch, settings.dtype),
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    ).to(device)
    processor = AutoProcessor.from_pretrained(
        settings.processor or settings.model, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    return model, processor


class _State:
    """The resumption state held in ``progress.json``, and the summary rebuilt from ``decisions.jsonl``."""

    def __init__(self, out: Path, fingerprint: str, overwrite: bool, whole_build: bool = False) -> None:
        self.out = out
        self.fingerprint = fingerprint
        self.next_index = 0
        # When selection needs the whole build, chunks append to the candidates and to provisional decisions;
        # the final train.jsonl and decisions.jsonl are written from them, whole, at the end.
        self.pairs_file = CANDIDATES_FILE if whole_build else _TRAIN
        self.decisions_file = PENDING_DECISIONS_FILE if whole_build else _DECISIONS
        self.offsets = {self.pairs_file: 0, self.decisions_file: 0}
        self.complete = False
        self.elapsed = 0.0
        self.generated = 0
        self.summary = SelectionSummary()
        path = out / _PROGRESS
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("fingerprint") != fingerprint:
                if not overwrite:
                    raise FileExistsError(
                        f"{out} holds a build made with other settings or another source file "
                        f"(fingerprint {saved.get('fingerprint')} != {fingerprint}): set overwrite: true "
                        "to start again, or choose another output directory"
                    )
                shutil.rmtree(out)
            else:
                self.next_index = int(saved["next_index"])
                self.offsets = {name: int(saved["offsets"][name]) for name in self.offsets}
                self.complete = bool(saved.get("complete"))
                self.elapsed = float(saved.get("seconds", 0.0))
                self.generated = int(saved.get("generated", 0))
        elif out.exists() and any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{out} is not empty and holds no mmpo build: choose another output directory")
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, offset in self.offsets.items():  # drop whatever an unfinished chunk appended
            path = out / name
            with path.open("a+b") as f:
                f.truncate(offset)
        with (out / self.decisions_file).open(encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                self.summary.add(d["format"], d["kept"], d["reason"])
        self.save()  # from here on the directory is recognisably this build's

    def save(self) -> None:
        _atomic_json(
            self.out / _PROGRESS,
            {
                "fingerprint": self.fingerprint,
                "next_index": self.next_index,
                "offsets": self.offsets,
                "complete": self.complete,
                "seconds": round(self.elapsed, 3),
                "generated": self.generated,
            },
        )


def _decision(
    result: GenerationResult, record_id: str, source: SourceRecord, kept: bool, reason: str, config: SelectionConfig
) -> dict:
    s = result.sample
    return {
        "id": record_id,
        "source_id": source.id,
        "format": s.format,
        "n_images": s.n_images,
        "target_index": s.target_index,
        "answer": result.answer,
        "ground_truth": s.answer,
        "ratio": None if result.ratio != result.ratio else round(result.ratio, 6),
        "perplexity": None if result.perplexity != result.perplexity else round(result.perplexity, 6),
        "threshold": config.threshold(s.format, s.n_images),
        "layer": result.layer,
        "status": answer_status(result.answer, s.answer),
        "kept": kept,
        "reason": reason,
    }


def _run_chunk(
    config: BuildConfig,
    chunk: Sequence[tuple[int, SourceRecord]],
    pool: ImagePool,
    generate: Callable[[list[AugmentedSample]], list[GenerationResult]],
    selection: SelectionConfig,
    state: _State,
) -> int:
    """Build, generate, select and write one chunk; returns the number of records kept."""
    samples, owners = [], []
    for index, source in chunk:
        for k in range(config.samples_per_source):
            samples.append(_augment(config, source, index, k, pool, corrupted=True))
            owners.append((index, k, source))
    results = generate(samples)
    train_lines, decision_lines, kept_count = [], [], 0
    for result, (index, k, source) in zip(results, owners, strict=True):
        aug = result.sample
        record_id = f"{source.id}-mia{k}" if config.samples_per_source > 1 else f"{source.id}-mia"
        kept, reason = select_rejected(
            result.ratio, result.perplexity, result.answer, aug.answer, aug.format, aug.n_images, selection
        )
        state.summary.add(aug.format, kept, reason)
        decision_lines.append(json.dumps(_decision(result, record_id, source, kept, reason, selection)) + "\n")
        candidate = selection.whole_build and reason == "attention_above_threshold"
        if not (kept or candidate):
            continue
        kept_count += kept
        corrupted = config.train_on_corrupted and _noisy(config, aug.format)
        train_aug = (
            aug
            if corrupted or not _noisy(config, aug.format)
            else _augment(config, source, index, k, pool, corrupted=False)
        )
        record = {
            "id": record_id,
            "source_id": source.id,
            "images": _write_images(train_aug, record_id, state.out, corrupted),
            "prompt": train_aug.prompt,
            "chosen": aug.answer,
            "rejected": result.answer,
            "mia": {
                "format": aug.format,
                "n_images": aug.n_images,
                "target_index": aug.target_index,
                "ratio": result.ratio,
                "perplexity": result.perplexity,
            },
        }
        train_lines.append(json.dumps(record) + "\n")
    # Images are in place; now the lines, then the new offsets: a kill at any point leaves a consistent state.
    for name, lines in ((state.pairs_file, train_lines), (state.decisions_file, decision_lines)):
        append_durably(state.out / name, lines)
        state.offsets[name] = (state.out / name).stat().st_size
    state.generated += len(samples)
    return kept_count


def build_negatives(
    config: BuildConfig,
    *,
    model: Any = None,
    processor: Any = None,
    progress: bool = True,
) -> BuildResult:
    """Run (or continue) a build; ``model`` / ``processor`` are loaded from ``config.generation`` when None."""
    out = Path(config.output)
    sources, skipped, messages = read_source(config.source)
    if len(sources) < 2:
        raise ValueError(f"{config.source.path}: need at least 2 usable single-image records, found {len(sources)}")
    selection = config.selection.build()
    state = _State(out, config_fingerprint(config), config.overwrite, selection.whole_build)
    if state.complete:
        summary = json.loads((out / _SUMMARY).read_text(encoding="utf-8"))
        return BuildResult(out, summary, already_complete=True)
    if model is None:
        model, processor = _load_model(config.generation)
    elif processor is None:
        raise ValueError("pass the processor together with the model")

    from datamodules.vision_text.collator import load_image

    where = {s.image: s.where for s in sources}
    loader = functools.lru_cache(maxsize=512)(lambda key: load_image(key, where.get(key, key)))
    pool = ImagePool([s.image for s in sources], loader)

    def generate(samples: list[AugmentedSample]) -> list[GenerationResult]:
        g = config.generation
        return generate_with_attention(
            model,
            processor,
            samples,
            layer=selection.layer,
            max_new_tokens=g.max_new_tokens,
            batch_size=g.batch_size,
            progress=False,
        )

    bar = tqdm(total=len(sources), initial=state.next_index, desc="MIA-DPO build", unit="rec", disable=not progress)
    kept = state.summary.as_dict()["kept"]
    try:
        while state.next_index < len(sources):
            start = time.perf_counter()
            stop = min(state.next_index + config.chunk_size, len(sources))
            chunk = [(i, sources[i]) for i in range(state.next_index, stop)]
            kept += _run_chunk(config, chunk, pool, generate, selection, state)
            state.next_index = stop
            state.elapsed += time.perf_counter() - start
            state.save()
            bar.update(len(chunk))
            bar.set_postfix(kept=kept)
    finally:
        bar.close()
    thresholds: dict[str, float | None] = {}
    if selection.whole_build:
        thresholds, state.summary = finalise_decisions(out, selection, config.seed)
    decisions = read_jsonl(out / _DECISIONS)
    for d in decisions:
        thresholds.setdefault(group_key(d["format"], d["n_images"]), d["threshold"])
    ratios = ratio_distribution(decisions)
    state.complete = True
    summary = {
        **state.summary.as_dict(),
        "source_records": len(sources) + sum(skipped.values()),
        "skipped_source_records": dict(skipped),
        "skip_messages": messages[:20],
        "generated": state.generated,
        "seconds": round(state.elapsed, 2),
        "samples_per_second": round(state.generated / state.elapsed, 2) if state.elapsed else None,
        "layer": selection.resolve_layer(num_layers(model)),
        "thresholds": dict(sorted(thresholds.items())),
        "ratio_auc": {key: ratio_auc(r["wrong"], r["right"]) for key, r in sorted(ratios.items())},
        "ratios": dict(sorted(ratios.items())),
        "config": asdict(config),
    }
    _atomic_json(out / _SUMMARY, summary)
    state.save()
    return BuildResult(out, summary, already_complete=False)


def command_line_parser() -> Any:
    """The jsonargparse parser of ``mmpo build-negatives``: ``--config`` (a YAML file) and every
    :class:`~augment.mia.build_config.BuildConfig` field as ``--group.key`` options.

    Use it to check or load a build configuration without running the build::

        parser = command_line_parser()
        init = parser.instantiate(parser.parse_args(["--config", "configs/mia_dpo/build.yaml"]))
        config = BuildConfig(**{f.name: init[f.name] for f in dataclasses.fields(BuildConfig)})
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="mmpo build-negatives", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the settings below")
    parser.add_class_arguments(BuildConfig, None, as_group=False)
    return parser


def print_summary(result: BuildResult, file: Any = None) -> None:
    file = file or sys.stdout
    s = result.summary
    summary = SelectionSummary()
    for fmt, counts in s["per_format"].items():
        summary.kept[fmt] = counts["kept"]
        summary.dropped[fmt] = Counter({r: n for r, n in counts["by_reason"].items() if n})
    state = "already complete" if result.already_complete else "done"
    print(f"\nMIA-DPO build {state}: {s['kept']} preference pairs in {result.output / _TRAIN}", file=file)
    print(summary, file=file)
    skipped = s.get("skipped_source_records") or {}
    if skipped:
        print(f"skipped source records: {skipped} (first messages in {result.output / _SUMMARY})", file=file)
    if s.get("samples_per_second"):
        print(f"generation with attention: {s['generated']} samples, {s['samples_per_second']} samples/s", file=file)


def main(argv: list[str] | None = None) -> BuildResult:
    """Command line: ``mmpo build-negatives --config build.yaml [--key value ...]``."""
    parser = command_line_parser()
    init = parser.instantiate(parser.parse_args(argv))
    config = BuildConfig(**{f.name: init[f.name] for f in fields(BuildConfig)})
    try:
        result = build_negatives(config)
    except KeyboardInterrupt:
        sys.exit(f"\nmmpo build-negatives: interrupted; progress is saved in {config.output}, run again to continue")
    print_summary(result)
    return result


if __name__ == "__main__":
    main()
