"""Hallucination on real benchmark files the user holds: POPE, CHAIR on COCO, MMHal-Bench (nothing is downloaded).

Files are read by :mod:`mmpo.benchmark_files` (their formats are described there).

- POPE (Li et al. 2023), one question file per split; with positive = "yes": ``accuracy``, ``precision``
  = TP / said yes, ``recall`` = TP / labelled yes, ``f1`` and ``yes_ratio``. An answer reads as POPE's
  evaluation reads it (``answer_rule="pope"``: its first sentence says "no" when it holds the word "no" or
  "not", otherwise "yes") or by its first word (``first_word``: neither yes nor no is wrong, and counted
  in ``unparsable``).
- CHAIR (Rohrbach et al. 2018): the policy captions images of a COCO-style instances file; the objects a
  caption names (:mod:`mmpo.coco_synonyms`) are checked against the image's categories (and, optionally,
  the objects its reference captions name). ``chair_i`` = hallucinated mentions / mentions (each mention
  counts), ``chair_s`` = captions with a hallucinated mention / captions, ``recall`` = the image's objects
  named / its objects, ``words`` = mean caption length in words.
- MMHal-Bench (Sun et al. 2023): a user judge ``judge(record, answer) -> score in [0, 6]`` (a callable or
  its dotted path) gives ``score`` (mean), ``hallucination_rate`` (share below 3) and ``score_<type>``
  (mean per question type). Without a judge the answers are written, unscored.

Every file is read and checked (labels, keys, image files) before any answer is generated; an error names
the file and line or record. :class:`BenchmarkHallucinationEval` runs the benchmarks on ``mmpo validate`` /
``mmpo test`` and logs ``val/hallucination/pope_<split>/<metric>``, ``.../chair/<metric>`` and
``.../mmhal/<metric>``; ``mmpo eval-hallucination`` (:mod:`mmpo.recipes.eval_hallucination`) runs them on a
saved model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mmpo.benchmark_files import (
    ChairSettings,
    Judge,
    MMHalSettings,
    PopeSettings,
    load_judge,
    open_image,
    read_coco,
    read_mmhal,
    read_pope,
    split_name,
)
from mmpo.coco_synonyms import mentions
from mmpo.hallucination import AnswerEval, parse_yes_no

__all__ = [
    "FIELDS",
    "BenchmarkHallucinationEval",
    "HallucinationBenchmarks",
    "format_table",
    "metrics_from_counts",
    "pope_answer",
]

FIELDS = {
    "pope": ("questions", "label_yes", "said_yes", "true_yes", "true_no", "unparsable"),
    "chair": ("captions", "hallucinated_captions", "mentions", "hallucinated_mentions", "objects", "recalled", "words"),
    "mmhal": ("answers", "score_sum", "below_3"),
}


def pope_answer(answer: str, rule: str = "pope") -> bool | None:
    """True for "yes", False for "no", None for neither (only with ``first_word``).

    ``pope``: POPE's evaluation keeps the answer's first sentence and reads "no" when a word of it is "no"
    or "not" (so "There is no dog." is no), otherwise "yes". ``first_word``: :func:`mmpo.hallucination.parse_yes_no`.
    """
    if rule == "first_word":
        return parse_yes_no(answer)
    first = answer.split(".", 1)[0].lower()
    return not ({"no", "not"} & set(re.findall(r"[a-z]+", first)))


def metrics_from_counts(kind: str, counts: Sequence[float]) -> dict[str, float]:
    """A benchmark's metrics from its summed counts (``FIELDS[kind]`` order); no denominator, no metric."""
    c = dict(zip(FIELDS[kind], counts, strict=True))
    if kind == "pope":
        ratios = {
            "accuracy": (c["true_yes"] + c["true_no"], c["questions"]),
            "precision": (c["true_yes"], c["said_yes"]),
            "recall": (c["true_yes"], c["label_yes"]),
            "f1": (2 * c["true_yes"], c["said_yes"] + c["label_yes"]),
            "yes_ratio": (c["said_yes"], c["questions"]),
            "unparsable": (c["unparsable"], c["questions"]),
        }
    elif kind == "chair":
        ratios = {
            "chair_s": (c["hallucinated_captions"], c["captions"]),
            "chair_i": (c["hallucinated_mentions"], c["mentions"]),
            "recall": (c["recalled"], c["objects"]),
            "words": (c["words"], c["captions"]),
        }
    else:
        ratios = {"score": (c["score_sum"], c["answers"]), "hallucination_rate": (c["below_3"], c["answers"])}
    return {name: num / den for name, (num, den) in ratios.items() if den > 0}


