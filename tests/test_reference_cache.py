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
from mmpo.reference import CachedReference
from mmpo.reference.cache import ReferenceCache, model_fingerprint


class _Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(world, model_path, root, reference, lora=True, steps=3, processor=None, dtype="float32"):
    """Train ``steps`` steps; the processor is the model's unless ``processor`` names another directory."""
    torch.manual_seed(0)
    lora_settings = LoraSettings(r=4, alpha=8, dropout=0.0) if lora else None
    bb = VisionLanguageBackbone(str(model_path), lora=lora_settings, dtype=dtype)
    module = PreferenceModule(bb, DPOLoss(beta=0.1), reference=reference, reference_cache_dir=str(root / "cache"))
    dm = ImagePreferenceDataModule(
        str(processor or model_path),
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


def _parts(path):
    """A cache file's name as (split, model fingerprint, data fingerprint)."""
    split, model_fp, data_fp = path.stem.split("-")
    return split, model_fp, data_fp


def _cached(path) -> dict[str, list[torch.Tensor]]:
    cache = ReferenceCache.load(path)
    return {rid: cache.responses[cache.index[rid]] for rid in cache.ids}


def _direct(model_path, processor, world, split="train") -> dict[str, list[torch.Tensor]]:
    """Every record's response-token log-probs under the float32 model as loaded, from its full logits, by id."""
    model = VisionLanguageBackbone(str(model_path)).build().eval()
    dm = ImagePreferenceDataModule(
        str(processor),
        train_file=str(world / "train.jsonl"),
        val_file=str(world / "val.jsonl"),
        loader={"batch_size": 16, "shuffle": False},
    )
    dm.setup("fit")
    out = {}
    for batch in dm.train_dataloader() if split == "train" else dm.val_dataloader():
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.row_media()}
        with torch.no_grad():
            logits = model(**inputs).logits
        logps = logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (N, T - 1)
        mask = batch.response_mask[:, 1:]  # logps[:, t] is the log-prob of token t + 1
        b = batch.num_groups
        for i, rid in enumerate(batch.ids):
            out[rid] = [logps[k * b + i][mask[k * b + i]] for k in range(batch.group_size)]
    return out


def _assert_same_logps(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for rid in want:
        for a, b in zip(got[rid], want[rid], strict=True):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def _max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for rid in a for x, y in zip(a[rid], b[rid], strict=True))


def _perturb_language_model(model_dir, seed=1):
    """Overwrite the checkpoint's language-model weights in place with slightly different ones."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = model_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if name.startswith("language_model.") and t.is_floating_point():
            tensors[name] = t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, str(path), metadata=metadata)


def test_cache_is_reused_and_invalidated_by_a_data_change(world, tiny_llava, tmp_path):
    _, _, first = _run(world, tiny_llava, tmp_path, "cached", steps=1)
    assert [_parts(f)[0] for f in first] == ["train", "val"]
    stamp = {f: f.stat().st_mtime_ns for f in first}
    _, _, again = _run(world, tiny_llava, tmp_path, "cached", steps=1)
    assert again == first and all(f.stat().st_mtime_ns == stamp[f] for f in again)  # reused, not recomputed

    changed = tmp_path / "world2"
    shutil.copytree(world, changed)
    rows = [json.loads(line) for line in (changed / "train.jsonl").read_text().splitlines()]
    rows[0]["chosen"] = rows[0]["chosen"] + " yes ."
    (changed / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, _, after_data = _run(changed, tiny_llava, tmp_path, "cached", steps=1)
    (new_train,) = [f for f in after_data if f not in first]  # the training data changed; validation did not
    old_train = first[0]
    assert _parts(new_train)[:2] == _parts(old_train)[:2] and _parts(new_train)[2] != _parts(old_train)[2]
    # the new file holds the new chosen response (two tokens longer), and the same values for the other records
    old, new = _cached(old_train), _cached(new_train)
    edited = rows[0]["id"]
    assert len(new[edited][0]) == len(old[edited][0]) + 2
    torch.testing.assert_close(new[edited][1], old[edited][1])
    _assert_same_logps({k: v for k, v in new.items() if k != edited}, {k: v for k, v in old.items() if k != edited})


def test_a_model_changed_in_place_gets_a_new_cache_with_its_own_log_probs(world, tiny_llava, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    # a copy of a checkpoint is the same model: the cache of the original serves it
    assert model_fingerprint(str(model)) == model_fingerprint(str(tiny_llava))
    _, _, first = _run(world, model, tmp_path, "cached", steps=1, processor=tiny_llava)
    stamp = {f: f.stat().st_mtime_ns for f in first}
    _perturb_language_model(model)  # e.g. the checkpoint retrained and saved under the same name
    _, _, both = _run(world, model, tmp_path, "cached", steps=1, processor=tiny_llava)
    new = [f for f in both if f not in first]
    assert [_parts(f)[0] for f in new] == ["train", "val"]
    for old_file, new_file in zip(first, new, strict=True):
        (split, old_model, old_data), (new_split, new_model, new_data) = _parts(old_file), _parts(new_file)
        assert (new_split, new_data) == (split, old_data) and new_model != old_model  # same data, another model
        assert old_file.stat().st_mtime_ns == stamp[old_file]  # the old cache is left as it was
    # what is read back is the changed model's log-probs, not the old ones
    direct = _direct(model, tiny_llava, world)
    _assert_same_logps(_cached(new[0]), direct)
    assert _max_difference(_cached(first[0]), direct) > 0.05
    _assert_same_logps(_cached(first[0]), _direct(tiny_llava, tiny_llava, world))


def _adapter_checkpoint(base, out, seed):
    """A PEFT LoRA adapter over ``base``, saved as peft saves one (``adapter_config.json`` names the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"])
    )
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # a trained adapter, not peft's zero start
    model.save_pretrained(out)
    return out


