"""Ranked multi-response preference data: K scored responses per prompt, expanded into DPO pairs.

A record holds one prompt and K >= 2 responses with either ``scores`` (higher is better) or a
``ranking`` (response indices, best first)::

    {"id": "q7", "images": ["a.png"], "prompt": "describe the image .",
     "responses": ["r1", "r2", "r3", "r4"], "scores": [4.0, 2.5, 1.0, 3.0]}

Responses are strings or assistant-message lists, as ``chosen`` is in :mod:`datamodules.core.records`.
Listwise losses (RankDPO, tree preference) read the :class:`RankedRecord` lists; pairwise losses get
:class:`RankedPair` s from :func:`expand_pairs`, ordered for Curry-DPO by :func:`curriculum_order`,
and :class:`RankedPreferenceDataset` serves them to the ordinary ``VisionPreferenceCollator``.
Every problem names the file and line (or row) of the record, as in :mod:`datamodules.core.records`.
"""

from __future__ import annotations

import copy
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from torch.utils.data import Dataset

from datamodules.core.records import (
    BadSampleError,
    PreferenceRecord,
    default_root,
    load_records,
    parse_prompt_and_images,
    response_text,
)
from datamodules.vision_text.collator import load_image

__all__ = [
    "PairStrategy",
    "RankedPair",
    "RankedListDataset",
    "RankedPreferenceDataset",
    "RankedRecord",
    "curriculum_order",
    "expand_pairs",
    "load_ranked_records",
    "parse_ranked_record",
]

PairStrategy = Literal["best_vs_worst", "all_pairs", "adjacent", "best_vs_rest"]
_STRATEGIES: tuple[str, ...] = get_args(PairStrategy)


@dataclass
class RankedRecord:
    """One validated multi-response record.

    Attributes:
        id: record id (from the data, else ``<file>:<line>``).
        where: ``<file>:<line>`` (or ``<file>[row]``) for error messages.
        prompt: conversational messages; images appear as ``{"type": "image"}`` items in order.
        responses: the K >= 2 response texts, in the data's order.
        scores: K finite scores, higher is better, not all equal. From a ranking alone,
            ``scores[i] = K - position of i`` (best K, worst 1).
        images: absolute image paths, in placeholder order.
    """

    id: str
    where: str
    prompt: list[dict[str, Any]]
    responses: list[str]
    scores: list[float]
    images: list[str]

    def order(self) -> list[int]:
        """Response indices best first; tied responses keep the data's order."""
        return sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))


@dataclass
class RankedPair:
    """A preference pair cut from a :class:`RankedRecord`.

    Attributes:
        record: the pair as an ordinary :class:`PreferenceRecord` (id ``f"{list id}#{i}>{j}"``).
        source_id: id of the ranked record it came from.
        chosen_index: index i of the chosen response in the ranked record.
        rejected_index: index j of the rejected response.
        gap: ``scores[i] - scores[j]`` (> 0); Curry-DPO's difficulty, larger is easier.
    """

    record: PreferenceRecord
    source_id: str
    chosen_index: int
    rejected_index: int
    gap: float

    @property
    def id(self) -> str:
        return self.record.id


def _to_float(x: int | float) -> float:
    try:
        return float(x)
    except OverflowError:  # an integer too large for a float
        return math.inf


