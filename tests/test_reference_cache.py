"""Cached reference log-probs: same training as a live reference, invalidated by data or model changes."""

import json
import shutil

import lightning as L
import pytest
import torch
from helpers.trainers import quiet_trainer

from datamodules import ImagePreferenceDataModule
from mmpo.backbones import LoraSettings, VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule
from mmpo.reference.cache import ReferenceCache, model_fingerprint


class _Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(world, model_path, root, reference, lora=True, steps=3):
    torch.manual_seed(0)
    bb = VisionLanguageBackbone(str(model_path), lora=LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None)
    module = PreferenceModule(bb, DPOLoss(beta=0.1), reference=reference, reference_cache_dir=str(root / "cache"))
    dm = ImagePreferenceDataModule(
        str(model_path),
        train_file=str(world / "train.jsonl"),
        val_file=str(world / "val.jsonl"),
        loader={"batch_size": 4},
    )
    rec = _Record()
    trainer = quiet_trainer(
        max_steps=steps,
        limit_val_batches=1,
        val_check_interval=steps,
        num_sanity_val_steps=0,
        callbacks=[rec],
        default_root_dir=str(root),
    )
    trainer.fit(module, datamodule=dm)
    return rec.losses, trainer.callback_metrics, sorted((root / "cache").glob("*.safetensors"))


@pytest.mark.parametrize(("lora", "live"), [(True, "adapter"), (False, "copy")])
def test_cached_reference_trains_exactly_like_a_live_one(world, tiny_llava, tmp_path, lora, live):
    cached_losses, cached_metrics, files = _run(world, tiny_llava, tmp_path / "c", "cached", lora)
    live_losses, live_metrics, _ = _run(world, tiny_llava, tmp_path / "l", live, lora)
    assert [f.name.split("-")[0] for f in files] == ["train", "val"]
    assert len(cached_losses) == 3
    torch.testing.assert_close(torch.tensor(cached_losses), torch.tensor(live_losses), atol=1e-5, rtol=1e-5)
    for key in ("val/rewards/margins", "val/rewards/chosen"):
        torch.testing.assert_close(cached_metrics[key], live_metrics[key], atol=1e-5, rtol=1e-4)


def test_cache_is_reused_and_invalidated_by_data_or_model_changes(world, tiny_llava, tmp_path):
    _, _, first = _run(world, tiny_llava, tmp_path, "cached", steps=1)
    stamp = {f: f.stat().st_mtime_ns for f in first}
    _, _, again = _run(world, tiny_llava, tmp_path, "cached", steps=1)
    assert again == first and all(f.stat().st_mtime_ns == stamp[f] for f in again)  # reused, not recomputed

    changed = tmp_path / "world2"
    shutil.copytree(world, changed)
    rows = [json.loads(line) for line in (changed / "train.jsonl").read_text().splitlines()]
    rows[0]["chosen"] = rows[0]["chosen"] + " yes ."
    (changed / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, _, after_data = _run(changed, tiny_llava, tmp_path, "cached", steps=1)
    new_train = [f for f in after_data if f.name.startswith("train") and f not in first]
    assert len(new_train) == 1  # the training data changed; validation did not
    assert not [f for f in after_data if f.name.startswith("val") and f not in first]

    other_model = tmp_path / "model2"
    shutil.copytree(tiny_llava, other_model)
    (other_model / "config.json").write_text((other_model / "config.json").read_text().replace("}", " }", 1))
    assert model_fingerprint(str(other_model)) != model_fingerprint(str(tiny_llava))


def test_stale_cache_token_counts_are_refused():
    cache = ReferenceCache([[torch.zeros(3), torch.zeros(2)]], ["a"])
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, 1:5] = True
    with pytest.raises(ValueError, match="holds 2 tokens .* now has 4"):
        cache.token_logps(["a"], mask)
    with pytest.raises(KeyError, match="not in the reference cache"):
        cache.token_logps(["b"], mask)


def test_host_lengths_place_cached_values_like_the_mask():
    cache = ReferenceCache([[torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0])]], ["a"])
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 4:6] = True
    by_mask = cache.token_logps(["a"], mask)
    by_lengths = cache.token_logps(["a"], mask, host_lengths=((2, 4), (3, 2)))
    assert torch.equal(by_mask, by_lengths)
    assert by_lengths[0, 2:5].tolist() == [1.0, 2.0, 3.0] and by_lengths[1, 4:6].tolist() == [4.0, 5.0]
    with pytest.raises(ValueError, match="holds 2 tokens .* now has 3"):
        cache.token_logps(["a"], mask, host_lengths=((2, 4), (3, 3)))


def test_round_trip_on_disk(tmp_path):
    cache = ReferenceCache(
        [[torch.tensor([-1.0, -2.0]), torch.tensor([-4.0])], [torch.tensor([-3.0]), torch.tensor([-4.0])]], ["x", "y"]
    )
    cache.save(tmp_path / "c.safetensors")
    back = ReferenceCache.load(tmp_path / "c.safetensors")
    mask = torch.tensor([[True, True], [True, False], [True, False], [True, False]])
    got = back.token_logps(["x", "y"], mask)
    assert got.tolist() == [[-1.0, -2.0], [-3.0, 0.0], [-4.0, 0.0], [-4.0, 0.0]]


def test_fingerprint_covers_in_memory_images():
    from PIL import Image

    from datamodules import PreferenceRecord
    from mmpo.reference.cache import data_fingerprint

    def rec(color):
        return PreferenceRecord("a", "x", [], "c", "r", images=[Image.new("RGB", (4, 4), color)])

    same = data_fingerprint([rec((1, 2, 3))], {}) == data_fingerprint([rec((1, 2, 3))], {})
    assert same and data_fingerprint([rec((1, 2, 3))], {}) != data_fingerprint([rec((1, 2, 4))], {})
