"""Diffusion preference pairs: records, winner ordering, paired augmentation, bad samples, latent cache."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from datamodules.core.records import BadSampleError
from datamodules.diffusion.cache import build_latent_cache
from datamodules.diffusion.latent_cache import LatentCache, LatentCacheMissError
from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs
from datamodules.diffusion.pairs import (
    DiffusionPreferenceBatch,
    DiffusionPreferenceCollator,
    DiffusionPreferenceDataset,
    EpochTaggedSampler,
    load_diffusion_records,
)
from datamodules.worlds.shapes import COLORS, objects_in_text

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def solid(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    Image.new("RGB", size, rgb).save(path)
    return path.name


def noise(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def as_pixels(rgb: tuple[int, int, int], resolution: int) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(3, 1, 1).expand(3, resolution, resolution)


def collate(dataset, keys) -> DiffusionPreferenceBatch:
    return DiffusionPreferenceCollator()([dataset[k] for k in keys])


@pytest.fixture
def red_blue(tmp_path) -> Path:
    solid(tmp_path / "red.png", RED)
    solid(tmp_path / "blue.png", BLUE)
    return tmp_path


# --- records and winner ordering -------------------------------------------------------------------------------


def test_label_and_scores_put_the_preferred_image_first(red_blue):
    base = {"caption": "a red square .", "image_0": "red.png", "image_1": "blue.png"}
    path = write_jsonl(
        red_blue / "pairs.jsonl",
        [
            {**base, "id": "l1", "label_0": 1.0},  # red preferred
            {**base, "id": "l0", "label_0": 0},  # blue preferred: swapped
            {**base, "id": "only_l1", "label_1": 1.0},  # blue preferred
            {**base, "id": "soft", "label_0": 0.3},  # blue preferred with strength 0.7
            {**base, "id": "scores", "scores": [0.2, 0.9]},  # blue preferred
            {**base, "id": "both", "label_0": 1, "label_1": 0, "scores": [3, -1]},  # red preferred
        ],
    )
    records, problems = load_diffusion_records(path)
    assert problems == [] and [r.id for r in records] == ["l1", "l0", "only_l1", "soft", "scores", "both"]
    assert [r.winner for r in records] == [0, 1, 1, 1, 1, 0]
    batch = collate(DiffusionPreferenceDataset(records, resolution=8), range(6))
    red, blue = as_pixels(RED, 8), as_pixels(BLUE, 8)
    winners = [red, blue, blue, blue, blue, red]
    for i, w in enumerate(winners):
        torch.testing.assert_close(batch.pixel_values[i], w, rtol=0, atol=0)  # row i: the preferred image
        torch.testing.assert_close(batch.pixel_values[6 + i], blue if w is red else red, rtol=0, atol=0)
    torch.testing.assert_close(batch.label, torch.tensor([1.0, 1.0, 1.0, 0.7, 1.0, 1.0]))
    assert batch.scores.shape == (6, 2)
    torch.testing.assert_close(batch.scores[4:], torch.tensor([[0.9, 0.2], [3.0, -1.0]]))  # (winner, loser)
    assert torch.isnan(batch.scores[:4]).all()
    assert batch.ids == ["l1", "l0", "only_l1", "soft", "scores", "both"] and batch.num_pairs == 6
    assert batch.captions == ["a red square ."] * 6 and batch.skipped == 0 and batch.latents is None


def test_ties_are_dropped_or_kept_with_label_half(red_blue):
    base = {"caption": "c", "image_0": "red.png", "image_1": "blue.png"}
    path = write_jsonl(
        red_blue / "pairs.jsonl",
        [
            {**base, "id": "a", "label_0": 1},
            {**base, "id": "tie", "label_0": 0.5},
            {**base, "id": "eq", "scores": [2, 2]},
        ],
    )
    dropped, _ = load_diffusion_records(path)
    assert [r.id for r in dropped] == ["a"]
    kept, _ = load_diffusion_records(path, drop_ties=False)
    assert [r.id for r in kept] == ["a", "tie", "eq"]
    batch = collate(DiffusionPreferenceDataset(kept, resolution=4), range(3))
    torch.testing.assert_close(batch.label, torch.tensor([1.0, 0.5, 0.5]))
    torch.testing.assert_close(batch.pixel_values[1], as_pixels(RED, 4))  # a tie keeps the data's order
    torch.testing.assert_close(batch.scores[2], torch.tensor([2.0, 2.0]))


def test_jpg_aliases_json_and_parquet(red_blue):
    row = {"id": "x", "caption": "c", "jpg_0": "red.png", "jpg_1": "blue.png", "label_0": 0.0}
    (red_blue / "pairs.json").write_text(json.dumps([row]), encoding="utf-8")
    import datasets

    datasets.Dataset.from_list([row]).to_parquet(str(red_blue / "pairs.parquet"))
    for name in ("pairs.json", "pairs.parquet"):
        (rec,), _ = load_diffusion_records(red_blue / name)
        assert rec.winner == 1 and rec.images[1].endswith("blue.png") and rec.where.endswith(f"{name}[0]")


# --- pixels and augmentation -----------------------------------------------------------------------------------


def test_pixel_range_shapes_and_centre_crop(tmp_path):
    noise(tmp_path / "a.png", 0, size=(16, 24))  # shorter side already 16: no resize, so exact pixels
    noise(tmp_path / "b.png", 1, size=(50, 30))
    path = write_jsonl(tmp_path / "p.jsonl", [{"caption": "c", "image_0": "a.png", "image_1": "b.png", "label_0": 1}])
    records, _ = load_diffusion_records(path)
    batch = collate(DiffusionPreferenceDataset(records, resolution=16), [0])
    assert batch.pixel_values.shape == (2, 3, 16, 16) and batch.pixel_values.dtype == torch.float32

    def scaled(image: Image.Image) -> torch.Tensor:  # uint8 (H, W, 3) -> (3, H, W) in [-1, 1]
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1

    raw = scaled(Image.open(tmp_path / "a.png"))
    torch.testing.assert_close(batch.pixel_values[0], raw[:, 4:20, :], rtol=0, atol=0)  # centre rows 4..19 of 24
    # 50x30: the shorter side resized to 16 (bilinear) -> 27x16, then the centre 16 columns (from round(5.5) = 6)
    small = Image.open(tmp_path / "b.png").resize((27, 16), Image.Resampling.BILINEAR)
    torch.testing.assert_close(batch.pixel_values[1], scaled(small)[:, :, 6:22], rtol=0, atol=0)
    assert batch.pixel_values.min() == -1 and batch.pixel_values.max() == 1  # random pixels span 0..255


def test_pair_gets_one_crop_and_flip(tmp_path):
    noise(tmp_path / "a.png", 0, size=(48, 32))
    shutil.copy(tmp_path / "a.png", tmp_path / "copy.png")
    rows = [
        {"id": str(i), "caption": "c", "image_0": "a.png", "image_1": "copy.png", "label_0": i % 2} for i in range(6)
    ]
    records, _ = load_diffusion_records(write_jsonl(tmp_path / "p.jsonl", rows))
    ds = DiffusionPreferenceDataset(records, resolution=24, random_crop=True, random_flip=True, seed=3)
    centre = DiffusionPreferenceDataset(records, resolution=24)[0]["pixel_values"][0]
    seen_other_crop = seen_flip = False
    for epoch in range(4):
        batch = collate(ds, [(i, epoch) for i in range(6)])
        torch.testing.assert_close(batch.pixel_values[:6], batch.pixel_values[6:], rtol=0, atol=0)
        for i in range(6):
            (dx, _), flip = ds.augmentation(i, epoch)
            seen_flip |= flip
            seen_other_crop |= not torch.equal(batch.pixel_values[i], centre)
            expected = ds.pixels(i, (dx, 0.5), flip)[0]  # 48x32 -> 36x24: only x varies
            torch.testing.assert_close(batch.pixel_values[i], expected, rtol=0, atol=0)
    assert seen_flip and seen_other_crop


def test_augmentation_is_a_function_of_seed_epoch_and_index(world_pairs):
    records, _ = load_diffusion_records(world_pairs / "train.jsonl")

    def dataset(seed):
        return DiffusionPreferenceDataset(records, resolution=48, random_crop=True, random_flip=True, seed=seed)

    a, b, other = dataset(0), dataset(0), dataset(1)
    keys = [(i, e) for i in range(8) for e in range(2)]
    assert all(torch.equal(a[k]["pixel_values"], b[k]["pixel_values"]) for k in keys)
    assert not all(torch.equal(a[k]["pixel_values"], other[k]["pixel_values"]) for k in keys)
    assert not all(torch.equal(a[(i, 0)]["pixel_values"], a[(i, 1)]["pixel_values"]) for i in range(8))

    # Through the sampler and DataLoader workers: the same batches with 0 or 2 workers, epoch after epoch.
    def epoch_batches(num_workers, epoch):
        sampler = EpochTaggedSampler(a, seed=5)
        sampler.set_epoch(epoch)
        loader = DataLoader(
            a, batch_size=4, sampler=sampler, num_workers=num_workers, collate_fn=DiffusionPreferenceCollator()
        )
        return [(b.ids, b.pixel_values) for b in loader]

    for epoch in (0, 1):
        serial, parallel = epoch_batches(0, epoch), epoch_batches(2, epoch)
        assert [ids for ids, _ in serial] == [ids for ids, _ in parallel]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(serial, parallel, strict=True))


# --- bad samples -----------------------------------------------------------------------------------------------

GOOD = {"id": "g", "caption": "a red square .", "image_0": "red.png", "image_1": "blue.png", "label_0": 1}
BAD_CASES = {
    "missing caption": ({"caption": None}, "missing field(s) caption"),
    "missing image": ({"image_1": None}, "missing field(s) image_1"),
    "missing label": ({"label_0": None}, "missing field(s) label_0 (or scores, or segment_labels)"),
    "empty caption": ({"caption": "  "}, "'caption' is empty"),
    "caption not text": ({"caption": 3}, "'caption' must be a string"),
    "label above 1": ({"label_0": 1.5}, "'label_0' must be in [0, 1]"),
    "label below 0": ({"label_0": -0.1}, "'label_0' must be in [0, 1]"),
    "label NaN": ({"label_0": math.nan}, "'label_0' must be in [0, 1]"),
    "label bool": ({"label_0": True}, "'label_0' must be a number"),
    "label text": ({"label_0": "1"}, "'label_0' must be a number"),
    "labels disagree": ({"label_1": 1.0}, "must sum to 1"),
    "label and scores disagree": ({"scores": [0.0, 1.0]}, "prefer different images"),
    "scores NaN": ({"label_0": None, "scores": [math.nan, 1.0]}, "scores must be finite"),
    "scores inf": ({"label_0": None, "scores": [1.0, math.inf]}, "scores must be finite"),
    "scores length": ({"label_0": None, "scores": [1.0, 2.0, 3.0]}, "'scores' must be a list of 2 numbers"),
    "scores not a list": ({"label_0": None, "scores": 1.0}, "'scores' must be a list of 2 numbers"),
    "path outside root": ({"image_0": "../red.png"}, "points outside the data root"),
    "missing file": ({"image_1": "nope.png"}, "media file not found"),
    "path and alias": ({"jpg_0": "red.png"}, "not both"),
    "image bytes": ({"image_0": {"bytes": "..."}}, "must be an image path"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_names_file_and_line(red_blue, case):
    root = red_blue / "data"
    root.mkdir()
    for name in ("red.png", "blue.png"):
        shutil.move(red_blue / name, root / name)
    change, message = BAD_CASES[case]
    path = write_jsonl(root / "pairs.jsonl", [GOOD, {**GOOD, **change}])  # JSON writes NaN / Infinity literals
    with pytest.raises(BadSampleError) as err:
        load_diffusion_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    records, problems = load_diffusion_records(path, on_bad_sample="skip")
    assert [r.id for r in records] == ["g"] and len(problems) == 1 and problems[0].startswith(f"{path}:2: ")


def test_skip_counts_bad_records_and_undecodable_images(red_blue):
    (red_blue / "broken.png").write_bytes(b"not a png")
    rows = [GOOD, "{not json", {**GOOD, "id": "broken", "image_0": "broken.png"}, {**GOOD, "label_0": 2}, GOOD]
    path = write_jsonl(red_blue / "pairs.jsonl", rows)
    with pytest.raises(BadSampleError, match=rf"^{path}:2: malformed JSON"):
        load_diffusion_records(path)
    records, problems = load_diffusion_records(path, on_bad_sample="skip")
    assert [r.id for r in records] == ["g", "broken", "g"]  # the broken image is only found when decoded
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:4"]
    batch = collate(DiffusionPreferenceDataset(records, resolution=4, on_bad_sample="skip"), range(3))
    assert batch.skipped == 1 and batch.ids == ["g", "g"] and batch.pixel_values.shape == (4, 3, 4, 4)
    with pytest.raises(BadSampleError, match=rf"^{path}:3: cannot decode image .*broken.png"):
        DiffusionPreferenceDataset(records, resolution=4)[1]
    empty = collate(DiffusionPreferenceDataset(records[1:2], resolution=4, on_bad_sample="skip"), [0])
    assert empty.num_pairs == 0 and empty.skipped == 1 and empty.pixel_values is None


# --- latent cache ----------------------------------------------------------------------------------------------


class ToyVAE:
    """avg-pool x8 as a 'VAE'; counts calls and images."""

    def __init__(self) -> None:
        self.calls = self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += x.shape[0]
        return F.avg_pool2d(x, 8)


class ToyTextEncoder:
    """A caption's embedding (4, 8) drawn from a generator seeded by its hash; counts calls."""

    def __init__(self, pooled: bool = False) -> None:
        self.calls = 0
        self.pooled = pooled

    @staticmethod
    def embed(caption: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little")
        return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))

    def __call__(self, captions: list[str]):
        self.calls += 1
        embeds = torch.stack([self.embed(c) for c in captions])
        return {"text_embeds": embeds, "pooled": embeds.mean(1)} if self.pooled else embeds


