"""Speech-like audio for the talking-portrait world: syllable bursts, WAV files and per-frame features.

A clip's audio is a sequence of *syllables*, voiced harmonic tones (fundamental ``f0`` of 90–240 Hz with
a slow glide, six harmonics at amplitude 1/k) under a rounded burst envelope ``sin(πτ)^0.5``, separated by
short gaps (50–150 ms) and, now and then, longer pauses between "words" (250–600 ms), over a faint noise
floor. Everything is drawn from an explicit `random.Random`, so a seed gives the same samples.

Features are aligned to video frames: frame ``t`` owns the audio samples ``[t·R/fps, (t+1)·R/fps)`` (R the
sample rate, which must be a whole multiple of the frame rate). Per frame:

- ``envelope``: loudness, the window's RMS over `ENVELOPE_FULL_RMS`, clipped to [0, 1];
- ``mel``: ``n_mels`` log10 mel-band powers (HTK mel scale, triangular filters from 50 Hz to R/2) of the
  Hann-windowed power spectra of the window's sub-windows, averaged over the window.

Audio is shorter than the clip, or the rates do not divide: a `BadSampleError` whose message starts with
the record (``where``) and names the file.
"""

from __future__ import annotations

import math
import os
import random
import wave

import numpy as np
import torch

from datamodules.core.atomic import atomic_file
from datamodules.core.records import BadSampleError

__all__ = [
    "ENVELOPE_FULL_RMS",
    "Syllable",
    "frame_features",
    "mel_filterbank",
    "read_wav",
    "samples_per_frame",
    "speech_like_audio",
    "write_wav",
]

ENVELOPE_FULL_RMS = 0.3  # about the RMS of the loudest syllable (amplitude 0.9) at its peak: envelope ~1
_HARMONICS = 6
_NOISE_STD = 0.002

Syllable = tuple[float, float, float, float]  # (start s, end s, f0 Hz, peak amplitude)


def speech_like_audio(rng: random.Random, duration: float, sample_rate: int = 8000) -> tuple[np.ndarray, list]:
    """Draw ``duration`` seconds of syllable bursts and pauses.

    Args:
        rng: The only source of randomness.
        duration: Length in seconds.
        sample_rate: Samples per second.

    Returns:
        ``audio``: ``(round(duration · sample_rate),)`` float32 in [-1, 1], and the syllables as
        ``[start, end, f0, amplitude]`` lists (seconds, Hz, peak amplitude), in time order.
    """
    n = round(duration * sample_rate)
    t_axis = np.arange(n, dtype=np.float64) / sample_rate
    audio = np.zeros(n, dtype=np.float64)
    voice = rng.uniform(90.0, 240.0)  # the speaker's pitch; syllables vary around it
    syllables: list[list[float]] = []
    t = rng.uniform(0.0, 0.3)  # leading silence
    while t < duration:
        length = rng.uniform(0.15, 0.4)
        amp = rng.uniform(0.35, 0.9)
        f0 = voice * rng.uniform(0.9, 1.15)
        glide = rng.uniform(-0.15, 0.1)  # relative pitch change over the syllable (speech falls more often)
        inside = (t_axis >= t) & (t_axis < t + length)
        tau = (t_axis[inside] - t) / length  # 0..1 across the syllable
        freq = f0 * (1.0 + glide * tau)
        phase = 2.0 * math.pi * np.cumsum(freq) / sample_rate  # integrated instantaneous frequency
        tone = sum(np.sin(k * phase + rng.uniform(0, 2 * math.pi)) / k for k in range(1, _HARMONICS + 1))
        norm = sum(1.0 / k for k in range(1, _HARMONICS + 1))
        audio[inside] += amp * np.sin(math.pi * tau) ** 0.5 * tone / norm
        syllables.append([round(t, 6), round(min(t + length, duration), 6), round(f0, 3), round(amp, 6)])
        pause = rng.random() < 0.3
        t += length + (rng.uniform(0.25, 0.6) if pause else rng.uniform(0.05, 0.15))
    noise = np.random.default_rng(rng.getrandbits(63)).normal(0.0, _NOISE_STD, n)
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32), syllables


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM WAV, atomically."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (N,), got shape {audio.shape}")
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with atomic_file(path) as tmp:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(pcm.tobytes())


