"""Video I/O for preference data: which frames to sample, decoding them with decord, writing mp4.

`sample_frame_indices` is pure (an explicit `torch.Generator` is its only randomness). `read_video`
runs inside DataLoader workers, so it imports decord lazily, decodes on one thread and turns every
failure (missing file, not a video, truncated or corrupt file, no frames) into a `BadSampleError`
whose message starts with the record's ``where`` and names the file, so that ``on_bad_sample="skip"``
can drop the sample and report it. `write_video` encodes with PyAV (H.264, yuv420p) into a temporary
file that is moved into place, so an interrupted write never leaves a half-written video behind.

How decord 0.6 fails on broken files (checked by the tests): random bytes, an empty file or text
raise ``RuntimeError`` when the reader opens; an mp4 cut inside its header or its frame data raises
``RuntimeError`` or ``decord.DECORDError`` while opening (decord scans every packet then). An mp4
missing only the tail of its last packet opens with all its frames counted, and ``get_batch`` raises
``DECORDError`` for the frames that need the broken packet. All of these become `BadSampleError`.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

import numpy as np
import torch

from datamodules.core.atomic import atomic_file
from datamodules.core.records import BadSampleError

__all__ = ["SamplingStrategy", "read_video", "sample_frame_indices", "write_video"]

SamplingStrategy = Literal["uniform", "fps", "random_segment"]
_STRATEGIES = ("uniform", "fps", "random_segment")
# decord prefixes messages with "[07:01:15] /src/video/video_reader.cc:486: ", sometimes nested.
_DECORD_LOCATION = re.compile(r"^(\[[\d:]+\] \S+:\d+: )+")


def _uniform(length: int, num_samples: int) -> list[int]:
    """Centres of ``num_samples`` equal segments of ``range(length)``: ``((2i + 1) * length) // (2 * num_samples)``.

    Integer arithmetic, so the result is exact. When ``length < num_samples`` neighbouring segments
    share a frame and indices repeat (e.g. 4 frames, 8 samples -> 0, 0, 1, 1, 2, 2, 3, 3).
    """
    return [((2 * i + 1) * length) // (2 * num_samples) for i in range(num_samples)]


def sample_frame_indices(
    num_frames: int,
    num_samples: int,
    strategy: SamplingStrategy = "uniform",
    video_fps: float | None = None,
    target_fps: float | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Choose which frames of a video to decode.

    Strategies:
        - ``"uniform"``: ``num_samples`` indices at the centres of equal segments of the whole video
          (16 frames, 4 samples -> 2, 6, 10, 14). A video shorter than ``num_samples`` frames repeats
          frames rather than failing, so every clip gives exactly ``num_samples`` frames.
        - ``"fps"``: one frame every ``video_fps / target_fps`` frames from the first one (index
          ``floor(k * video_fps / target_fps)``), so the clip keeps real time; at most ``num_samples``
          frames, thinned with ``"uniform"`` picks when there are more. The length varies with the
          video's duration. A ``target_fps`` above ``video_fps`` takes every frame once (no repeats).
        - ``"random_segment"``: training augmentation. A window length ``L`` is drawn uniformly from
          ``[min(num_frames, num_samples), num_frames]``, then a start uniformly from
          ``[0, num_frames - L]``, and the window is covered by ``num_samples`` uniform picks.
          Deterministic given ``generator`` (torch's global generator when None).

    Args:
        num_frames: Frames in the video.
        num_samples: Frames wanted (the exact count for ``uniform`` and ``random_segment``, the
            maximum for ``fps``).
        strategy: One of ``"uniform"``, ``"fps"``, ``"random_segment"``.
        video_fps: The video's frame rate (``fps`` strategy only).
        target_fps: Frames per second of video time to keep (``fps`` strategy only).
        generator: Randomness for ``random_segment``.

    Returns:
        Sorted frame indices in ``[0, num_frames)``.

    Raises:
        ValueError: For a non-positive ``num_frames`` or ``num_samples``, an unknown strategy, or a
            missing or non-positive fps with the ``fps`` strategy.
    """
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if strategy == "uniform":
        return _uniform(num_frames, num_samples)
    if strategy == "fps":
        for name, value in (("video_fps", video_fps), ("target_fps", target_fps)):
            if value is None or not math.isfinite(value) or value <= 0:
                raise ValueError(f"the 'fps' strategy needs a positive {name}, got {value}")
        step = max(1.0, video_fps / target_fps)
        # The epsilon keeps k * step from landing just below an integer (e.g. 29.97 / 2.997 = 9.999...).
        count = math.floor((num_frames - 1) / step + 1e-9) + 1
        indices = [min(num_frames - 1, math.floor(k * step + 1e-9)) for k in range(count)]
        if len(indices) > num_samples:
            indices = [indices[j] for j in _uniform(len(indices), num_samples)]
        return indices
    if strategy == "random_segment":
        shortest = min(num_frames, num_samples)
        length = shortest + int(torch.randint(0, num_frames - shortest + 1, (1,), generator=generator))
        start = int(torch.randint(0, num_frames - length + 1, (1,), generator=generator))
        return [start + i for i in _uniform(length, num_samples)]
    raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {_STRATEGIES}")


