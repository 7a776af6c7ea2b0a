"""A deterministic synthetic talking-portrait world: a drawn face whose mouth follows speech-like audio.

Each clip (default 16 frames of 32x32 RGB at 8 fps, 2 s of 8 kHz audio) shows one *identity* (skin, hair and
iris colours, face width, size, eye spacing and mouth width) on a plain background. The audio is syllable
bursts and pauses (`datamodules.worlds.portrait_audio`); the face follows it:

- mouth opening (fraction of the identity's widest opening, 0.17 face heights) = the frame's audio
  ``envelope`` (loudness in [0, 1], `frame_features`): the known function the lip-sync critic checks;
- head position and roll follow a smooth path (two slow sinusoids per axis, 0.15–0.6 Hz, up to 5 % of the
  frame and 8 degrees), independent of the audio;
- eyes close for single frames with probability ``blink_prob`` (blinks).

Ground truth of every frame is in the record (mouth opening, head centre, roll, blink, landmarks: head,
eyes and mouth centres in pixels). Faces are drawn by `datamodules.worlds.portrait_face`.

On disk: ``frames/<id>.png`` is the clip as a film strip (T frames side by side, ``(H, T·W)``), lossless
because the critics measure a mouth a few pixels high (H.264's yuv420p halves the colour resolution of a
32 px face) and the diffusion side reads images with PIL already; ``audio/<id>.wav`` (16-bit mono);
``identities/<identity>.png`` the reference face (centred, still, mouth closed, eyes open); ``train.jsonl``
and ``val.jsonl`` (records with paths, identity, per-frame ``envelope`` and ``mel`` features and ``truth``);
``world.json``. Validation clips use held-out identities (and, like every clip, their own audio).

    python -m datamodules.worlds.portrait --out DIR --n-train 400 --n-val 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.core.atomic import atomic_file
from datamodules.core.records import BadSampleError
from datamodules.vision_text.collator import load_image
from datamodules.worlds.portrait_audio import (
    frame_features,
    read_wav,
    samples_per_frame,
    speech_like_audio,
    write_wav,
)
from datamodules.worlds.portrait_face import BACKGROUND, MAX_OPEN, MOUTH_COLOR, Identity, face_landmarks, render_face
from datamodules.worlds.writer import write_world

__all__ = [
    "PORTRAIT_WORLD_VERSION",
    "PortraitWorld",
    "load_portrait_clip",
    "main",
    "read_film_strip",
    "write_portrait_world",
]

PORTRAIT_WORLD_VERSION = 1
_KINDS = ("seen_identity", "held_out_identity")


def _smooth_path(rng: random.Random, times: np.ndarray, amplitude: float) -> np.ndarray:
    """Two slow sinusoids (0.15–0.6 Hz, random phases), the second at half the amplitude: ``(T,)``."""
    path = np.zeros_like(times)
    for weight in (1.0, 0.5):
        path += weight * amplitude * np.sin(2 * math.pi * rng.uniform(0.15, 0.6) * times + rng.uniform(0, 2 * math.pi))
    return path / 1.5


@dataclass(frozen=True)
class PortraitWorld:
    """A seeded talking-portrait world: identity ``i`` and record ``(split, index)`` are pure functions of it.

    Args:
        seed: World seed.
        num_frames: Frames per clip.
        size: Frame side in pixels (even; 32 or 64 suit decord if clips are later encoded as video).
        fps: Video frame rate.
        sample_rate: Audio samples per second (a whole multiple of ``fps``).
        n_identities: Identities of the training split.
        n_val_identities: Held-out identities of the validation split.
        n_mels: Mel bands of the per-frame features.
        blink_prob: Probability that a frame shows closed eyes.
    """

    seed: int = 0
    num_frames: int = 16
    size: int = 32
    fps: int = 8
    sample_rate: int = 8000
    n_identities: int = 8
    n_val_identities: int = 2
    n_mels: int = 8
    blink_prob: float = 0.04

    def __post_init__(self) -> None:
        samples_per_frame(self.sample_rate, self.fps, "portrait world")  # rates that do not divide: BadSampleError
        if min(self.num_frames, self.size, self.n_identities, self.n_val_identities) < 1 or self.n_mels < 0:
            raise ValueError(f"portrait world needs positive counts and sizes, got {self}")
        if not 0.0 <= self.blink_prob <= 1.0:
            raise ValueError(f"blink_prob must be in [0, 1], got {self.blink_prob}")

    def _rng(self, *key: object) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random("/".join(map(str, ("mmpo-portrait-world", PORTRAIT_WORLD_VERSION, self.seed, *key))))

    def identity(self, index: int) -> Identity:
        """Identity ``index``: ``0 .. n_identities - 1`` train, the next ``n_val_identities`` held out."""
        return Identity.sample(self._rng("identity", index), f"id-{index:03d}")

    def identities(self) -> list[Identity]:
        return [self.identity(i) for i in range(self.n_identities + self.n_val_identities)]

    def _draw(self, split: str, index: int) -> tuple[dict, np.ndarray]:
        rng = self._rng(split, index)
        which = (
            rng.randrange(self.n_identities)
            if split == "train"
            else self.n_identities + rng.randrange(self.n_val_identities)
        )
        ident = self.identity(which)
        audio, syllables = speech_like_audio(rng, self.num_frames / self.fps, self.sample_rate)
        feats = frame_features(audio, self.sample_rate, self.fps, self.num_frames, self.n_mels, f"{split}-{index:06d}")
        times = np.arange(self.num_frames) / self.fps
        hx = self.size / 2 + _smooth_path(rng, times, 0.05 * self.size)
        hy = self.size * 0.53 + _smooth_path(rng, times, 0.03 * self.size)  # a little low: room for the hair
        tilt = _smooth_path(rng, times, rng.uniform(2.0, 8.0))
        blink = [rng.random() < self.blink_prob for _ in range(self.num_frames)]
        heads = [[round(float(x), 4), round(float(y), 4)] for x, y in zip(hx, hy, strict=True)]
        tilts = [round(float(v), 4) for v in tilt]
        envelope = [round(float(v), 6) for v in feats["envelope"]]
        h = ident.face_frac * self.size
        truth = {
            "mouth_open": envelope,  # the known function: opening fraction = envelope
            "mouth_open_px": [round(v * MAX_OPEN * h, 4) for v in envelope],
            "head": heads,
            "tilt": tilts,
            "blink": blink,
            "landmarks": [face_landmarks(ident, self.size, p, r) for p, r in zip(heads, tilts, strict=True)],
        }
        record_id = f"{split}-{index:06d}"
        record = {
            "id": record_id,
            "frames": [f"frames/{record_id}.png"],
            "audio": f"audio/{record_id}.wav",
            "reference": f"identities/{ident.name}.png",
            "identity": ident.name,
            "kind": _KINDS[split != "train"],
            "num_frames": self.num_frames,
            "fps": self.fps,
            "sample_rate": self.sample_rate,
            "size": self.size,
            "envelope": envelope,
            "mel": np.round(feats["mel"].astype(np.float64), 5).tolist(),
            "syllables": syllables,
            "truth": truth,
        }
        return record, audio

    def record(self, split: str, index: int) -> dict:
        """Record ``index`` of ``split`` in the on-disk format (paths relative to the root)."""
        return self._draw(split, index)[0]

    def audio(self, split: str, index: int) -> np.ndarray:
        """The clip's audio: ``(num_frames · sample_rate / fps,)`` float32 in [-1, 1]."""
        return self._draw(split, index)[1]

    def frames(self, record: Mapping) -> np.ndarray:
        """Render a record's clip from its ``truth``: ``(T, size, size, 3)`` uint8."""
        ident = self.identity(int(record["identity"].split("-")[1]))
        truth = record["truth"]
        return np.stack(
            [
                render_face(ident, self.size, head, tilt, opening, not blink)
                for head, tilt, opening, blink in zip(
                    truth["head"], truth["tilt"], truth["mouth_open"], truth["blink"], strict=True
                )
            ]
        )

    def reference(self, ident: Identity) -> np.ndarray:
        """The identity's reference face: centred, still, mouth closed, eyes open."""
        return render_face(ident, self.size, (self.size / 2, self.size * 0.53))


