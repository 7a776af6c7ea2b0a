"""Building a diffusion config's run through the CLI on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def diffusion_config_cli(config: str, tiny: Path, train_file: Path, monkeypatch):
    """``configs/diffusion/<config>`` built by ``MMPOCLI`` (not run) with loading pointed at ``tiny``, training on
    ``train_file`` at 32 px without loader workers, on the CPU."""
    from mmpo.backbones import DiffusionBackbone
    from mmpo.backbones.diffusion_model import load_diffusion_model
    from mmpo.cli import MMPOCLI

    monkeypatch.setattr(
        DiffusionBackbone, "load_pretrained", lambda self, *args: load_diffusion_model(str(tiny), None, self.dtype)
    )
    args = ["--config", str(REPO / "configs" / "diffusion" / config), "--trainer.accelerator=cpu"]
    args += [
        "--trainer.devices=1",
        f"--data.init_args.train_file={train_file}",
        "--data.init_args.resolution=32",
        "--data.init_args.loader.num_workers=0",
    ]
    return MMPOCLI(args=args, run=False)


def tiny_run_args(tiny: Path, tmp_path: Path) -> list[str]:
    """The CLI overrides that run a diffusion config's header command for one CPU step on ``tiny``, at 32 px,
    saving under ``tmp_path / "out"``."""
    return [
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny}",
        f"--model.init_args.save_dir={tmp_path / 'out'}",
        "--data.init_args.resolution=32",
        "--data.init_args.loader.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]


def strip_datamodule(train_file: Path, batch_size: int = 4, **kwargs):
    """A set-up datamodule over ``train_file``'s 32 x 64 images (film strips of two frames), in file order."""
    from datamodules.diffusion.module import DiffusionPreferenceDataModule

    dm = DiffusionPreferenceDataModule(
        train_file=str(train_file), resolution=[32, 64], center_crop=True, random_flip=False,
        loader={"batch_size": batch_size, "shuffle": False}, **kwargs,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def write_video_pairs(
    root: Path, n: int = 8, frames: int = 9, size: int = 32, seed: int = 0, strips: bool = False, dimensions=None
) -> Path:
    """``n`` video-world pairs under ``root`` (``train.jsonl``): the caption's clip preferred to the same clip
    played backwards (every object moving against its caption), as mp4 files or, with ``strips``, as PNG film
    strips of the frames side by side. ``dimensions``: names given to the records in turn (TLPO)."""
    import json
    import random

    from PIL import Image

    from datamodules.vision_text.video_io import write_video
    from datamodules.worlds.video import caption_for, render_clip, sample_clip

    root.mkdir(parents=True, exist_ok=True)
    rng, lines = random.Random(seed), []
    for i in range(n):
        objects = sample_clip(rng, num_frames=frames, size=size, max_objects=1)
        clip = render_clip(objects, frames, size)  # (F, H, W, 3) uint8
        names = []
        for tag, frames_of in (("good", clip), ("bad", clip[::-1])):
            if strips:
                names.append(f"{i:03d}_{tag}.png")
                Image.fromarray(frames_of.transpose(1, 0, 2, 3).reshape(size, -1, 3)).save(root / names[-1])
            else:
                names.append(f"{i:03d}_{tag}.mp4")
                write_video(root / names[-1], frames_of, fps=8)
        record = {"id": f"v{i}", "caption": caption_for(objects), "image_0": names[0], "image_1": names[1]}
        record["label_0"] = 1.0
        if dimensions:
            record["dimension"] = dimensions[i % len(dimensions)]
        lines.append(json.dumps(record))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_trajectory_pairs(tiny: Path, root: Path, n: int = 2, steps: int = 4) -> Path:
    """``n`` D3PO trajectory pairs sampled from the tiny SD 1.5 ``tiny`` (``steps`` steps, eta 1, guidance 3),
    written under ``root`` with scores that prefer trajectory 0; returns the JSONL file."""
    from datamodules.diffusion.trajectories import write_trajectory_pairs
    from mmpo.backbones import DiffusionBackbone
    from mmpo.backbones.diffusion_trajectory import sample_trajectory_pairs

    backbone = DiffusionBackbone(str(tiny))
    captions = [("a red circle .", "a blue square .")[i % 2] for i in range(n)]
    sampled = sample_trajectory_pairs(backbone, backbone.build(), captions, list(range(n)), steps, 1.0, 3.0)
    return write_trajectory_pairs(root, captions, sampled, [(1.0, 0.0)] * n, eta=1.0, guidance_scale=3.0)