def read_video(
    path: str | os.PathLike,
    num_samples: int = 8,
    strategy: SamplingStrategy = "uniform",
    target_fps: float | None = None,
    generator: torch.Generator | None = None,
    where: str = "",
    min_frames: int | None = None,
    max_pixels: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decode sampled frames of a video with decord (CPU, one thread).

    Args:
        path: Video file.
        num_samples: Frames wanted (see `sample_frame_indices`).
        strategy: Frame sampling strategy (see `sample_frame_indices`).
        target_fps: Frames per second kept by the ``fps`` strategy.
        generator: Randomness for the ``random_segment`` strategy.
        where: Where the sample came from (e.g. ``train.jsonl:12``); error messages start with it.
        min_frames: Refuse a video with fewer frames (None: short videos repeat frames).
        max_pixels: Refuse a video whose frames hold more pixels, read from the stream's header (PyAV)
            before decord opens it (None: no cap).

    Returns:
        ``frames``: ``(N, H, W, 3)`` uint8 RGB, and metadata ``{"path", "indices", "fps",
        "num_frames", "duration", "height", "width"}`` (``fps`` and ``num_frames`` of the whole
        video, ``duration`` in seconds).

    Raises:
        BadSampleError: The file is missing or cannot be decoded, or it breaks ``min_frames`` or
            ``max_pixels`` (message: ``"<where>: ... <path> ..."``).
        ValueError: Bad sampling arguments (a caller's mistake, not the sample's).
    """
    path = str(path)
    prefix = f"{where}: " if where else ""
    if not os.path.isfile(path):
        raise BadSampleError(f"{prefix}video file not found: {path}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {_STRATEGIES}")
    if max_pixels is not None:
        _check_resolution(path, max_pixels, prefix)
    import decord  # lazily: decord starts native threads, so import it in the worker that uses it

    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        fps = float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError, ValueError) as e:
        raise BadSampleError(f"{prefix}cannot open video {path}: {_first_line(e)}") from e
    if total <= 0:
        raise BadSampleError(f"{prefix}video {path} has no frames")
    if min_frames is not None and total < min_frames:
        raise BadSampleError(f"{prefix}video {path} has {total} frames, fewer than frames.min_frames={min_frames}")
    if strategy == "fps" and not (math.isfinite(fps) and fps > 0):
        raise BadSampleError(f"{prefix}video {path} reports no frame rate ({fps}), needed by the 'fps' strategy")
    indices = sample_frame_indices(total, num_samples, strategy, fps, target_fps, generator)
    try:
        # The reader counted the frames whose packets it could read, so every index exists; a frame
        # that still fails to decode raises here. `asnumpy` rather than decord's torch bridge, which
        # is process-wide state.
        frames = reader.get_batch(indices).asnumpy()
    except (decord.DECORDError, RuntimeError, IndexError, ValueError) as e:
        raise BadSampleError(f"{prefix}cannot decode frames {indices} of video {path}: {_first_line(e)}") from e
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise BadSampleError(
            f"{prefix}video {path} decoded to shape {frames.shape}, expected ({len(indices)}, H, W, 3)"
        )
    meta = {
        "path": path,
        "indices": indices,
        "fps": fps,
        "num_frames": total,
        "duration": total / fps if fps > 0 else float("nan"),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
    }
    return torch.from_numpy(np.ascontiguousarray(frames)), meta


def _check_resolution(path: str, max_pixels: int, prefix: str) -> None:
    """Refuse a video whose frames exceed ``max_pixels``, from its stream header (nothing decoded)."""
    try:
        import av
    except ImportError as e:
        raise ImportError("frames.max_pixels reads video headers with PyAV: pip install av") from e
    try:
        with av.open(path) as container:
            streams = container.streams.video
            if not streams:
                raise BadSampleError(f"{prefix}{path} holds no video stream")
            width, height = streams[0].codec_context.width, streams[0].codec_context.height
    except av.error.FFmpegError as e:
        raise BadSampleError(f"{prefix}cannot open video {path}: {e}") from e
    if width * height > max_pixels:
        raise BadSampleError(
            f"{prefix}video {path} is {width}x{height} ({width * height} pixels a frame), over "
            f"frames.max_pixels={max_pixels}: refused before decoding"
        )


def _first_line(e: BaseException) -> str:
    """decord's messages start with a time and a C++ source location and end with a stack trace."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return _DECORD_LOCATION.sub("", lines[0]) if lines else type(e).__name__


def _pick_codec(av: Any) -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises different types across versions
            continue
    raise RuntimeError("PyAV has neither the libx264 nor the mpeg4 encoder")


def write_video(path: str | os.PathLike, frames: np.ndarray | torch.Tensor, fps: int = 8) -> None:
    """Encode RGB frames as a video (H.264 yuv420p with PyAV, mpeg4 if libx264 is missing).

    H.264 is encoded near-losslessly (CRF 10) on one thread without macroblock-tree rate control, so
    the same frames give the same bytes.
    The file is written under a temporary name in the same directory and moved into place; the moov
    header goes at the front (``faststart``) so readers can stream it.

    Args:
        path: Output file; the container follows the suffix (``.mp4``).
        frames: ``(N, H, W, 3)`` uint8 RGB with ``N >= 1`` and even ``H`` and ``W`` (yuv420p halves
            the chroma resolution).
        fps: Frame rate.

    Raises:
        ValueError: Frames of the wrong shape, dtype or size, or a non-positive fps.
        ImportError: PyAV is not installed (``pip install av``).
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 of shape (N>=1, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {height}x{width}")
    if int(fps) != fps or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    try:
        import av
    except ImportError as e:
        raise ImportError("writing videos needs PyAV: pip install av") from e

    codec = _pick_codec(av)
    with atomic_file(path) as tmp:
        container = av.open(str(tmp), "w", options={"movflags": "faststart"})
        try:
            stream = container.add_stream(codec, rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            # x264's macroblock-tree rate control is not reproducible here (about 1 encode in 10 differed,
            # decoded pixels by up to 6); without it 1000 of 1000 encodes were identical.
            stream.options = {"crf": "10", "x264-params": "mbtree=0"} if codec == "libx264" else {"qscale": "2"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder's delayed frames
        finally:
            container.close()