@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion_pairs")
    write_diffusion_pairs(root, n=10, seed=0, image_size=64, split="train")
    write_diffusion_pairs(root, n=4, seed=0, image_size=64, split="val")
    return root


@pytest.fixture
def pairs_copy(world_pairs, tmp_path) -> Path:
    shutil.copytree(world_pairs, tmp_path / "data")
    return tmp_path / "data"


def test_synthetic_pairs_prefer_the_image_true_to_the_caption(world_pairs):
    records, _ = load_diffusion_records(world_pairs / "train.jsonl")
    assert len(records) == 10 and {r.winner for r in records} == {0, 1}
    for rec in records:
        colours = {c for c, _ in objects_in_text(rec.caption)}
        present = [{tuple(p) for p in np.asarray(Image.open(path)).reshape(-1, 3)} for path in rec.images]
        assert all(COLORS[c] in present[rec.winner] for c in colours)
        assert not any(COLORS[c] in present[1 - rec.winner] for c in colours)


def test_cache_equals_encoding_on_the_fly_and_is_reused(pairs_copy):
    records, _ = load_diffusion_records(pairs_copy / "train.jsonl")
    cache_dir = pairs_copy / "cache"
    vae, text = ToyVAE(), ToyTextEncoder()
    plain = DiffusionPreferenceDataset(records, resolution=32)
    stats = build_latent_cache(plain, vae, text, cache_dir, batch_size=4, encoder_id="toy", show_progress=False)
    assert (stats.written, stats.reused, stats.skipped) == (10, 0, 0)
    assert (vae.calls, vae.images, text.calls) == (3, 20, 3)  # 4 + 4 + 2 pairs
    assert not [p for p in cache_dir.rglob("*") if ".tmp" in p.name]

    cached = DiffusionPreferenceDataset(records, resolution=32, cache_dir=cache_dir)  # encoder id from cache.json
    batch, ref = collate(cached, range(10)), collate(plain, range(10))
    assert batch.pixel_values is None and batch.latents.shape == (20, 3, 4, 4)
    torch.testing.assert_close(batch.latents, F.avg_pool2d(ref.pixel_values, 8))  # winners first, as on the fly
    torch.testing.assert_close(batch.text_embeds, torch.stack([ToyTextEncoder.embed(c) for c in ref.captions]))
    assert batch.ids == ref.ids and torch.equal(batch.label, ref.label)

    again = build_latent_cache(plain, vae, text, cache_dir, batch_size=4, encoder_id="toy", show_progress=False)
    assert (again.written, again.reused) == (0, 10) and (vae.calls, text.calls) == (3, 3)  # nothing recomputed
    other = build_latent_cache(plain, vae, None, cache_dir, batch_size=4, encoder_id="toy-2", show_progress=False)
    assert other.written == 10 and vae.calls == 6  # another encoder id is another cache
    with pytest.raises(LatentCacheMissError, match="2 encoders"):
        cached_ambiguous = DiffusionPreferenceDataset(records, resolution=32, cache_dir=cache_dir)
        cached_ambiguous[0]
    no_text = DiffusionPreferenceDataset(records, resolution=32, cache_dir=cache_dir, cache_encoder_id="toy-2")
    assert collate(no_text, [0]).text_embeds is None