def _scores(raw: dict[str, Any], k: int, where: str) -> list[float]:
    scores, ranking = raw.get("scores"), raw.get("ranking")
    if scores is None and ranking is None:
        raise BadSampleError(f"{where}: needs 'scores' (higher is better) or 'ranking' (indices, best first)")
    if ranking is not None:
        if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
            raise BadSampleError(f"{where}: 'ranking' must be a list of response indices, got {ranking!r}")
        if sorted(ranking) != list(range(k)):
            raise BadSampleError(f"{where}: 'ranking' must be a permutation of 0..{k - 1} (best first), got {ranking}")
    if scores is not None:
        if not isinstance(scores, list) or not all(
            isinstance(s, int | float) and not isinstance(s, bool) for s in scores
        ):
            raise BadSampleError(f"{where}: 'scores' must be a list of numbers, got {scores!r}")
        if len(scores) != k:
            raise BadSampleError(f"{where}: {len(scores)} score(s) for {k} responses")
        scores = [_to_float(s) for s in scores]
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise BadSampleError(f"{where}: scores must be finite numbers, got NaN or infinity at index(es) {bad}")
        if ranking is not None:
            # Both given: scores win (they carry gaps and ties); the ranking must not contradict them.
            for a, b in zip(ranking, ranking[1:], strict=False):
                if scores[a] < scores[b]:
                    raise BadSampleError(
                        f"{where}: 'ranking' puts response {a} (score {scores[a]:g}) above response {b} "
                        f"(score {scores[b]:g}); give one of them, or make them agree"
                    )
    else:
        scores = [0.0] * k
        for position, i in enumerate(ranking):
            scores[i] = float(k - position)
    if len(set(scores)) == 1:
        raise BadSampleError(f"{where}: every response has the same score {scores[0]:g}, so no pair can be formed")
    return scores


