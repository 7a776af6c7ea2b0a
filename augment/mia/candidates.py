"""The candidates of a MIA-DPO build whose selection needs every answer, and the training files made from them.

With a calibrated ``attention_quantile``, the ``none`` / ``random_matched`` filters or ``balance_yes_no``
(:mod:`augment.mia.calibrate`), :mod:`augment.mia.build` writes every candidate (a wrong answer passing
every check but attention) with its images to ``candidates.jsonl`` and provisional decisions to
``decisions.pending.jsonl``. Once every answer is generated, :func:`finalise_decisions` writes
``train.jsonl`` and ``decisions.jsonl`` from them; :func:`write_selection` writes further training files
from the same candidates (the ablation's sets), next to them so their image paths resolve.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from augment.mia.calibrate import Candidate, final_selection, group_key
from augment.mia.select import SelectionConfig, SelectionSummary
from datamodules.core.atomic import atomic_write_text

__all__ = ["CANDIDATES_FILE", "PENDING_DECISIONS_FILE", "finalise_decisions", "read_jsonl", "write_selection"]

CANDIDATES_FILE, PENDING_DECISIONS_FILE = "candidates.jsonl", "decisions.pending.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_selection(
    output: str | os.PathLike, selection: SelectionConfig, seed: int = 0, name: str = "train.jsonl"
) -> dict:
    """Write ``output/name`` with the candidates of a whole-build selection that ``selection`` keeps.

    The training file sits next to ``candidates.jsonl``, so its image paths resolve. One build thus
    gives the ablation's training sets (``filter`` ``none``, ``attention``, ``random_matched``) from
    the same answers.

    Args:
        output: a build's output directory, made with a selection that needs the whole build.
        selection: the rule, the filter and the yes/no balance to apply.
        seed: seed of the random subsets (the build's ``seed``).
        name: file to write (``train.jsonl`` is the build's own).

    Returns:
        ``{"candidates", "kept", "by_reason", "thresholds", "decisions"}``; ``decisions`` maps each
        candidate's id to ``(kept, reason)``.
    """
    path = Path(output) / CANDIDATES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: write_selection needs a build made with attention_quantile, filter none / "
            "random_matched or balance_yes_no, which keeps every candidate"
        )
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    candidates = [
        Candidate(r["mia"]["format"], r["mia"]["n_images"], float(r["mia"]["ratio"]), r["chosen"]) for r in records
    ]
    decisions, thresholds = final_selection(candidates, selection, seed)
    kept_lines = [line for line, (kept, _) in zip(lines, decisions, strict=True) if kept]
    atomic_write_text(Path(output) / name, "".join(kept_lines))
    reasons = Counter(reason for kept, reason in decisions if not kept)
    return {
        "candidates": len(records),
        "kept": sum(kept for kept, _ in decisions),
        "by_reason": dict(reasons),
        "thresholds": thresholds,
        "decisions": {r["id"]: d for r, d in zip(records, decisions, strict=True)},
    }


def finalise_decisions(
    output: str | os.PathLike, selection: SelectionConfig, seed: int = 0
) -> tuple[dict[str, float | None], SelectionSummary]:
    """Write ``train.jsonl`` from the candidates and ``decisions.jsonl`` from the provisional decisions, with the
    candidates' final decisions and the thresholds applied.

    Idempotent: both inputs are only read, so a build killed here does it again on restart.

    Returns:
        The thresholds applied per format and count, and the summary of the final decisions.
    """
    out = Path(output)
    result = write_selection(out, selection, seed)
    decisions = read_jsonl(out / PENDING_DECISIONS_FILE)
    summary = SelectionSummary()
    for d in decisions:
        if d["id"] in result["decisions"]:
            d["kept"], d["reason"] = result["decisions"][d["id"]]
        key = group_key(d["format"], d["n_images"])
        if key in result["thresholds"]:
            d["threshold"] = result["thresholds"][key]
        summary.add(d["format"], d["kept"], d["reason"])
    atomic_write_text(out / "decisions.jsonl", "".join(json.dumps(d) + "\n" for d in decisions))
    return dict(result["thresholds"]), summary
