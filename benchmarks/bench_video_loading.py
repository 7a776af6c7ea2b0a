"""Video loading throughput: clips/s and frames/s through the datamodule's dataset, 0 and 2 workers.

    .venv/bin/python benchmarks/bench_video_loading.py --clips 64 --size 224 --frames 16 --num-frames 8

Writes a synthetic video world (real mp4 files, H.264), then times two things per worker count:
``decode`` (decord reads and frame sampling inside the workers, no processor) and ``collate`` (the
same plus the model's processor and tokenisation, i.e. exactly what a training step waits for).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records
from datamodules.worlds.video import vocabulary, write_video_world


def _first(items):
    return items


def _time(loader: DataLoader) -> tuple[float, int]:
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += len(batch) if isinstance(batch, list) else batch.num_pairs
    return time.perf_counter() - start, clips


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--size", type=int, default=224, help="frame side in pixels (even)")
    ap.add_argument("--frames", type=int, default=16, help="frames per clip on disk")
    ap.add_argument("--num-frames", type=int, default=8, help="frames sampled per clip")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--workdir", default="runs/bench-video")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from mmpo.tiny.llava import build_tiny_llava

    root = Path(args.workdir)
    world = write_video_world(root / "world", n_train=args.clips, n_val=1, num_frames=args.frames, size=args.size)
    model = build_tiny_llava(root / "model", vocabulary(), image_size=32, video=True)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    records, _ = load_preference_records(world["train"])
    dataset = PreferenceDataset(records, num_frames=args.num_frames)
    rows = []
    for workers in args.workers:
        for mode, collate in (("decode", _first), ("collate", VisionPreferenceCollator(processor))):
            loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=collate)
            _time(loader)  # warm-up: worker start, file cache
            seconds, clips = _time(loader)
            rows.append(
                {
                    "workers": workers,
                    "mode": mode,
                    "clips_per_s": clips / seconds,
                    "frames_per_s": clips * args.num_frames / seconds,
                    "seconds": seconds,
                }
            )
    print(
        f"{args.clips} clips of {args.frames} frames at {args.size}x{args.size}, {args.num_frames} sampled per clip, "
        f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'workers':>8}  {'mode':<8}{'clips/s':>10}{'frames/s':>11}")
    for r in rows:
        print(f"{r['workers']:>8}  {r['mode']:<8}{r['clips_per_s']:>10.1f}{r['frames_per_s']:>11.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