class HallucinationBenchmarks:
    """The benchmarks of one evaluation: reads their files once, answers, counts and scores.

    Args:
        pope: POPE question files.
        chair: CHAIR on COCO captions.
        mmhal: MMHal-Bench questions.
    """

    def __init__(
        self, pope: PopeSettings | None = None, chair: ChairSettings | None = None, mmhal: MMHalSettings | None = None
    ) -> None:
        if pope is None and chair is None and mmhal is None:
            raise ValueError("no benchmark: give pope, chair and/or mmhal")
        self.pope, self.chair, self.mmhal = pope, chair, mmhal
        self.items: dict[str, list[dict[str, Any]]] | None = None
        self.judge: Judge | None = None
        self.table: dict[tuple[str, ...], str | None] = {}  # CHAIR's phrase table, over the file's categories

    def load(self) -> dict[str, list[dict[str, Any]]]:
        """Each task's records (``pope_<split>``, ``chair``, ``mmhal``), read and checked once."""
        if self.items is None:
            items: dict[str, list[dict[str, Any]]] = {}
            for spec in self.pope.files if self.pope else []:
                split, path = split_name(spec)
                if f"pope_{split}" in items:
                    raise ValueError(f"two POPE files for the split {split!r}: name them (name=path)")
                items[f"pope_{split}"] = read_pope(path, self.pope.image_root)[: self.pope.max_questions]
            if self.chair:
                items["chair"], self.table = read_coco(self.chair)
            if self.mmhal:
                items["mmhal"] = read_mmhal(self.mmhal.file, self.mmhal.image_root)[: self.mmhal.max_questions]
                self.judge = load_judge(self.mmhal.judge) if self.mmhal.judge is not None else None
            self.items = items
        return self.items

    def rows(self) -> list[tuple[str, str]]:
        """``(row name, kind)`` of the count table, the same on every rank."""
        items = self.load()
        names = [(t, "pope") for t in items if t.startswith("pope_")] + [("chair", "chair")] * ("chair" in items)
        if "mmhal" in items and self.judge is not None:
            types = sorted({r["question_type"] for r in items["mmhal"]})
            names += [("mmhal", "mmhal"), *((f"mmhal_{t}", "mmhal") for t in types)]
        return names

    def evaluate(
        self,
        model: Any,
        processor: Any,
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = False,
    ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, Any]]]]:
        """This rank's counts per row and its answers per task (:meth:`score` of the policy's greedy answers)."""
        from tqdm.auto import tqdm

        from mmpo.generation import generate_answers

        tasks = self.shard(rank, world_size)
        said: dict[str, list[str]] = {}
        bar = tqdm(total=sum(map(len, tasks.values())), desc="hallucination", unit="q", disable=not progress)
        for task, mine in tasks.items():
            prompts = [self.prompt(task, r) for _, r in mine]
            max_new = {"chair": self.chair, "mmhal": self.mmhal}.get(task, self.pope).max_new_tokens
            said[task] = []
            for start in range(0, len(mine), batch_size):
                images = [(open_image(r["image"]),) for _, r in mine[start : start + batch_size]]
                said[task] += generate_answers(
                    model, processor, prompts[start : start + batch_size], images, max_new_tokens=max_new
                )
                bar.update(len(images))
        bar.close()
        return self.score(said, rank, world_size)

    def shard(self, rank: int = 0, world_size: int = 1) -> dict[str, list[tuple[int, dict[str, Any]]]]:
        """Each task's ``(index, record)`` pairs this rank answers (every ``world_size``-th from ``rank``)."""
        return {t: list(enumerate(records))[rank::world_size] for t, records in self.load().items()}

    def score(
        self, said: dict[str, Sequence[str]], rank: int = 0, world_size: int = 1
    ) -> tuple[dict[str, list[float]], dict[str, list[dict[str, Any]]]]:
        """Counts per row (:meth:`rows`) and one record per answer, from the answers to this rank's share of
        each task (:meth:`shard`), in order; a task left out of ``said`` counts nothing."""
        tasks = self.shard(rank, world_size)
        counts = {name: [0.0] * len(FIELDS[kind]) for name, kind in self.rows()}
        answers = {}
        for task, texts in said.items():
            if task not in tasks:
                raise ValueError(f"no task {task!r}: the tasks are {', '.join(tasks)}")
            answers[task] = [self._score(task, i, r, a, counts) for (i, r), a in zip(tasks[task], texts, strict=True)]
        return counts, answers

    def prompt(self, task: str, record: dict[str, Any]) -> str:
        """The prompt of a task's record, with its ``<image>`` placeholder."""
        if task == "chair":
            text = self.chair.prompt
        elif task == "mmhal":
            text = record["question"]
        else:
            text = self.pope.template.format(question=record["text"])
        return text if "<image>" in text else f"<image>\n{text}"

    def _score(self, task: str, index: int, r: dict[str, Any], answer: str, counts: dict) -> dict[str, Any]:
        def add(row: str, kind: str, **values: float) -> None:
            for field, value in values.items():
                counts[row][FIELDS[kind].index(field)] += float(value)

        if task.startswith("pope_"):
            said = pope_answer(answer, self.pope.answer_rule)
            add(task, "pope", questions=1, label_yes=r["label"], said_yes=said is True, unparsable=said is None)
            add(task, "pope", true_yes=said is True and r["label"], true_no=said is False and not r["label"])
            return {
                "index": index,
                "question_id": r["question_id"],
                "label": r["label"],
                "answer": answer,
                "said": said,
            }
        if task == "chair":
            named = mentions(answer, self.table)
            wrong = [m for m in named if m not in r["objects"]]
            add("chair", "chair", captions=1, hallucinated_captions=bool(wrong), mentions=len(named))
            add("chair", "chair", hallucinated_mentions=len(wrong), objects=len(r["objects"]))
            add("chair", "chair", recalled=len(set(named) & r["objects"]), words=len(answer.split()))
            return {"index": index, "image_id": r["image_id"], "caption": answer, "named": named, "hallucinated": wrong}
        out = {"index": index, "question_type": r["question_type"], "question": r["question"], "answer": answer}
        if self.judge is not None:
            score = float(self.judge(r["record"], answer))
            if not (math.isfinite(score) and 0 <= score <= 6):
                raise ValueError(f"{self.mmhal.file}: record {index}: the judge gave {score}, not a score in [0, 6]")
            for row in ("mmhal", f"mmhal_{r['question_type']}"):
                add(row, "mmhal", answers=1, score_sum=score, below_3=score < 3)
            out["score"] = score
        return out

    def metrics(self, counts: dict[str, Sequence[float]]) -> dict[str, dict[str, float]]:
        """Metrics per row from (summed) counts; a type row gives ``mmhal/score_<type>``."""
        out: dict[str, dict[str, float]] = {}
        for name, kind in self.rows():
            found = metrics_from_counts(kind, counts[name])
            if name.startswith("mmhal_"):
                out["mmhal"][f"score_{name[6:]}"] = found.get("score", math.nan)
            else:
                out[name] = found
        return out