def test_cache_invalidated_when_an_image_changes(pairs_copy):
    records, _ = load_diffusion_records(pairs_copy / "train.jsonl")
    cache_dir, vae = pairs_copy / "cache", ToyVAE()
    plain = DiffusionPreferenceDataset(records, resolution=32)
    build_latent_cache(plain, vae, None, cache_dir, encoder_id="toy", show_progress=False)
    noise(Path(records[3].images[1]), seed=9, size=(64, 64))  # same path, new content
    stats = build_latent_cache(plain, vae, None, cache_dir, encoder_id="toy", show_progress=False)
    assert (stats.written, stats.reused) == (1, 9) and vae.images == 22
    cached = DiffusionPreferenceDataset(records, resolution=32, cache_dir=cache_dir, cache_encoder_id="toy")
    torch.testing.assert_close(cached[3]["latents"], F.avg_pool2d(plain[3]["pixel_values"], 8))


def test_missing_cache_entry_names_the_record(pairs_copy):
    records, _ = load_diffusion_records(pairs_copy / "train.jsonl")
    cache_dir = pairs_copy / "cache"
    with pytest.raises(LatentCacheMissError, match="no cache built yet"):
        DiffusionPreferenceDataset(records, resolution=32, cache_dir=cache_dir)[0]
    build_latent_cache(DiffusionPreferenceDataset(records, resolution=32), ToyVAE(), None, cache_dir, encoder_id="toy")
    other_resolution = DiffusionPreferenceDataset(records, resolution=16, cache_dir=cache_dir)
    with pytest.raises(LatentCacheMissError) as err:
        other_resolution[2]
    assert str(err.value).startswith(f"{records[2].where}: record '{records[2].id}' has no entry")
    cache = LatentCache(cache_dir, "toy")
    cache.path(cache.key(records[5].caption, records[5].images, 32, "")).unlink()
    with pytest.raises(LatentCacheMissError, match=f"record '{records[5].id}'"):
        DiffusionPreferenceDataset(records, resolution=32, cache_dir=cache_dir)[5]


