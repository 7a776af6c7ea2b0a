"""Atomic checkpoints, non-finite losses and gradients, decompression bombs, and a fuzz of bad records."""

import json
import random

import lightning as L
import pytest
import torch
from helpers.trainers import quiet_trainer
from PIL import Image

from datamodules import BadSampleError, ImagePreferenceDataModule, load_image
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.checkpoint_io import AtomicCheckpointIO
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    before = target.read_bytes()

    import lightning.fabric.plugins.io.torch_io as torch_io

    def crash(obj, path):  # writes half a file, then dies
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch_io, "_atomic_save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
    assert torch.load(target, weights_only=True)["step"] == 1


def _trainer(tmp_path, steps=3, callbacks=()):
    return quiet_trainer(
        max_steps=steps, limit_val_batches=0, callbacks=list(callbacks), default_root_dir=str(tmp_path)
    )


def _setup(world, tiny_llava, on_nonfinite):
    backbone = VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = PreferenceModule(backbone, DPOLoss(), on_nonfinite=on_nonfinite)
    dm = ImagePreferenceDataModule(str(tiny_llava), train_file=str(world / "train.jsonl"), loader={"batch_size": 4})
    return module, dm


def _nan_on_second_call(module):
    compute, calls = module.compute, []

    def poisoned(batch, split="train"):
        out, policy, ref = compute(batch, split)
        calls.append(batch.ids)
        if len(calls) == 2:
            out.losses = out.losses * float("nan")
        return out, policy, ref

    module.compute = poisoned
    return calls


def test_nonfinite_loss_stops_with_the_record_ids(world, tiny_llava, tmp_path):
    module, dm = _setup(world, tiny_llava, "stop")
    calls = _nan_on_second_call(module)
    with pytest.raises(FloatingPointError, match="non-finite train loss") as err:
        _trainer(tmp_path).fit(module, datamodule=dm)
    assert str(calls[1]) in str(err.value)


def test_nonfinite_loss_skips_the_step_when_asked(world, tiny_llava, tmp_path):
    module, dm = _setup(world, tiny_llava, "skip")
    _nan_on_second_call(module)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    trainer = _trainer(tmp_path, steps=3, callbacks=[Snap()])
    with pytest.warns(UserWarning, match="skipping an optimizer step"):
        trainer.fit(module, datamodule=dm)
    assert trainer.callback_metrics["train/nonfinite_steps"] == 1
    assert all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in snapshots[0])  # the NaN step changed nothing
    assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[0])  # training went on
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_nonfinite_gradient_is_skipped_or_stops(world, tiny_llava, tmp_path):
    for mode in ("skip", "stop"):
        module, dm = _setup(world, tiny_llava, mode)
        snapshots = []

        class Poison(L.Callback):
            def __init__(self, snapshots):
                self.snapshots = snapshots

            def on_train_start(self, trainer, pl_module):
                self.snapshots.append(_trainable(pl_module))

            def on_after_backward(self, trainer, pl_module):
                if trainer.global_step == 0:
                    next(p for n, p in pl_module.named_parameters() if "lora_A" in n).grad[0, 0] = float("inf")

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.snapshots.append(_trainable(pl_module))

        trainer = _trainer(tmp_path / mode, steps=2, callbacks=[Poison(snapshots)])
        if mode == "stop":
            with pytest.raises(FloatingPointError, match="non-finite gradient on records"):
                trainer.fit(module, datamodule=dm)
            assert len(snapshots) == 1  # stopped inside the first step, before its optimizer step
            assert all(torch.equal(p, snapshots[0][n]) for n, p in _trainable(module).items())
        else:
            with pytest.warns(UserWarning, match="non-finite gradient"):
                trainer.fit(module, datamodule=dm)
            assert trainer.callback_metrics["train/nonfinite_steps"] == 1
            start, after_poisoned, after_next = snapshots
            assert all(torch.equal(after_poisoned[n], start[n]) for n in start)  # the whole step was dropped
            assert any(not torch.equal(after_next[n], after_poisoned[n]) for n in start)  # the next one trained


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (12, 12), (1, 2, 3)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 px: PIL alone would only warn
    with pytest.raises(BadSampleError, match="rec:3: cannot decode image .*big.png"):
        load_image(str(tmp_path / "big.png"), "rec:3")