def read_wav(path: str | os.PathLike, where: str = "", sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a mono 16-bit PCM WAV as float32 in [-1, 1].

    Args:
        path: The WAV file.
        where: The record (e.g. ``train.jsonl:3 (train-000003)``); error messages start with it.
        sample_rate: The rate the record declares; a file with another rate is refused.

    Returns:
        ``(audio (N,), sample_rate)``.

    Raises:
        BadSampleError: Missing or unreadable file, not mono 16-bit, or a rate other than ``sample_rate``.
    """
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise BadSampleError(f"{prefix}audio file not found: {path}")
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, count = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            data = f.readframes(count)
    except (wave.Error, EOFError) as e:
        raise BadSampleError(f"{prefix}cannot read WAV {path}: {e}") from e
    if channels != 1 or width != 2:
        raise BadSampleError(f"{prefix}WAV {path} has {channels} channels of {8 * width} bits; expected mono 16-bit")
    if sample_rate is not None and rate != sample_rate:
        raise BadSampleError(f"{prefix}WAV {path} is sampled at {rate} Hz but the record says {sample_rate} Hz")
    audio = np.frombuffer(data[: 2 * count], dtype="<i2").astype(np.float32) / 32767.0
    return audio, rate


def samples_per_frame(sample_rate: int, fps: int, where: str = "", path: str | os.PathLike = "") -> int:
    """Audio samples per video frame; refuses rates that do not divide (frames would drift from the audio).

    Raises:
        BadSampleError: A non-positive rate, or ``sample_rate`` not a whole multiple of ``fps``.
    """
    prefix = f"{where}: " if where else ""
    what = f"audio {path}" if path else "audio"
    if sample_rate <= 0 or fps <= 0:
        raise BadSampleError(f"{prefix}{what}: rates must be positive, got {sample_rate} Hz and {fps} fps")
    if sample_rate % fps:
        raise BadSampleError(
            f"{prefix}{what}: sample rate {sample_rate} Hz is not a whole multiple of the frame rate {fps} fps, "
            "so frames cannot own whole audio windows"
        )
    return sample_rate // fps


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 50.0) -> torch.Tensor:
    """Triangular filters on the HTK mel scale (mel = 2595·log10(1 + f/700)): ``(n_mels, n_fft // 2 + 1)``."""
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731 - a formula, named once
    mels = torch.linspace(to_mel(f_min), to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)  # (n_mels + 2,) Hz
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def frame_features(
    audio: np.ndarray,
    sample_rate: int,
    fps: int,
    num_frames: int,
    n_mels: int = 8,
    where: str = "",
    path: str | os.PathLike = "",
) -> dict[str, np.ndarray]:
    """Per-frame audio features: ``envelope (T,)`` in [0, 1] and ``mel (T, n_mels)`` log10 powers.

    Args:
        audio: ``(N,)`` float samples in [-1, 1]; samples past the clip's end are ignored.
        sample_rate: Samples per second (a whole multiple of ``fps``).
        fps: Video frames per second.
        num_frames: Frames of the clip (T).
        n_mels: Mel bands (0 for none: ``mel`` is ``(T, 0)``).
        where: The record, for error messages.
        path: The audio file, for error messages.

    Raises:
        BadSampleError: The rates do not divide, or the audio is shorter than the clip.
    """
    spf = samples_per_frame(sample_rate, fps, where, path)
    need = num_frames * spf
    if len(audio) < need:
        prefix = f"{where}: " if where else ""
        raise BadSampleError(
            f"{prefix}audio {path or '(in memory)'} holds {len(audio)} samples ({len(audio) / sample_rate:.3f} s), "
            f"shorter than the clip's {num_frames} frames at {fps} fps ({need} samples, {need / sample_rate:.3f} s)"
        )
    windows = torch.as_tensor(np.asarray(audio[:need], dtype=np.float32)).reshape(num_frames, spf)  # (T, spf)
    envelope = torch.clamp(windows.pow(2).mean(1).sqrt() / ENVELOPE_FULL_RMS, 0.0, 1.0)
    if n_mels <= 0:
        return {"envelope": envelope.numpy(), "mel": np.zeros((num_frames, 0), dtype=np.float32)}
    n_fft = min(256, 2 ** int(math.log2(spf)))  # sub-windows inside the frame's own window
    spec = torch.stft(
        windows, n_fft, hop_length=n_fft // 2, window=torch.hann_window(n_fft), center=False, return_complex=True
    )  # (T, n_fft // 2 + 1, sub-windows)
    power = spec.abs().pow(2).mean(-1) / n_fft  # (T, F)
    mel = torch.log10(power @ mel_filterbank(n_mels, n_fft, sample_rate).T + 1e-8)  # (T, n_mels)
    return {"envelope": envelope.numpy(), "mel": mel.numpy()}