def _save_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def read_film_strip(path: str | os.PathLike, num_frames: int, where: str = "") -> torch.Tensor:
    """Read a clip written as a film strip: ``(T, H, W, 3)`` uint8.

    Raises:
        BadSampleError: The file is missing or unreadable, or its width is not ``num_frames`` times its height.
    """
    pixels = np.asarray(load_image(str(path), where))  # BadSampleError naming the file when it fails
    height, width = pixels.shape[:2]
    if width != num_frames * height:
        raise BadSampleError(
            f"{where}: film strip {path} is {width}x{height}; {num_frames} square frames "
            f"need {num_frames * height}x{height}"
        )
    return torch.from_numpy(np.ascontiguousarray(pixels.reshape(height, num_frames, height, 3).transpose(1, 0, 2, 3)))


def load_portrait_clip(root: str | os.PathLike, record: Mapping, where: str, n_mels: int = 8) -> dict:
    """Read a record's frames, reference face and audio, and recompute its features from the WAV.

    Args:
        root: The world's directory.
        record: A line of ``train.jsonl`` / ``val.jsonl``.
        where: The record (``val.jsonl:3 (val-000003)``); every error message starts with it.
        n_mels: Mel bands to compute.

    Returns:
        ``frames (T, H, W, 3)`` and ``reference (H, W, 3)`` uint8 tensors, ``audio (N,)``, ``envelope (T,)``
        and ``mel (T, n_mels)`` float32 tensors.

    Raises:
        BadSampleError: A missing or broken file, a WAV whose rate differs from the record's, rates that do not
            divide, or audio shorter than the clip.
    """
    root = Path(root)
    num_frames, fps, rate = int(record["num_frames"]), int(record["fps"]), int(record["sample_rate"])
    wav = root / record["audio"]
    audio, _ = read_wav(wav, where, sample_rate=rate)
    feats = frame_features(audio, rate, fps, num_frames, n_mels, where, wav)
    frames = read_film_strip(root / record["frames"][0], num_frames, where)
    reference = torch.from_numpy(np.asarray(load_image(str(root / record["reference"]), where)).copy())
    return {
        "frames": frames,
        "reference": reference,
        "audio": torch.from_numpy(audio),
        "envelope": torch.from_numpy(feats["envelope"]),
        "mel": torch.from_numpy(feats["mel"]),
    }