def test_loading_images_keeps_one_time_warnings_one_time(tmp_path):
    # Changing the warning filters per image would reset Python's once-per-location registry, so
    # every library's one-time warnings would come back at each batch.
    import warnings

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")

    def warn_once():
        warnings.warn("a one-time notice", UserWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            warn_once()
            load_image(str(tmp_path / "a.png"), "rec:0")
    assert len([w for w in caught if "one-time notice" in str(w.message)]) == 1


def _garbage_records(rng: random.Random, root, n: int) -> tuple[list[str], list[str]]:
    """n lines, each broken in one of many ways or good; returns the lines and the ids of the good ones."""
    good_img = "good.png"
    noise = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(root / good_img)  # noise: the compressed pixels fill the file
    lines, good = [], []
    for i in range(n):
        kind = rng.randrange(12)
        rec = {"id": f"r{i}", "images": [good_img], "prompt": "describe the image .", "chosen": "a red square .",
               "rejected": "a blue circle ."}  # fmt: skip
        if kind == 0:  # random bytes as the image
            (root / f"rand{i}.png").write_bytes(rng.randbytes(rng.randrange(1, 2000)))
            rec["images"] = [f"rand{i}.png"]
        elif kind == 1:  # a truncated PNG
            data = (root / good_img).read_bytes()
            (root / f"cut{i}.png").write_bytes(data[: rng.randrange(8, len(data) // 2)])  # cut inside the pixel data
            rec["images"] = [f"cut{i}.png"]
        elif kind == 2:
            rec["chosen"] = rng.choice([None, 3, [], {"x": 1}, ""])
        elif kind == 3:
            rec["prompt"] = "describe " * 20_000  # a huge prompt: longer than max_length
        elif kind == 4:
            rec["images"] = ["../../outside.png"]
        elif kind == 5:
            rec["images"] = [good_img, good_img]  # two images, no placeholders: both go first, fine
            good.append(rec["id"])
        elif kind == 6:
            lines.append(rng.randbytes(rng.randrange(1, 80)).decode("latin-1").replace("\n", " "))
            continue
        elif kind == 7:
            rec["prompt"] = "<image> <image> <image> too many"
        elif kind == 8:
            rec["images"] = 42
        elif kind == 9:
            rec["rejected"] = "   "
        else:
            good.append(rec["id"])
        lines.append(json.dumps(rec))
    return lines, good


def test_fuzzed_records_never_crash_skip_mode_and_every_bad_one_is_counted(tiny_llava, tmp_path):
    rng = random.Random(0)
    lines, good = _garbage_records(rng, tmp_path, 240)
    (tmp_path / "fuzz.jsonl").write_text("\n".join(lines) + "\n")
    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(tmp_path / "fuzz.jsonl"), max_length=256,
        on_bad_sample="skip", loader={"batch_size": 16, "shuffle": False},
    )  # fmt: skip
    dm.setup("fit")
    rejected_at_load = len(dm.problems["train"])
    served, skipped = [], 0
    for batch in dm.train_dataloader():
        served += batch.ids
        skipped += batch.skipped
        # every served pair is whole: two rows, each with its response tokens, and its own images
        assert batch.input_ids.shape[0] == 2 * batch.num_pairs == 2 * len(batch.ids)
        assert (batch.response_mask.sum(-1) > 0).all()
    assert served == good  # exactly the good records, in file order (shuffle=False)
    assert rejected_at_load + skipped == len(lines) - len(good)
    assert rejected_at_load > 0 and skipped > 0  # both stages saw bad records


def test_malformed_yaml_config_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: 2\n  devices: [1\nmodel: {\n")
    out = subprocess.run(
        [sys.executable, "-m", "mmpo.cli", "fit", "--config", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert "bad.yaml" in out.stderr and "Traceback" not in out.stderr


def test_fuzzed_videos_are_counted_not_fatal(tmp_path):
    import numpy as np

    from datamodules import PreferenceDataset, VisionPreferenceCollator, load_preference_records, write_video
    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    rng = random.Random(1)
    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    frames[:, 8:24, 8:24] = (200, 30, 30)
    write_video(tmp_path / "good.mp4", frames)
    data = (tmp_path / "good.mp4").read_bytes()
    rows, good = [], 0
    for i in range(40):
        kind = i % 4
        name = "good.mp4"
        if kind == 1:
            name = f"rand{i}.mp4"
            (tmp_path / name).write_bytes(rng.randbytes(rng.randrange(1, 4000)))
        elif kind == 2:
            name = f"cut{i}.mp4"
            (tmp_path / name).write_bytes(data[: rng.randrange(16, len(data) // 2)])
        else:
            good += 1
        rows.append(
            {"id": f"v{i}", "videos": [name], "prompt": "describe the image .", "chosen": "a .", "rejected": "b ."}
        )
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model = build_tiny_llava(tmp_path / "m", vocabulary(), image_size=32, video=True)
    from transformers import AutoProcessor

    records, problems = load_preference_records(tmp_path / "v.jsonl", on_bad_sample="skip")
    ds = PreferenceDataset(records, "skip", num_frames=4)
    collate = VisionPreferenceCollator(AutoProcessor.from_pretrained(model), on_bad_sample="skip")
    served = skipped = 0
    for start in range(0, len(ds), 8):
        batch = collate([ds[i] for i in range(start, min(start + 8, len(ds)))])
        served += batch.num_pairs
        skipped += batch.skipped
    assert not problems and served == good and skipped == len(rows) - good


class _Payload:
    """Unpickling this runs code: it would create the file named in `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resuming_never_unpickles_code_from_a_checkpoint(world, tiny_llava, tmp_path):
    from mmpo.cli import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, evil)
    args = [
        "fit", "--config", "configs/quickstart.yaml", "--trainer.logger=false", "--model.init_args.save_dir=null",
        f"--model.init_args.backbone.init_args.model_name_or_path={tiny_llava}",
        f"--data.init_args.processor={tiny_llava}", f"--data.init_args.train_file={world}/train.jsonl",
        "--data.init_args.val_file=null", f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={evil}",
    ]  # fmt: skip
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        main(args)
    assert not marker.exists()
