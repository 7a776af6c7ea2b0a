"""Video hallucination on the synthetic video world, in the form of VideoHallucer: paired yes/no questions.

Each probe (`datamodules.worlds.video_probes`) is a clip with a *basic* question (true answer "yes")
and a *hallucinated* twin (one detail changed, true answer "no") of type ``temporal``, ``semantic`` or
``relation``. The policy answers both greedily from the clip's frames; an answer is parsed by its first
word (`parse_yes_no`, the rule of the image-side POPE probes) and scored as in VideoHallucer:

- ``basic_acc``: share of basic questions answered "yes";
- ``hallucinated_acc``: share of hallucinated questions answered "no";
- ``pair_acc``: share of pairs with both right (a model that always says "yes" gets 0);
- ``yes_ratio``: share of all answers that are "yes" (0.5 for a faithful model);
- ``unparsable``: share of all answers that are neither (they count as wrong).

:class:`VideoHallucinationEval` is a Lightning callback: it runs on ``mmpo validate`` and ``mmpo test``
(and, optionally, after each validation of ``mmpo fit``) and logs ``val/video_hallucination/<type>/<metric>``
(``test/...``) per type and for ``overall``. Probes are sharded across ranks and counts summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from datamodules.vision_text.video_io import sample_frame_indices
from datamodules.worlds.video_clips import DEFAULT_SPEEDS
from datamodules.worlds.video_probes import PROBE_TYPES, VideoProbePair, make_video_probes
from mmpo.generation import generate_answers
from mmpo.hallucination import AnswerEval, parse_yes_no

__all__ = [
    "COUNT_FIELDS",
    "OVERALL",
    "VideoHallucinationEval",
    "count_answers",
    "metrics_from_counts",
    "score",
]

COUNT_FIELDS = ("pairs", "basic_correct", "hallucinated_correct", "pair_correct", "yes_answers", "unparsable")
OVERALL = "overall"


def count_answers(probes: Sequence[VideoProbePair], answers: Sequence[tuple[str, str]]) -> dict[str, list[float]]:
    """Counts per probe type (`COUNT_FIELDS` order), summable across ranks before `metrics_from_counts`.

    Args:
        probes: The probe pairs.
        answers: ``(answer to basic, answer to hallucinated)`` per probe, in order.
    """
    counts: dict[str, list[float]] = {}
    for probe, (basic, hallucinated) in zip(probes, answers, strict=True):
        said = parse_yes_no(basic), parse_yes_no(hallucinated)
        expected = probe.basic_answer == "yes", probe.hallucinated_answer == "yes"
        right = [s is e for s, e in zip(said, expected, strict=True)]  # None (unparsable) is never right
        c = counts.setdefault(probe.kind, [0.0] * len(COUNT_FIELDS))
        for i, value in enumerate((1, right[0], right[1], all(right), said.count(True), said.count(None))):
            c[i] += float(value)
    return counts


def metrics_from_counts(counts: Sequence[float]) -> dict[str, float]:
    """VideoHallucer's accuracies, the yes ratio and the unparsable share; empty without any pair."""
    c = dict(zip(COUNT_FIELDS, counts, strict=True))
    pairs = c["pairs"]
    if pairs <= 0:
        return {}
    return {
        "basic_acc": c["basic_correct"] / pairs,
        "hallucinated_acc": c["hallucinated_correct"] / pairs,
        "pair_acc": c["pair_correct"] / pairs,
        "yes_ratio": c["yes_answers"] / (2 * pairs),
        "unparsable": c["unparsable"] / (2 * pairs),
    }