def test_cache_resumes_after_an_interrupted_build(pairs_copy):
    records, _ = load_diffusion_records(pairs_copy / "train.jsonl")
    plain, vae = DiffusionPreferenceDataset(records, resolution=32), ToyVAE()

    def failing(x):
        if vae.calls == 2:
            raise KeyboardInterrupt
        return vae(x)

    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(plain, failing, None, pairs_copy / "cache", batch_size=3, encoder_id="toy")
    stats = build_latent_cache(plain, vae, None, pairs_copy / "cache", batch_size=3, encoder_id="toy")
    assert (stats.written, stats.reused) == (4, 6)
    assert not [p for p in (pairs_copy / "cache").rglob("*") if ".tmp" in p.name]


def test_cache_marks_undecodable_pairs_and_keeps_text_extras(pairs_copy):
    records, _ = load_diffusion_records(pairs_copy / "train.jsonl")
    Path(records[1].images[0]).write_bytes(b"garbage")
    with pytest.raises(BadSampleError, match=f"^{records[1].where}: cannot decode"):
        build_latent_cache(
            DiffusionPreferenceDataset(records, resolution=32), ToyVAE(), None, pairs_copy / "c", 4, encoder_id="t"
        )
    skip = DiffusionPreferenceDataset(records, resolution=32, on_bad_sample="skip")
    text = ToyTextEncoder(pooled=True)
    stats = build_latent_cache(skip, ToyVAE(), text, pairs_copy / "cache", 4, encoder_id="t", show_progress=False)
    assert (stats.written, stats.skipped) == (9, 1)
    again = build_latent_cache(skip, ToyVAE(), text, pairs_copy / "cache", 4, encoder_id="t", show_progress=False)
    assert (again.written, again.reused, again.skipped) == (0, 9, 1)
    cached = DiffusionPreferenceDataset(records, resolution=32, on_bad_sample="skip", cache_dir=pairs_copy / "cache")
    batch = collate(cached, range(4))
    assert batch.skipped == 1 and batch.num_pairs == 3 and batch.ids == [records[i].id for i in (0, 2, 3)]
    # the cached values are the encoders' outputs for the pairs that decoded (record 1 did not)
    embeds = torch.stack([ToyTextEncoder.embed(records[i].caption) for i in (0, 2, 3)])
    torch.testing.assert_close(batch.text_embeds, embeds)
    torch.testing.assert_close(batch.text_extra["pooled"], embeds.mean(1))
    plain = collate(DiffusionPreferenceDataset(records, resolution=32), [0, 2, 3])
    torch.testing.assert_close(batch.latents, F.avg_pool2d(plain.pixel_values, 8))