def test_an_adapter_checkpoint_fingerprint_covers_its_base_model(tiny_llava, tmp_path):
    # a PEFT adapter directory loads as a model (transformers reads the base it names); its cached reference
    # depends on that base's weights, so they must be part of the model's identity
    base = tmp_path / "base"
    shutil.copytree(tiny_llava, base)
    adapter = _adapter_checkpoint(base, tmp_path / "adapter", seed=0)
    before = model_fingerprint(str(adapter))
    _perturb_language_model(base)
    assert model_fingerprint(str(adapter)) != before


class _TrainedAdapterCache(CachedReference):
    """The cached reference, computed while the policy's LoRA adapter is far from its zero start."""

    def prepare(self, module, splits):
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for name, p in module.policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g))
        super().prepare(module, splits)


@pytest.fixture(scope="module")
def plain_cache(world, tiny_llava, tmp_path_factory):
    """The cache files of a float32 LoRA run on the tiny model, and the validation split's log-probs computed here."""
    _, _, files = _run(world, tiny_llava, tmp_path_factory.mktemp("plain"), "cached", steps=1)
    return files, _direct(tiny_llava, tiny_llava, world, "val")


def test_the_adapter_never_enters_the_cached_reference(world, tiny_llava, tmp_path, plain_cache):
    # the reference of a LoRA policy is its base model: whatever the adapter holds when the cache is computed
    # (e.g. a resumed run whose cache was deleted), the file name and the log-probs are the base model's
    plain, base = plain_cache
    _, _, trained = _run(world, tiny_llava, tmp_path, _TrainedAdapterCache(str(tmp_path / "cache")), steps=1)
    assert [f.name for f in trained] == [f.name for f in plain]
    _assert_same_logps(_cached(trained[1]), base)


def test_the_dtype_is_part_of_the_model_fingerprint(world, tiny_llava, tmp_path, plain_cache):
    fp32, exact = plain_cache
    _, _, bf16 = _run(world, tiny_llava, tmp_path, "cached", steps=1, dtype="bfloat16")
    assert [_parts(f)[0] for f in bf16] == ["train", "val"]
    assert all(_parts(a)[1] != _parts(b)[1] and _parts(a)[2] == _parts(b)[2] for a, b in zip(fp32, bf16, strict=True))
    # each file holds its own dtype's log-probs: the float32 model's exactly, the bfloat16 model's within its
    # rounding (a few thousandths here), so the bfloat16 run computed them rather than read float32 values
    _assert_same_logps(_cached(fp32[1]), exact)
    assert _max_difference(_cached(bf16[1]), exact) > 1e-3
    _assert_same_logps(_cached(bf16[1]), exact, atol=3e-2)


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