def score(probes: Sequence[VideoProbePair], answers: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Metrics per probe type present and over all of them (`OVERALL`)."""
    counts = count_answers(probes, answers)
    total = [sum(col) for col in zip(*counts.values(), strict=True)] if counts else [0.0] * len(COUNT_FIELDS)
    return {**{kind: metrics_from_counts(c) for kind, c in counts.items()}, OVERALL: metrics_from_counts(total)}


class VideoHallucinationEval(AnswerEval):
    """Log VideoHallucer-style accuracies of the policy's own yes/no answers about synthetic clips.

    Args:
        n_probes: Probe pairs; types take turns, so each gets ``n_probes / len(types)``.
        types: Probe types from ``temporal``, ``semantic``, ``relation`` (all by default); repeat one to weigh it more.
        seed: Probe seed.
        clip_frames: Frames rendered per clip (the video world's ``num_frames``).
        size: Side of the square frames in pixels.
        max_objects: Most objects per clip.
        num_frames: Frames shown to the model, picked uniformly from the clip as the video datamodule
            does for validation; by default the datamodule's ``frames.num_frames``, or the whole clip
            when it has none.
        batch_size: Questions per ``generate`` call.
        max_new_tokens: Longest answer; the first word decides it.
        during_fit: Also run after each validation of ``mmpo fit`` (off: only ``validate`` and ``test``).
        processor: Processor path; by default the datamodule's ``processor``.
        fps: The frame rate the probe clips stand for (the video world writes its clips at 8), passed to
            the processor with the frames shown, as the datamodule passes a decoded clip's timing.
        speeds: Least and most px per frame of the probe clips' objects (the video world's ``speeds``).
    """

    def __init__(
        self,
        n_probes: int = 60,
        types: list[str] | None = None,
        seed: int = 0,
        clip_frames: int = 16,
        size: int = 64,
        max_objects: int = 3,
        num_frames: int | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 8,
        during_fit: bool = False,
        processor: str | None = None,
        fps: float = 8.0,
        speeds: tuple[int, int] = DEFAULT_SPEEDS,
    ) -> None:
        super().__init__()
        self.types = list(types or PROBE_TYPES)
        make_video_probes(0, seed, self.types)  # validates the types now, not at the end of a validation
        self.n_probes, self.seed = n_probes, seed
        self.clip_frames, self.size, self.max_objects = clip_frames, size, max_objects
        self.speeds = (int(speeds[0]), int(speeds[1]))
        self.num_frames = num_frames
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.during_fit = during_fit
        self.processor_path = processor
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self._probes: dict[tuple[int, ...], list[VideoProbePair]] = {}
        self.last_answers: list[tuple[VideoProbePair, tuple[str, str]]] = []

    def shown_frames(self, trainer: L.Trainer | None = None) -> list[int]:
        """Indices of the clip's frames the model sees."""
        count = self.num_frames
        if count is None:
            frames = getattr(getattr(trainer, "datamodule", None), "frames", None)
            count = getattr(frames, "num_frames", None) or self.clip_frames
        return sample_frame_indices(self.clip_frames, count, "uniform")

    def probes(self, shown: Sequence[int]) -> list[VideoProbePair]:
        """The probe pairs answerable from the frames ``shown`` (cached)."""
        key = tuple(shown)
        if key not in self._probes:
            self._probes[key] = make_video_probes(
                self.n_probes, self.seed, self.types, self.clip_frames, self.size, self.max_objects, key, self.speeds
            )
        return self._probes[key]

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        """Answer this rank's share of the probes, sum the counts over ranks, log and return the metrics."""
        model = getattr(pl_module, "policy", None) or pl_module
        shown = self.shown_frames(trainer)
        mine = self.probes(shown)[trainer.global_rank :: trainer.world_size]
        # Both questions of a probe, basic first, see the same frames: (len(shown), H, W, 3) each.
        questions = [q for p in mine for q in (p.basic, p.hallucinated)]
        videos = [p.frames[shown] for p in mine for _ in range(2)]
        timing = {
            "total_num_frames": self.clip_frames, "fps": self.fps, "frames_indices": list(shown),
            "duration": self.clip_frames / self.fps, "height": self.size, "width": self.size,
        }  # fmt: skip
        flat = generate_answers(
            model,
            self._processor(trainer),
            questions,
            videos=videos,
            video_metadata=[timing] * len(videos),
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
        )
        answers = list(zip(flat[0::2], flat[1::2], strict=True))
        self.last_answers = list(zip(mine, answers, strict=True))
        kinds = list(dict.fromkeys(self.types))
        local = count_answers(mine, answers)
        rows = [local.get(k, [0.0] * len(COUNT_FIELDS)) for k in kinds]
        table = self.summed_over_ranks(trainer, pl_module, rows)  # (types, fields)
        rows = {**dict(zip(kinds, table.tolist(), strict=True)), OVERALL: table.sum(dim=0).tolist()}
        metrics = {
            f"{stage}/video_hallucination/{kind}/{name}": value
            for kind, counts in rows.items()
            for name, value in metrics_from_counts(counts).items()
        }
        self.log_all(pl_module, metrics)
        return metrics