def write_portrait_world(
    root: str | os.PathLike,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    num_frames: int = 16,
    size: int = 32,
    fps: int = 8,
    sample_rate: int = 8000,
    n_identities: int = 8,
    n_val_identities: int = 2,
    n_mels: int = 8,
    blink_prob: float = 0.04,
    overwrite: bool = False,
) -> dict:
    """Write the clips, WAVs, reference faces, ``train.jsonl``, ``val.jsonl`` and ``world.json`` under ``root``.

    Idempotent and atomic like the other worlds (`datamodules.worlds.writer.write_world`): equal settings
    reuse the world; ``world.json`` is written last. Arguments are the fields of `PortraitWorld`.

    Returns:
        Summary: paths, counts, per-split kinds (``seen_identity`` / ``held_out_identity``), ``identities``.

    Raises:
        FileExistsError: ``root`` holds a world with other settings and ``overwrite`` is False.
        BadSampleError: ``sample_rate`` is not a whole multiple of ``fps``.
    """
    root = Path(root)
    world = PortraitWorld(seed, num_frames, size, fps, sample_rate, n_identities, n_val_identities, n_mels, blink_prob)
    settings = {"version": PORTRAIT_WORLD_VERSION, "n_train": n_train, "n_val": n_val, **asdict(world)}
    identities = world.identities()
    for ident in identities:
        _save_png(root / "identities" / f"{ident.name}.png", world.reference(ident))

    def write_media(record: dict, path: Path) -> None:
        split, index = record["id"].split("-")
        write_wav(root / record["audio"], world.audio(split, int(index)), sample_rate)
        strip = world.frames(record).transpose(1, 0, 2, 3).reshape(size, num_frames * size, 3)  # (H, T·W, 3)
        _save_png(path, strip)  # last: the writer counts a clip as written once its strip exists

    info = {
        "background": list(BACKGROUND),
        "mouth_color": list(MOUTH_COLOR),
        "max_open": MAX_OPEN,
        "identities": [i.to_dict() for i in identities],
        "vocabulary": [],  # no text in this world
    }
    summary = write_world(
        root,
        settings,
        name="portrait world",
        media_dir="frames",
        suffix=".png",
        make_record=world.record,
        write_media=write_media,
        kinds=_KINDS,
        info=info,
        overwrite=overwrite,
    )
    summary.pop("vocab_size", None)
    return {**summary, "identities": len(identities)}


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: write a portrait world and print its summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m datamodules.worlds.portrait", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="dataset directory")
    defaults = {"n-train": 400, "n-val": 100, "seed": 0, "num-frames": 16, "size": 32, "fps": 8, "sample-rate": 8000}
    for name, default in {**defaults, "n-identities": 8, "n-val-identities": 2, "n-mels": 8}.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--blink-prob", type=float, default=0.04)
    parser.add_argument("--overwrite", action="store_true", help="replace a world with other settings")
    args = vars(parser.parse_args(argv))
    summary = write_portrait_world(args.pop("out"), **args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