# --- DataModule ------------------------------------------------------------------------------------------------


def test_training_loader_resumes_mid_epoch(world_pairs):
    def make():
        dm = DiffusionPreferenceDataModule(
            train_file=str(world_pairs / "train.jsonl"),
            resolution=32,
            loader={"batch_size": 2, "seed": 3, "num_workers": 0},
        )
        dm.setup("fit")
        return dm.train_dataloader()

    straight = [b.ids for b in make()]
    loader = make()
    it = iter(loader)
    seen = [next(it).ids for _ in range(2)]
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b.ids for b in resumed]
    assert seen + rest == straight and len(straight) > 3


def test_datamodule_setup_and_batches(world_pairs, tmp_path):
    dm = DiffusionPreferenceDataModule(
        train_file=str(world_pairs / "train.jsonl"),
        val_file=str(world_pairs / "val.jsonl"),
        resolution=32,
        loader={"batch_size": 4, "seed": 1},
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, DiffusionPreferenceBatch) and batch.num_pairs == 4
    assert batch.pixel_values.shape == (8, 3, 32, 32) and batch.label.tolist() == [1.0] * 4
    train = dm.datasets["train"]
    assert train.random_crop and train.random_flip
    assert not dm.datasets["val"].random_crop and not dm.datasets["val"].random_flip
    assert [b.ids for b in dm.val_dataloader()] == [[f"val-{i:06d}" for i in range(4)]]
    # the loader serves each pair's epoch-0 crop and flip, winners in rows 0-3 and their losers in rows 4-7
    index = {r.id: i for i, r in enumerate(train.records)}
    pairs = torch.stack([train[(index[rid], 0)]["pixel_values"] for rid in batch.ids])  # (4, 2, 3, R, R)
    torch.testing.assert_close(batch.pixel_values, torch.cat([pairs[:, 0], pairs[:, 1]]), rtol=0, atol=0)
    moved = batch.to("cpu")
    torch.testing.assert_close(moved.pixel_values, batch.pixel_values, rtol=0, atol=0)
    assert moved.ids == batch.ids and moved.captions == batch.captions and torch.equal(moved.label, batch.label)

    cached = DiffusionPreferenceDataModule(
        train_file=str(world_pairs / "train.jsonl"),
        val_file=str(world_pairs / "val.jsonl"),
        resolution=32,
        cache_dir=str(tmp_path / "cache"),
        loader={"batch_size": 4},
    )
    stats = cached.build_cache(ToyVAE(), ToyTextEncoder(), encoder_id="toy", show_progress=False)
    assert {k: s.written for k, s in stats.items()} == {"train": 10, "val": 4}
    assert not cached.datasets["train"].random_crop and not cached.datasets["train"].random_flip
    batch = next(iter(cached.train_dataloader()))
    assert batch.pixel_values is None and batch.latents.shape == (8, 3, 4, 4)
    # latents and text embeddings cached are the encoders' outputs for this batch's pairs (centre crop, winner first)
    centre = cached.datasets["train"]
    plain = DiffusionPreferenceDataset(centre.records, resolution=32)
    index = {r.id: i for i, r in enumerate(centre.records)}
    ref = collate(plain, [index[rid] for rid in batch.ids])
    torch.testing.assert_close(batch.latents, F.avg_pool2d(ref.pixel_values, 8))
    torch.testing.assert_close(batch.text_embeds, torch.stack([ToyTextEncoder.embed(c) for c in ref.captions]))


def test_datamodule_signature_parses_for_lightning_cli(world_pairs):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(DiffusionPreferenceDataModule, "data")
    cfg = parser.parse_args(["--data.train_file", str(world_pairs / "train.jsonl"), "--data.resolution", "64"])
    assert cfg.data.resolution == 64 and cfg.data.drop_ties is True and cfg.data.cache_dir is None
    dm = DiffusionPreferenceDataModule(**cfg.data.as_dict())
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 10
    help_text = parser.format_help()
    assert "centre crop" in help_text.lower() or "centre-crop" in help_text.lower()