_ORDER = {
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsable"),
    "chair": ("chair_s", "chair_i", "recall", "words"),
    "mmhal": ("score", "hallucination_rate"),
}


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """One markdown table per benchmark: rows are splits, columns metrics (values ×100 are percentages)."""
    blocks = []
    for kind in ("pope", "chair", "mmhal"):
        rows = {n: m for n, m in metrics.items() if n.split("_")[0] == kind and m}
        if not rows:
            continue
        found = dict.fromkeys(k for m in rows.values() for k in m)
        columns = [k for k in _ORDER[kind] if k in found] + [k for k in found if k not in _ORDER[kind]]
        lines = ["| " + " | ".join([kind, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
        for name, m in rows.items():
            lines.append("| " + " | ".join([name, *(f"{m[c]:.4f}" if c in m else "" for c in columns)]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_report(path: str | Path, metrics: dict, counts: dict, answers: dict, **about: Any) -> None:
    """The JSON report (metrics, counts, every answer), written atomically."""
    from datamodules.core.atomic import atomic_write_text

    report = {**about, "metrics": metrics, "counts": counts, "answers": answers}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1, default=str, ensure_ascii=False) + "\n")


class BenchmarkHallucinationEval(AnswerEval):
    """Log POPE / CHAIR / MMHal metrics of the policy's own answers to the user's benchmark files.

    Args:
        pope: POPE question files and settings.
        chair: CHAIR on captions of COCO images.
        mmhal: MMHal-Bench questions and judge.
        batch_size: prompts per ``generate`` call.
        output_json: where to write metrics and answers (None: not written).
        during_fit: also run after each validation of ``mmpo fit``.
        processor: processor path; by default the datamodule's ``processor``.
    """

    def __init__(
        self,
        pope: PopeSettings | None = None,
        chair: ChairSettings | None = None,
        mmhal: MMHalSettings | None = None,
        batch_size: int = 8,
        output_json: str | None = None,
        during_fit: bool = False,
        processor: str | None = None,
    ) -> None:
        super().__init__()
        self.benchmarks = HallucinationBenchmarks(pope, chair, mmhal)
        self.batch_size, self.output_json = batch_size, output_json
        self.during_fit, self.processor_path = during_fit, processor
        self.last_answers: dict[str, list[dict[str, Any]]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.benchmarks.load()  # a bad file fails here, before any training or validation

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        model = getattr(pl_module, "policy", None) or pl_module
        rank, world = trainer.global_rank, trainer.world_size
        counts, answers = self.benchmarks.evaluate(model, self._processor(trainer), self.batch_size, rank, world)
        rows = self.benchmarks.rows()
        width = max(len(FIELDS[kind]) for _, kind in rows)
        padded = [counts[name] + [0.0] * (width - len(counts[name])) for name, _ in rows]
        table = self.summed_over_ranks(trainer, pl_module, padded).tolist()  # (rows, width)
        summed = {name: row[: len(FIELDS[kind])] for (name, kind), row in zip(rows, table, strict=True)}
        results = self.benchmarks.metrics(summed)
        flat = {f"{stage}/hallucination/{g}/{k}": v for g, m in results.items() for k, v in m.items()}
        self.log_all(pl_module, flat)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * world
            torch.distributed.all_gather_object(parts, answers)
            answers = {t: sorted((a for p in parts for a in p[t]), key=lambda a: a["index"]) for t in answers}
        self.last_answers = answers
        if self.output_json and trainer.is_global_zero:
            named = {name: dict(zip(FIELDS[kind], summed[name], strict=True)) for name, kind in rows}
            write_report(self.output_json, results, named, answers, stage=stage, step=trainer.global_step)
        return flat
