"""Object hallucination on the shapes world: CHAIR-style captions and POPE-style presence questions.

Probes are generated, not read: held-out scenes of the shapes world (their own seed namespace, so no
training image reappears), shown alone (``single``) or as the target among companions in MIA-DPO's
formats (``sequence3``: three images, ``grid4``: a four-tile collage, ``pic_in_pic``), with the
question pointed at the target. The model answers greedily and is scored against the target's
ground truth:

- captions (CHAIR, Rohrbach et al. 2018): ``chair_s`` = share of captions naming at least one
  object that is not in the target, ``chair_i`` = share of named objects that are not in it; an
  object is named as "<colour> <shape>" (in the target when that pair is) or as a bare "<shape>"
  (in the target when any object has that shape);
  ``object_recall`` = share of the target's objects named, ``caption_exact`` = exact captions
  (a model that says nothing has no hallucinations, so read both sides);
- presence (POPE, Li et al. 2023): "is there a <colour> <shape> in the image ?", half present in the
  target and half absent; with companions, the absent objects are taken from the companions when
  they can be (the multi-image confusion). ``pope_accuracy``, ``pope_precision``, ``pope_recall``,
  ``pope_f1`` (positive = yes) and ``pope_yes_ratio``; an answer that is neither yes nor no counts as wrong.

:class:`HallucinationEval` is a Lightning callback: it runs on ``mmpo validate`` and ``mmpo test``
(and, optionally, after each validation of ``mmpo fit``) and logs ``val/hallucination/<setting>/<metric>``
(``test/...``) like the training metrics. Probes are sharded across ranks and counts summed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch import Tensor

from datamodules.worlds.shapes import COLORS, SHAPES, caption_for, render_scene, sample_scene, tokenize

__all__ = [
    "COUNT_FIELDS",
    "AnswerEval",
    "HallucinationEval",
    "Probe",
    "make_probes",
    "mentioned_objects",
    "metrics_from_counts",
    "parse_setting",
    "parse_yes_no",
    "score",
]

CAPTION_QUESTION = "describe the image ."
PRESENCE_QUESTION = "is there a {color} {shape} in the image ?"
COUNT_FIELDS = (
    "captions",
    "hallucinated_captions",
    "mentions",
    "hallucinated_mentions",
    "truth_objects",
    "recalled_objects",
    "exact_captions",
    "questions",
    "correct",
    "yes_answers",
    "true_yes",
    "label_yes",
)
_SETTING = re.compile(r"^(single|pic_in_pic|sequence(\d+)|grid(\d+))$")


@dataclass(frozen=True)
class Probe:
    """One question about a target image: ``truth`` is the target's (colour, shape) set; ``label`` the
    expected presence answer (None for captions)."""

    setting: str
    kind: str
    prompt: str
    images: tuple[Image.Image, ...]
    truth: frozenset[tuple[str, str]]
    caption: str
    label: bool | None = None


def _objects(scene: Sequence) -> frozenset[tuple[str, str]]:
    return frozenset((o.color, o.shape) for o in scene)


def _presence(rng: random.Random, truth: frozenset, companions: set) -> tuple[str, bool]:
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(truth))
        return PRESENCE_QUESTION.format(color=color, shape=shape), True
    absent = sorted({(c, s) for c in COLORS for s in SHAPES} - truth)
    confusers = sorted(companions - truth)
    color, shape = rng.choice(confusers or absent)
    return PRESENCE_QUESTION.format(color=color, shape=shape), False


def parse_setting(setting: str, image_size: int = 64) -> tuple[str, dict, int]:
    """``(format, builder options, companions)`` of a probe setting; raises ValueError naming the setting."""
    from augment.mia.formats import GRID_LAYOUTS

    match = _SETTING.match(setting)
    count = int(match.group(2) or match.group(3) or 0) if match else 0
    if (
        match is None
        or (setting.startswith("sequence") and count < 2)
        or (setting.startswith("grid") and count not in GRID_LAYOUTS)
    ):
        raise ValueError(
            f"unknown probe setting {setting!r}: use single, sequence<N> (N ≥ 2), grid<N> (N in "
            f"{sorted(GRID_LAYOUTS)}) or pic_in_pic"
        )
    if setting.startswith("sequence"):
        return "sequence", {"num_images": count}, count - 1
    if setting.startswith("grid"):
        margin = max(4, image_size // 4)
        return "grid", {"num_tiles": count, "tile_size": image_size, "margin": margin, "square": True}, count - 1
    return setting, {}, {"single": 0, "pic_in_pic": 1}[setting]


def make_probes(
    setting: str,
    n_captions: int,
    n_questions: int,
    seed: int = 0,
    image_size: int = 64,
    max_objects: int = 3,
) -> list[Probe]:
    """Caption and presence probes for one setting, a pure function of its arguments.

    Args:
        setting: ``single``, ``sequence<N>`` (N ≥ 2 images), ``grid<N>`` (2, 3, 4, 6 or 9 tiles) or ``pic_in_pic``.
        n_captions: caption probes.
        n_questions: presence probes (yes and no drawn with equal odds).
        seed: probe seed; probes live in their own seed namespace, apart from any written world.
        image_size: side of each scene image; grid tiles are this size with a margin of a quarter of it.
        max_objects: most objects per scene.
    """
    from augment.mia.formats import SourceSample, build_augmented

    fmt, options, n_companions = parse_setting(setting, image_size)
    probes = []
    for kind, count in (("caption", n_captions), ("presence", n_questions)):
        for j in range(count):
            rng = random.Random(f"mmpo-hallucination-probe/v1/{seed}/{setting}/{kind}/{j}")
            scene = sample_scene(rng, max_objects, image_size)
            truth = _objects(scene)
            others = [sample_scene(rng, max_objects, image_size) for _ in range(n_companions)]
            if kind == "caption":
                question, label = CAPTION_QUESTION, None
            else:
                question, label = _presence(rng, truth, set().union(*map(_objects, others)) if others else set())
            image = render_scene(scene, image_size)
            if setting == "single":
                prompt, images = f"<image>\n{question}", (image,)
            else:
                pool = [(f"c{i}", render_scene(s, image_size)) for i, s in enumerate(others)]
                aug = build_augmented(SourceSample("target", image, question, ""), pool, fmt, rng, **options)
                prompt, images = aug.prompt, tuple(aug.images)
            probes.append(Probe(setting, kind, prompt, images, truth, caption_for(scene), label))
    return probes


def mentioned_objects(text: str) -> set[tuple[str | None, str]]:
    """Objects a text names: ``(colour, shape)`` for "red circle", ``(None, shape)`` for a bare "circle"."""
    tokens = tokenize(text.lower())
    return {
        (tokens[i - 1] if i > 0 and tokens[i - 1] in COLORS else None, token)
        for i, token in enumerate(tokens)
        if token in SHAPES
    }


def _present(mention: tuple[str | None, str], truth: frozenset[tuple[str, str]]) -> bool:
    color, shape = mention
    return (color, shape) in truth if color is not None else any(s == shape for _, s in truth)


def parse_yes_no(answer: str) -> bool | None:
    """True for an answer whose first word is "yes", False for "no", None otherwise (case-insensitive)."""
    tokens = tokenize(answer.lower())
    first = tokens[0] if tokens else ""
    return True if first == "yes" else False if first == "no" else None


def score(probes: Sequence[Probe], answers: Sequence[str]) -> dict[str, list[float]]:
    """Counts per setting (``COUNT_FIELDS`` order), summable across ranks before :func:`metrics_from_counts`."""
    counts: dict[str, list[float]] = {}
    for probe, answer in zip(probes, answers, strict=True):
        c = counts.setdefault(probe.setting, [0.0] * len(COUNT_FIELDS))
        if probe.kind == "caption":
            named = mentioned_objects(answer)
            wrong = {m for m in named if not _present(m, probe.truth)}
            exact = " ".join(tokenize(answer.lower())) == " ".join(tokenize(probe.caption))
            for field, value in (
                ("captions", 1),
                ("hallucinated_captions", bool(wrong)),
                ("mentions", len(named)),
                ("hallucinated_mentions", len(wrong)),
                ("truth_objects", len(probe.truth)),
                ("recalled_objects", len(named & probe.truth)),  # a bare shape names no particular object
                ("exact_captions", exact),
            ):
                c[COUNT_FIELDS.index(field)] += float(value)
        else:
            said = parse_yes_no(answer)
            for field, value in (
                ("questions", 1),
                ("correct", said is probe.label),
                ("yes_answers", said is True),
                ("true_yes", said is True and probe.label is True),
                ("label_yes", probe.label is True),
            ):
                c[COUNT_FIELDS.index(field)] += float(value)
    return counts


def metrics_from_counts(counts: Sequence[float]) -> dict[str, float]:
    """CHAIR and POPE figures from summed counts; a metric with no denominator is left out."""
    c = dict(zip(COUNT_FIELDS, counts, strict=True))
    ratios = {
        "chair_s": ("hallucinated_captions", "captions"),
        "chair_i": ("hallucinated_mentions", "mentions"),
        "object_recall": ("recalled_objects", "truth_objects"),
        "caption_exact": ("exact_captions", "captions"),
        "pope_accuracy": ("correct", "questions"),
        "pope_yes_ratio": ("yes_answers", "questions"),
    }
    out = {name: c[num] / c[den] for name, (num, den) in ratios.items() if c[den] > 0}
    if c["questions"] > 0:
        # positive = yes; a model that never says yes has no precision to speak of: 0, as its F1
        out["pope_precision"] = c["true_yes"] / c["yes_answers"] if c["yes_answers"] > 0 else 0.0
        out["pope_recall"] = c["true_yes"] / c["label_yes"] if c["label_yes"] > 0 else 0.0
        denominator = c["yes_answers"] + c["label_yes"]
        out["pope_f1"] = 2 * c["true_yes"] / denominator if denominator > 0 else 0.0
    return out


class AnswerEval(L.Callback):
    """What the evaluations that score the policy's own generated answers share.

    A subclass sets ``during_fit`` and ``processor_path`` and defines ``run(trainer, pl_module, stage)``;
    this class runs it at the end of ``validate`` (and of each validation of ``fit`` when ``during_fit``)
    and of ``test``, finds the processor, sums count tables over ranks and logs.
    """

    during_fit: bool = False
    processor_path: str | None = None

    def _processor(self, trainer: L.Trainer) -> Any:
        if self.processor_path is not None:
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(self.processor_path)
        processor = getattr(trainer.datamodule, "processor", None)
        if processor is None:
            raise ValueError(
                f"{type(self).__name__} needs a processor: set its `processor` or use a datamodule that has one"
            )
        return processor

    @staticmethod
    def summed_over_ranks(trainer: L.Trainer, pl_module: L.LightningModule, rows: list[list[float]]) -> Tensor:
        """(rows, fields) counts of this rank, summed over every rank (float64)."""
        table = torch.tensor(rows, dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            table = pl_module.all_gather(table).sum(dim=0)
        return table

    @staticmethod
    def log_all(pl_module: L.LightningModule, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            pl_module.log(name, value, rank_zero_only=True, batch_size=1)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        raise NotImplementedError

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING and not self.during_fit:
            return
        self.run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, "test")


class HallucinationEval(AnswerEval):
    """Log CHAIR-style and POPE-style hallucination metrics of the policy's own answers.

    Args:
        settings: probe settings (see :func:`make_probes`), e.g. ``["single", "sequence3"]``.
        n_captions: caption probes per setting.
        n_questions: presence probes per setting.
        seed: probe seed.
        image_size: scene side in pixels.
        max_objects: most objects per scene.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: longest answer.
        during_fit: also run after each validation of ``mmpo fit`` (off: only ``validate`` and ``test``).
        processor: processor path; by default the datamodule's ``processor``.
    """

    def __init__(
        self,
        settings: list[str] | None = None,
        n_captions: int = 64,
        n_questions: int = 64,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 3,
        batch_size: int = 16,
        max_new_tokens: int = 32,
        during_fit: bool = False,
        processor: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = list(settings or ["single", "sequence3"])
        for setting in self.settings:
            parse_setting(setting)
        self.n_captions, self.n_questions = n_captions, n_questions
        self.seed, self.image_size, self.max_objects = seed, image_size, max_objects
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.during_fit = during_fit
        self.processor_path = processor
        self._probes: list[Probe] | None = None
        self.last_answers: list[tuple[Probe, str]] = []

    def probes(self) -> list[Probe]:
        if self._probes is None:
            self._probes = [
                p
                for s in self.settings
                for p in make_probes(s, self.n_captions, self.n_questions, self.seed, self.image_size, self.max_objects)
            ]
        return self._probes

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        from mmpo.generation import generate_answers

        model = getattr(pl_module, "policy", None) or pl_module
        mine = self.probes()[trainer.global_rank :: trainer.world_size]
        answers = generate_answers(
            model,
            self._processor(trainer),
            [p.prompt for p in mine],
            [p.images for p in mine],
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
        )
        self.last_answers = list(zip(mine, answers, strict=True))
        local = score(mine, answers)
        rows = [local.get(s, [0.0] * len(COUNT_FIELDS)) for s in self.settings]
        table = self.summed_over_ranks(trainer, pl_module, rows)  # (settings, fields)
        metrics = {}
        for setting, counts in zip(self.settings, table.tolist(), strict=True):
            for name, value in metrics_from_counts(counts).items():
                metrics[f"{stage}/hallucination/{setting}/{name}"] = value
        self.log_all(pl_module, metrics)
        return metrics