def parse_ranked_record(raw: dict[str, Any], where: str, data_root: Path, image_token: str = "<image>") -> RankedRecord:
    """Validate one raw multi-response record and resolve its media paths.

    Rules: K >= 2 non-empty responses; ``scores`` of length K, finite (no NaN or infinity), or a
    ``ranking`` that is a permutation of ``range(K)``, best first; when both are given the scores
    are kept and the ranking must list responses in non-increasing score order; not every score
    equal; identical responses must not carry different scores (such a pair teaches nothing).

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    missing = [key for key in ("prompt", "responses") if raw.get(key) is None]
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
    values = raw["responses"]
    if not isinstance(values, list):
        raise BadSampleError(f"{where}: 'responses' must be a list, got {type(values).__name__}")
    if len(values) < 2:
        raise BadSampleError(f"{where}: 'responses' needs at least 2 responses to form a pair, got {len(values)}")
    responses = [response_text(v, f"responses[{i}]", where) for i, v in enumerate(values)]
    scores = _scores(raw, len(responses), where)
    first: dict[str, int] = {}
    for i, text in enumerate(responses):
        j = first.setdefault(text, i)
        if scores[i] != scores[j]:
            raise BadSampleError(
                f"{where}: responses {j} and {i} are identical but scored {scores[j]:g} and {scores[i]:g}"
            )
    prompt, images = parse_prompt_and_images(raw, where, data_root, image_token)
    return RankedRecord(
        id=str(raw.get("id", where)), where=where, prompt=prompt, responses=responses, scores=scores, images=images
    )


def load_ranked_records(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    image_token: str = "<image>",
    expand: Callable[[dict[str, Any], str], tuple[list[dict[str, Any]], list[str]]] | None = None,
) -> tuple[list[RankedRecord], list[str]]:
    """Read and validate every multi-response record of a .jsonl, .json or .parquet file.

    Args:
        path: the data file.
        data_root: directory media paths are relative to (default: the file's directory).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        image_token: the placeholder that marks an image in plain-text prompts.
        expand: turns one raw record into several, with notes on what it left out (directional
            scoring: :meth:`~datamodules.ranked.directional.DirectionSettings.expand`); a
            ``BadSampleError`` it raises is a bad record.

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    root = default_root(path, data_root)

    def parse(raw: dict[str, Any], where: str) -> tuple[list[RankedRecord], list[str]]:
        raws, notes = expand(raw, where) if expand is not None else ([raw], [])
        return [parse_ranked_record(item, where, root, image_token) for item in raws], notes

    return load_records(path, parse, on_bad_sample)


def _index_pairs(scores: list[float], order: list[int], strategy: str) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs with a strictly higher chosen score, in best-first order."""
    if strategy == "all_pairs":
        return [(i, j) for a, i in enumerate(order) for j in order[a + 1 :] if scores[i] > scores[j]]
    if strategy in ("best_vs_worst", "best_vs_rest"):
        best = order[0]  # the first-listed of tied best responses
        rest = [j for j in order if scores[j] < scores[best]]
        if strategy == "best_vs_rest":
            return [(best, j) for j in rest]
        worst = min(j for j in rest if scores[j] == scores[rest[-1]])  # first-listed of tied worst
        return [(best, worst)]
    if strategy == "adjacent":
        # Adjacent *score levels*: each response against every response of the next lower score, so
        # ties are never paired and never break the chain (4 > 3 = 3 > 1 gives 0>1, 0>2, 1>3, 2>3).
        levels = sorted(set(scores), reverse=True)
        return [
            (i, j)
            for hi, lo in zip(levels, levels[1:], strict=False)
            for i in order
            if scores[i] == hi
            for j in order
            if scores[j] == lo
        ]
    raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {', '.join(_STRATEGIES)}")


def expand_pairs(record: RankedRecord, strategy: PairStrategy) -> list[RankedPair]:
    """Cut a ranked record into preference pairs; the chosen response always has the higher score.

    Strategies (ties never form a pair; among tied responses the first listed takes a single slot):

    - ``best_vs_worst``: one pair, the best against the worst.
    - ``all_pairs``: every pair with different scores (K(K-1)/2 without ties).
    - ``adjacent``: neighbouring score levels (K-1 pairs without ties).
    - ``best_vs_rest``: Curry-DPO's, the best against each lower-scored response (K-1 pairs).

    Returns:
        :class:`RankedPair` s, chosen best-first then rejected best-first; each wraps an unchanged
        :class:`PreferenceRecord` with id ``f"{record.id}#{i}>{j}"`` and carries the score gap.
    """
    s = record.scores
    return [
        RankedPair(
            record=PreferenceRecord(
                id=f"{record.id}#{i}>{j}",
                where=record.where,
                prompt=record.prompt,
                chosen=record.responses[i],
                rejected=record.responses[j],
                images=record.images,
            ),
            source_id=record.id,
            chosen_index=i,
            rejected_index=j,
            gap=s[i] - s[j],
        )
        for i, j in _index_pairs(s, record.order(), strategy)
    ]


def _by_gap(pairs: list[RankedPair]) -> list[RankedPair]:
    return sorted(pairs, key=lambda p: (-p.gap, p.id))


def curriculum_order(pairs: list[RankedPair], stages: int | None = None) -> list[list[RankedPair]]:
    """Order pairs easy to hard (largest score gap first), as Curry-DPO trains them.

    Args:
        pairs: pairs from :func:`expand_pairs`, from any number of ranked records.
        stages: None gives one stage, every pair sorted by gap (descending, then id). With n stages,
            each record's own pairs are sorted by gap and its r-th of m pairs goes to stage
            ``floor(r * n / m)``: when m == n (Curry-DPO: 4 responses, ``best_vs_rest``, 3 stages)
            stage i holds the i-th easiest pair of every prompt, (R1,R4) then (R1,R3) then (R1,R2);
            with m > n a record's pairs are split into n contiguous runs; with m < n its pairs fill
            the first m stages. Stages are always n lists (possibly empty), each sorted by gap then id.

    Returns:
        The stages, easiest first.
    """
    if stages is None:
        return [_by_gap(pairs)]
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive integer or None, got {stages!r}")
    groups: dict[tuple[str, str], list[RankedPair]] = defaultdict(list)
    for p in pairs:
        groups[(p.record.where, p.source_id)].append(p)
    out: list[list[RankedPair]] = [[] for _ in range(stages)]
    for group in groups.values():
        m = len(group)
        for r, p in enumerate(_by_gap(group)):
            out[r * stages // m].append(p)
    return [_by_gap(stage) for stage in out]


class RankedPreferenceDataset(Dataset):
    """Pairs expanded from ranked records, served as ``PreferenceDataset`` items.

    Items are ``{"record": PreferenceRecord, "images": [PIL images]}`` (or None in skip mode when an
    image does not decode), so ``VisionPreferenceCollator`` batches them unchanged. ``pairs[i]`` gives
    the :class:`RankedPair` (score gap, response indices) behind item i; ``lists`` keeps the ranked
    records for listwise losses. By default every pair is served in record order; ``set_stage(i)``
    restricts the dataset to curriculum stage i (see :func:`curriculum_order`), and ``stage(i)``
    returns such a restricted copy. DataLoader workers hold their own copy of the dataset, so rebuild
    the loaders after ``set_stage`` (Lightning: ``reload_dataloaders_every_n_epochs``).

    Args:
        records: validated ranked records (``load_ranked_records``).
        strategy: how each record is cut into pairs (:func:`expand_pairs`).
        stages: number of curriculum stages; None gives one stage, all pairs sorted by gap.
        on_bad_sample: ``"error"`` raises on an undecodable image; ``"skip"`` yields None for it.
    """

    def __init__(
        self,
        records: list[RankedRecord],
        strategy: PairStrategy = "best_vs_rest",
        stages: int | None = None,
        on_bad_sample: str = "error",
    ) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.lists = records
        self.strategy = strategy
        self.on_bad_sample = on_bad_sample
        self.all_pairs = [p for rec in records for p in expand_pairs(rec, strategy)]
        self.stages = curriculum_order(self.all_pairs, stages)
        self.current_stage: int | None = None
        self.pairs = self.all_pairs

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def records(self) -> list[PreferenceRecord]:
        """The pairwise records served now (what reference-log-prob caching fingerprints and computes)."""
        return [p.record for p in self.pairs]

    def set_stage(self, stage: int | None) -> None:
        """Serve only curriculum stage ``stage`` (easiest is 0); None serves every pair again."""
        if stage is None:
            self.current_stage, self.pairs = None, self.all_pairs
            return
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} out of range: this dataset has {self.num_stages} stage(s)")
        self.current_stage, self.pairs = stage, self.stages[stage]

    def stage(self, stage: int) -> RankedPreferenceDataset:
        """A copy of this dataset restricted to one curriculum stage (this one is left as it is)."""
        view = copy.copy(self)
        view.set_stage(stage)
        return view

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.pairs[i].record
        try:
            images = [load_image(p, rec.where) for p in rec.images]
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        return {"record": rec, "images": images}


class RankedListDataset(Dataset):
    """Ranked records served whole: one group of K responses per record, best first, with their scores.

    Items carry ``responses`` (the K texts, best first; tied responses keep the data's order) and
    ``scores`` (the same order), which ``VisionPreferenceCollator`` turns into a group of K rows and a
    (B, K) ``scores`` tensor for list losses. The ``record`` of an item is the pair of its best two
    responses (id = the list's id). A batch holds groups of one size, so records of different K
    cannot share a batch: keep K fixed in a file served this way.

    Args:
        records: validated ranked records (``load_ranked_records``).
        on_bad_sample: ``"error"`` raises on an undecodable image; ``"skip"`` yields None for it.
    """

    def __init__(self, records: list[RankedRecord], on_bad_sample: str = "error") -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.records = records  # what a reference cache fingerprints: every response and score
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.records[i]
        order = rec.order()
        best = PreferenceRecord(
            id=rec.id, where=rec.where, prompt=rec.prompt, chosen=rec.responses[order[0]],
            rejected=rec.responses[order[1]], images=rec.images,
        )  # fmt: skip
        try:
            images = [load_image(p, rec.where) for p in rec.images]
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        return {
            "record": best,
            "images": images,
            "responses": [rec.responses[j] for j in order],
            "scores": [rec.scores[j] for j in order],
        }
