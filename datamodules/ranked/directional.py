"""Directional preference alignment: ranked responses scored along user-chosen directions in reward space.

DPA (Wang et al. 2024, "Arithmetic Control of LLMs for Diverse User Preferences: Directional Preference
Alignment with Multi-Objective Rewards") gives every response a vector of rewards r ∈ R^D (e.g.
helpfulness, verbosity) and a user's preference a unit direction v; a response's score is vᵀr, and the
model is trained with v written into its prompt, so that at inference the user steers it by the
direction they write. The paper fine-tunes by rejection sampling (SFT on the best response under each
direction); here the same directional scores feed any ranked-data objective: pairs (DPO family),
whole lists (list losses), or the best response alone (``SFTLoss`` on ``best_vs_worst`` pairs).

A record carries ``rewards`` (one list of D numbers per response) instead of ``scores``::

    {"id": "q1", "prompt": "<image> describe it .", "images": ["a.png"],
     "responses": ["short", "long and detailed"], "rewards": [[0.2, -0.1], [0.9, -0.8]]}

and :class:`DirectionSettings` turns it into one ranked record per direction, with id ``<id>@v<j>``,
``scores`` = vⱼᵀr per response, and the direction appended to the prompt's text.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from datamodules.core.records import BadSampleError

__all__ = ["DirectionSettings", "directional_scores"]


def directional_scores(rewards: list[list[float]], direction: list[float]) -> list[float]:
    """vᵀr for each response's reward vector r."""
    return [sum(v * r for v, r in zip(direction, row, strict=True)) for row in rewards]


@dataclass
class DirectionSettings:
    """Preference directions over the dimensions of per-response reward vectors (DPA).

    Args:
        directions: one or more directions, each a list of D numbers (one per reward dimension); each is
            scaled to unit length, as DPA's directions are unit vectors. Every record is served once per
            direction. Empty: directional scoring is off.
        names: the D dimension names written into prompts (default ``dim0``, ``dim1``, ...).
        condition_prompt: append the direction to the prompt's text, so the model learns to follow it
            (DPA's conditioning); False scores along the directions without telling the model.
        template: the text appended, ``{direction}`` replaced by ``name value`` pairs (2 decimals).
    """

    directions: list[list[float]] = field(default_factory=list)
    names: list[str] | None = None
    condition_prompt: bool = True
    template: str = "(preference direction: {direction})"

    def __post_init__(self) -> None:
        units = []
        for j, v in enumerate(self.directions):
            if not (isinstance(v, list | tuple) and v and all(_finite(x) for x in v)):
                raise ValueError(f"directions[{j}] must be a non-empty list of finite numbers, got {v!r}")
            norm = math.sqrt(sum(float(x) ** 2 for x in v))
            if norm == 0:
                raise ValueError(f"directions[{j}] is the zero vector: it has no direction")
            units.append([float(x) / norm for x in v])
        dims = {len(v) for v in units}
        if len(dims) > 1:
            raise ValueError(f"every direction needs the same number of dimensions, got {sorted(dims)}")
        if self.names is not None and units and len(self.names) != len(units[0]):
            raise ValueError(f"{len(self.names)} names for {len(units[0])} reward dimensions")
        if "{direction}" not in self.template:
            raise ValueError(f"template must contain '{{direction}}', got {self.template!r}")
        self.directions = units

    @property
    def active(self) -> bool:
        return bool(self.directions)

    def describe(self, direction: list[float]) -> str:
        """The text written into a prompt for ``direction``."""
        names = self.names or [f"dim{d}" for d in range(len(direction))]
        return self.template.format(direction=", ".join(f"{n} {v:.2f}" for n, v in zip(names, direction, strict=True)))

    def expand(self, raw: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], list[str]]:
        """One raw ranked record per direction, scored vᵀr, and a note for each direction that ties them all.

        Raises:
            BadSampleError: the record has no ``rewards``, carries ``scores``/``ranking`` too, or its
                rewards are not K lists of D finite numbers.
        """
        rewards = raw.get("rewards")
        if rewards is None:
            raise BadSampleError(f"{where}: directional scoring needs 'rewards' (one list of numbers per response)")
        if raw.get("scores") is not None or raw.get("ranking") is not None:
            raise BadSampleError(
                f"{where}: give 'rewards' (scored along the directions) or 'scores'/'ranking', not both"
            )
        d = len(self.directions[0])
        k = len(raw.get("responses") or [])
        ok = isinstance(rewards, list) and len(rewards) == k
        if not (ok and all(isinstance(r, list) and len(r) == d and all(_finite(x) for x in r) for r in rewards)):
            raise BadSampleError(f"{where}: 'rewards' must be {k} lists of {d} finite numbers, got {rewards!r}")
        out, notes = [], []
        for j, v in enumerate(self.directions):
            scores = directional_scores(rewards, v)
            if len(set(scores)) == 1:
                notes.append(f"{where}: direction {j} gives every response the same score: no pair along it")
                continue
            item = copy.deepcopy(raw)
            item.pop("rewards")
            item["scores"] = scores
            item["id"] = f"{raw.get('id', where)}@v{j}"
            if self.condition_prompt:
                item["prompt"] = _append_text(item["prompt"], self.describe(v), where)
            out.append(item)
        return out, notes


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _append_text(prompt: Any, text: str, where: str) -> Any:
    """The prompt with ``text`` after its last user turn's text (a plain string prompt: after it)."""
    if isinstance(prompt, str):
        return f"{prompt} {text}"
    if isinstance(prompt, list):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    message["content"] = f"{content} {text}"
                elif isinstance(content, list):
                    content.append({"type": "text", "text": f" {text}"})
                else:
                    break
                return prompt
    raise BadSampleError(f"{where}: found no user turn in 'prompt' to write the preference direction into")
