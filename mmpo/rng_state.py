"""The random streams training steps draw from (LoRA dropout), kept in checkpoints so a resumed run is exact.

A training step draws from torch's global CPU generator and, on a GPU, from its device's generator
(dropout masks); some transformers models also draw from Python's ``random`` and NumPy's global state
(LayerDrop). Saving those generators at a checkpoint and setting them back on resume is not enough:
between loading a checkpoint and the first resumed step, Lightning and the DataLoader draw from the
same global generators (every DataLoader iterator draws its base seed, the validation loader's too),
and a run that resumes at an epoch boundary makes a different number of such draws than the run that
never stopped. So the steps draw from streams of their own: :meth:`TrainingRandomness.drawn` swaps
them in for the step and out again, nothing else advances them, and their state after a step is the
state the next step starts from, in the run that never stopped and in the resumed one alike.

Under DDP each rank has its own streams, but only rank 0 writes the checkpoint file: :func:`gather`
collects every rank's state (``all_gather_object``) when the checkpoint is made, and each rank
restores its own entry (:func:`restore`).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CHECKPOINT_KEY", "TrainingRandomness", "gather", "restore"]

#: the checkpoint entry: ``{"version": 1, "ranks": [state of rank 0, state of rank 1, ...]}``
CHECKPOINT_KEY = "mmpo_training_rng"
_VERSION = 1


def _stored(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as a checkpoint holds it: NumPy's key as a tensor (``torch.load(weights_only=True)``
    reads tensors, tuples, ints, floats and None, not NumPy arrays)."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    numpy = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return {**state, "numpy": numpy}


def _loaded(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_stored` (done once, at loading: no tensor is read back during training)."""
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}


def _capture(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _apply(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _seeded(seed: int, device: torch.device) -> dict[str, Any]:
    """Every stream seeded with ``seed``, without touching the process's generators."""
    state = {
        "torch": torch.Generator().manual_seed(seed).get_state(),
        "python": random.Random(seed).getstate(),
        "numpy": np.random.RandomState(seed % 2**32).get_state(legacy=True),
    }
    if device.type == "cuda":
        state["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
    return state


class TrainingRandomness:
    """The random streams of the training steps, apart from the process's global ones.

    The streams start, at the first step, from a seed drawn from the global torch generator (so from
    ``seed_everything``), unless a checkpoint's state was loaded first.
    """

    def __init__(self) -> None:
        self._state: dict[str, Any] | None = None

    @contextlib.contextmanager
    def drawn(self, device: torch.device) -> Iterator[None]:
        """Inside the block, the global generators (CPU, ``device``'s, Python's, NumPy's) are the streams."""
        if self._state is None:
            self._state = _seeded(int(torch.randint(0, 2**62, ())), device)
        elif device.type == "cuda" and "cuda" not in self._state:  # a CPU run's checkpoint resumed on a GPU
            self._state["cuda"] = _seeded(int(torch.randint(0, 2**62, ())), device)["cuda"]
        outer = _capture(device)
        _apply(self._state, device)
        try:
            yield
        finally:
            self._state = _capture(device)
            _apply(outer, device)

    def state_dict(self) -> dict[str, Any] | None:
        """The streams' state, as a checkpoint holds it (None before the first step)."""
        return None if self._state is None else _stored(self._state)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._state = None if state is None else _loaded(state)


def gather(rng: TrainingRandomness, world_size: int) -> dict[str, Any]:
    """The checkpoint entry holding every rank's streams; a collective call on every rank when ``world_size > 1``."""
    states: list[Any] = [rng.state_dict()]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, rng.state_dict())
    return {"version": _VERSION, "ranks": states}


def restore(rng: TrainingRandomness, entry: dict[str, Any] | None, rank: int, world_size: int) -> str | None:
    """Set ``rng`` to this rank's streams of a checkpoint entry.

    Returns:
        None, or why the streams cannot be restored (an older checkpoint, another number of ranks).
    """
    if entry is None:
        return "the checkpoint was written before mmpo saved them"
    if entry.get("version") != _VERSION:
        return f"the checkpoint's entry has version {entry.get('version')}, this mmpo reads {_VERSION}"
    if len(entry["ranks"]) != world_size:
        return f"the checkpoint holds the streams of {len(entry['ranks'])} rank(s), this run has {world_size}"
    rng.load_state_dict(entry["ranks"][rank])
    return None
