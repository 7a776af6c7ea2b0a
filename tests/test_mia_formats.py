"""MIA-DPO augmented inputs: collage geometry, pic-in-pic boxes, prompts, seeding, corruption, token maps."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from augment.mia.formats import (
    GRID_LAYOUTS,
    ImagePool,
    SourceSample,
    add_gaussian_noise,
    build_augmented,
    build_grid,
    build_pic_in_pic,
    build_sequence,
    compose_grid,
    compose_pic_in_pic,
    fit_image,
)
from augment.mia.prompts import (
    PIC_IN_PIC_PHRASINGS,
    clean_question,
    grid_prompt,
    lower_first,
    pic_in_pic_prompt,
    refer_to_image,
    sequence_prompt,
)
from augment.mia.tokens import (
    augmented_token_groups,
    box_to_patch_indices,
    grid_target_token_indices,
    image_token_spans,
    pic_in_pic_token_indices,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
COLOURS = [(40 * i % 256, 90 * i % 256, 150 * i % 256) for i in range(1, 13)]


def solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def texture(size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels: any shift, flip, crop or other resampling of them shows."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def resized(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    """The image resized (bicubic, as documented) to fill ``box``."""
    x0, y0, x1, y1 = box
    return pixels(image.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC))


@pytest.fixture
def target() -> SourceSample:
    return SourceSample("target", solid((30, 20), RED), "<image>\nWhat is the man holding?", "A kite.")


@pytest.fixture
def pool(target) -> list[tuple[str, Image.Image]]:
    # The target's own key is in the pool, and "twin" has the target's pixels under another key.
    pairs = [(f"c{i}", solid((20 + 3 * i, 16 + 2 * i), colour)) for i, colour in enumerate(COLOURS)]
    return [(target.key, target.image), ("twin", target.image.copy()), *pairs]


# --------------------------------------------------------------------------- prompts


def test_prompt_rewriting():
    assert clean_question("<image>\nWhat is this?") == "What is this?"
    assert clean_question("Describe the scene.\n<image>") == "Describe the scene."
    assert lower_first("What is on the table?") == "what is on the table?"
    assert lower_first("TV brand?") == "TV brand?"  # acronyms keep their capitals
    assert lower_first("I see a dog; what breed?") == "I see a dog; what breed?"
    assert lower_first("Is it") == "is it"
    assert refer_to_image("<image>\nWhat colour is the bus?", 3) == "In Image3, what colour is the bus?"
    assert grid_prompt("What colour is the bus?", 1) == "<image>\nIn Image2, what colour is the bus?"
    assert pic_in_pic_prompt("Count the cats.", "For the image in the center") == (
        "<image>\nFor the image in the center, count the cats."
    )
    assert sequence_prompt("<image>\nWhat is this?", 3, 2) == (
        "Image1: <image>\nImage2: <image>\nImage3: <image>\nIn Image3, what is this?"
    )
    with pytest.raises(ValueError):
        sequence_prompt("What?", 2, 2)


def test_sequence_sample(target, pool):
    sample = build_sequence(target, pool, random.Random(3), num_images=3)
    k = sample.target_index
    assert sample.prompt == (
        f"Image1: <image>\nImage2: <image>\nImage3: <image>\nIn Image{k + 1}, what is the man holding?"
    )
    assert sample.prompt.count("<image>") == len(sample.images) == len(sample.keys) == 3 == sample.n_images
    assert sample.keys[k] == "target" and sample.target_key == "target"
    assert (pixels(sample.images[k]) == RED).all()
    assert sample.geometry["image_sizes"][k] == (30, 20)
    assert (sample.question, sample.answer) == (target.question, target.answer)


# --------------------------------------------------------------------------- geometry


def test_fit_image_keeps_aspect_on_white():
    canvas, box = fit_image(solid((80, 40), BLUE), (40, 40))
    assert canvas.size == (40, 40) and box == (0, 10, 40, 30)
    p = pixels(canvas)
    assert (p[10:30, :] == BLUE).all() and (p[:10] == WHITE).all() and (p[30:] == WHITE).all()
    canvas, box = fit_image(solid((10, 30), GREEN), (40, 40))  # upscaled to 13×40, centred
    assert box == (13, 0, 26, 40)


@pytest.mark.parametrize("n", sorted(GRID_LAYOUTS))
def test_grid_layout_per_tile_count(n):
    canvas, geometry = compose_grid([solid((8, 8), GREEN)] * n)  # defaults: 448 px tiles, 40 px margins
    rows, cols = GRID_LAYOUTS[n]
    assert geometry["layout"] == {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}[n] == (rows, cols)
    assert canvas.size == geometry["canvas_size"] == (cols * 448 + (cols - 1) * 40, rows * 488)
    assert geometry["tile_boxes"][-1] == ((cols - 1) * 488, (rows - 1) * 488 + 40, cols * 488 - 40, rows * 488)


def test_grid_tiles_pixels_and_labels():
    images = [solid((96, 48), RED), solid((24, 48), GREEN), solid((48, 48), BLUE), solid((10, 10), RED)]
    canvas, g = compose_grid(images, tile_size=48, margin=16)
    assert canvas.size == (2 * 48 + 16, 2 * 64)
    assert g["tile_boxes"] == [(0, 16, 48, 64), (64, 16, 112, 64), (0, 80, 48, 128), (64, 80, 112, 128)]
    assert g["content_boxes"][:3] == [(0, 28, 48, 52), (76, 16, 100, 64), (0, 80, 48, 128)]
    assert g["label_boxes"][0] == (0, 0, 48, 16) and g["label_boxes"][3] == (64, 64, 112, 80)
    p = pixels(canvas)
    assert (p[29:51, 1:47] == RED).all() and (p[16:27, :48] == WHITE).all() and (p[53:64, :48] == WHITE).all()
    assert (p[17:63, 77:99] == GREEN).all() and (p[16:64, 64:75] == WHITE).all() and (p[16:64, 101:112] == WHITE).all()
    assert (p[81:127, 1:47] == BLUE).all()
    assert (p[16:64, 48:64] == WHITE).all() and (p[80:128, 48:64] == WHITE).all()  # margin between columns
    for x0, y0, x1, y1 in g["label_boxes"]:
        band = p[y0:y1, x0:x1]
        assert (band.sum(-1) < 200).sum() > 10  # some dark label pixels above every tile
        assert (band.max(-1) - band.min(-1) < 8).all()  # grey levels only: no image pixels in the band


def test_grid_tiles_hold_each_image_fitted_and_centred():
    images = [texture((60, 30), 0), texture((20, 40), 1), texture((32, 32), 2), texture((50, 50), 3)]
    canvas, g = compose_grid(images, tile_size=32, margin=8, square=True)
    # 2 x 2 tiles of 32 px, 8 px apart under 8 px label bands: 72 x 80, padded square to 80 x 80 (4 px each side)
    assert canvas.size == g["canvas_size"] == (80, 80)
    assert g["tile_boxes"] == [(4, 8, 36, 40), (44, 8, 76, 40), (4, 48, 36, 80), (44, 48, 76, 80)]
    # aspect kept: 60 x 30 -> 32 x 16 centred vertically, 20 x 40 -> 16 x 32 centred horizontally, 50 x 50 -> 32 x 32
    assert g["content_boxes"] == [(4, 16, 36, 32), (52, 8, 68, 40), (4, 48, 36, 80), (44, 48, 76, 80)]
    p = pixels(canvas)
    for image, (tx0, ty0, tx1, ty1), box in zip(images, g["tile_boxes"], g["content_boxes"], strict=True):
        x0, y0, x1, y1 = box
        assert (p[y0:y1, x0:x1] == resized(image, box)).all()  # the tile holds this image, resized, not flipped
        tile = p[ty0:ty1, tx0:tx1].copy()
        tile[y0 - ty0 : y1 - ty0, x0 - tx0 : x1 - tx0] = WHITE
        assert (tile == WHITE).all()  # the rest of the tile is white


def test_pic_in_pic_pastes_the_resized_inset_on_the_background():
    background, inset = texture((100, 60), 0), texture((30, 30), 1)
    canvas, box = compose_pic_in_pic(background, inset)
    assert box == (29, 9, 71, 51)  # 0.7 x 60 = 42 px square, centred
    p, expected = pixels(canvas), pixels(background).copy()
    expected[9:51, 29:71] = resized(inset, box)
    assert (p == expected).all()  # the inset where the box is, the background's own pixels everywhere else
    assert (pixels(background) == pixels(texture((100, 60), 0))).all()  # the pool's image is untouched


def test_sequence_images_are_the_source_images_in_key_order(target):
    pool = [(f"t{i}", texture((20 + i, 24), i)) for i in range(6)]
    sample = build_sequence(target, pool, random.Random(4), num_images=4)
    images = dict(pool) | {"target": target.image}
    for key, image in zip(sample.keys, sample.images, strict=True):
        assert image.size == images[key].size and (pixels(image) == pixels(images[key])).all()
    assert sample.geometry["image_sizes"] == [images[k].size for k in sample.keys]


def test_grid_padded_to_square():
    images = [solid((48, 48), c) for c in (RED, GREEN, BLUE)]
    plain, g = compose_grid(images, tile_size=48, margin=16)  # 176 × 64
    canvas, sq = compose_grid(images, tile_size=48, margin=16, square=True)
    assert canvas.size == sq["canvas_size"] == (176, 176)
    assert sq["tile_boxes"] == [(x0, y0 + 56, x1, y1 + 56) for x0, y0, x1, y1 in g["tile_boxes"]]
    p = pixels(canvas)
    assert (p[56:120] == pixels(plain)).all() and (p[:56] == WHITE).all() and (p[120:] == WHITE).all()


def test_pic_in_pic_box_and_pixels():
    canvas, box = compose_pic_in_pic(solid((100, 60), BLUE), solid((140, 20), RED))
    assert canvas.size == (100, 60) and box == (15, 25, 85, 35)  # 0.7 × 100 wide, centred
    canvas, box = compose_pic_in_pic(solid((100, 60), BLUE), solid((30, 30), RED))
    assert box == (29, 9, 71, 51)  # 0.7 × 60 = 42 high, centred
    p = pixels(canvas)
    assert (p[10:50, 30:70] == RED).all()
    outside = np.ones(p.shape[:2], dtype=bool)
    outside[9:51, 29:71] = False
    assert (p[outside] == BLUE).all()


def test_pic_in_pic_sample(target, pool):
    sample = build_pic_in_pic(target, pool, random.Random(0))
    phrasing = sample.geometry["phrasing"]
    assert phrasing in PIC_IN_PIC_PHRASINGS
    assert sample.prompt == f"<image>\n{phrasing}, what is the man holding?"
    assert sample.keys[0] == "target" and sample.keys[1] not in ("target",) and sample.n_images == 1
    background = dict(pool)[sample.keys[1]]
    x0, y0, x1, y1 = sample.geometry["box"]
    assert sample.images[0].size == background.size
    assert x1 - x0 == round(0.7 * background.width) or y1 - y0 == round(0.7 * background.height)
    assert abs((x0 + x1) - background.width) <= 1 and abs((y0 + y1) - background.height) <= 1
    phrasings = {build_pic_in_pic(target, pool, random.Random(s)).geometry["phrasing"] for s in range(60)}
    assert phrasings == set(PIC_IN_PIC_PHRASINGS)


# --------------------------------------------------------------------------- sampling


def test_companions_never_the_target(target, pool):
    counts, positions = set(), set()
    for seed in range(150):
        for fmt in ("sequence", "grid", "pic_in_pic"):
            options = {"tile_size": 16, "margin": 4} if fmt == "grid" else {}
            sample = build_augmented(target, pool, fmt, random.Random(seed), **options)
            assert sample.keys.count("target") == 1 and len(set(sample.keys)) == len(sample.keys)
            assert sample.keys[sample.target_index] == "target"
            if fmt != "pic_in_pic":
                counts.add((fmt, len(sample.keys)))
                positions.add((fmt, len(sample.keys), sample.target_index))
    assert counts == {("sequence", n) for n in (2, 3, 4, 5)} | {("grid", n) for n in GRID_LAYOUTS}
    assert {p for f, n, p in positions if (f, n) == ("grid", 9)} == set(range(9))


def test_pool_loader_is_lazy_and_exhaustible(target):
    loaded: list[str] = []

    def loader(key: str) -> Image.Image:
        loaded.append(key)
        return solid((8, 8), GREEN)

    pool = ImagePool(["target", "a", "b", "c"], loader)
    sample = build_sequence(target, pool, random.Random(0), num_images=4)
    assert sorted(loaded) == ["a", "b", "c"] and sorted(sample.keys) == ["a", "b", "c", "target"]
    with pytest.raises(ValueError, match="companions"):
        build_sequence(target, pool, random.Random(0), num_images=5)
    with pytest.raises(ValueError, match="unique"):
        ImagePool(["a", "a"], loader)


def test_bad_arguments(target, pool):
    with pytest.raises(TypeError):
        build_sequence(target, pool, random)  # the global module is not an explicit rng
    with pytest.raises(TypeError):
        build_augmented(target, pool, "sequence", random.Random(0), tile_size=32)
    with pytest.raises(ValueError):
        build_augmented(target, pool, "mosaic", random.Random(0))
    with pytest.raises(ValueError):
        build_grid(target, pool, random.Random(0), num_tiles=5)


@pytest.mark.parametrize("fmt", ["sequence", "grid", "pic_in_pic"])
def test_same_seed_same_sample(target, pool, fmt):
    options = {"tile_size": 24, "margin": 8} if fmt == "grid" else {}
    a, b, c = (build_augmented(target, pool, fmt, random.Random(seed), noise_std=0.2, **options) for seed in (7, 7, 8))
    assert a.prompt == b.prompt and a.keys == b.keys and a.geometry == b.geometry
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert (a.keys, [im.tobytes() for im in a.images]) != (c.keys, [im.tobytes() for im in c.images])


# --------------------------------------------------------------------------- corruption


def test_noise_statistics():
    grey = solid((64, 64), (128, 128, 128))
    noisy = pixels(add_gaussian_noise(grey, 0.1, torch.Generator().manual_seed(0))) - 128
    assert abs(noisy.mean()) < 1.0 and abs(noisy.std() - 25.5) < 1.0
    assert add_gaussian_noise(grey, 0.0, torch.Generator()).tobytes() == grey.tobytes()


def test_corruption_touches_only_the_target(target, pool):
    grid = {"tile_size": 32, "margin": 8, "num_tiles": 6}
    clean, noisy = (build_grid(target, pool, random.Random(5), noise_std=std, **grid) for std in (0.0, 0.3))
    assert clean.keys == noisy.keys and clean.prompt == noisy.prompt  # same draws, pixels differ only
    changed = (pixels(clean.images[0]) != pixels(noisy.images[0])).any(-1)
    x0, y0, x1, y1 = clean.geometry["tile_boxes"][clean.target_index]
    assert changed[y0:y1, x0:x1].mean() > 0.5
    changed[y0:y1, x0:x1] = False
    assert not changed.any()

    clean, noisy = (build_sequence(target, pool, random.Random(5), num_images=4, noise_std=s) for s in (0.0, 0.3))
    for i, (a, b) in enumerate(zip(clean.images, noisy.images, strict=True)):
        assert (a.tobytes() != b.tobytes()) == (i == clean.target_index)

    clean, noisy = (build_pic_in_pic(target, pool, random.Random(5), noise_std=s) for s in (0.0, 0.3))
    assert (pixels(clean.images[0]) != pixels(noisy.images[0])).any(-1).mean() > 0.5  # the whole picture


# --------------------------------------------------------------------------- token bookkeeping


def test_image_token_spans():
    ids = [1, 5, 9, 9, 9, 9, 6, 7, 9, 9, 9, 9, 2]  # text, image (4 tokens), text, image, text
    assert image_token_spans(ids, 9) == [(2, 6), (8, 12)]
    assert image_token_spans(torch.tensor(ids), 9, tokens_per_image=4) == [(2, 6), (8, 12)]
    assert image_token_spans([1, *[9] * 8, 2], 9, tokens_per_image=4) == [(1, 5), (5, 9)]  # back to back
    assert image_token_spans([1, 2], 9) == []
    with pytest.raises(ValueError):
        image_token_spans([9, 9, 9], 9, tokens_per_image=4)


def test_box_to_patch_indices_by_hand():
    # 80×80 image → 8 px input, 4×4 patches: one patch is 20×20 image pixels.
    assert box_to_patch_indices((0, 0, 40, 40), (80, 80), (4, 4), 8) == [0, 1, 4, 5]
    assert box_to_patch_indices((40, 20, 80, 80), (80, 80), (4, 4), 8) == [6, 7, 10, 11, 14, 15]
    assert box_to_patch_indices((0, 0, 30, 30), (80, 80), (4, 4), 8) == [0, 1, 4]  # half-covered patches kept
    assert box_to_patch_indices((0, 0, 30, 30), (80, 80), (4, 4), 8, min_coverage=0.6) == [0]
    assert box_to_patch_indices((0, 0, 30, 30), (80, 80), (4, 4), 8, min_coverage=0.0) == [0, 1, 4, 5]
    # 160×80 image: squash, centre-crop (drops 40 px each side) and pad-to-square (adds 40 px top and bottom).
    right_half = (80, 0, 160, 80)
    assert box_to_patch_indices(right_half, (160, 80), (4, 4), 8, "squash") == [2, 3, 6, 7, 10, 11, 14, 15]
    assert box_to_patch_indices(right_half, (160, 80), (4, 4), 8, "crop") == [2, 3, 6, 7, 10, 11, 14, 15]
    assert box_to_patch_indices((0, 0, 40, 80), (160, 80), (4, 4), 8, "squash") == [0, 4, 8, 12]
    assert box_to_patch_indices((0, 0, 40, 80), (160, 80), (4, 4), 8) == []  # default "crop": cut away
    assert box_to_patch_indices((0, 0, 160, 80), (160, 80), (4, 4), 8, "pad") == list(range(4, 12))


def test_grid_target_token_indices_by_hand(target, pool):
    ids = [1, 2, *[9] * 28, 3]  # the collage's 28 tokens start at position 2
    _, g = compose_grid([solid((8, 8), RED)] * 2, tile_size=30, margin=10)  # canvas 70×40
    assert g["canvas_size"] == (70, 40)
    # squash to 28×28, patch grid 4 rows × 7 cols: a patch is 7 input rows × 4 input cols = 10 × 10 collage px.
    kwargs = {"image_size": (70, 40), "tokens_per_image": 28, "patch_grid": (4, 7), "input_size": 28}
    kwargs["resize_mode"] = "squash"
    left = grid_target_token_indices(ids, 9, box=g["tile_boxes"][0], **kwargs)
    right = grid_target_token_indices(ids, 9, box=g["tile_boxes"][1], **kwargs)
    assert left == [2 + p for p in (7, 8, 9, 14, 15, 16, 21, 22, 23)]  # rows 1–3 (row 0: labels), cols 0–2
    assert right == [2 + p for p in (11, 12, 13, 18, 19, 20, 25, 26, 27)]  # cols 4–6 (col 3: margin)
    # Centre-crop instead: x' = 0.7·x − 10.5, so Image1 keeps input columns 0–10.5; col 2 is 62.5 % covered.
    strict = {**kwargs, "resize_mode": "crop", "min_coverage": 0.7}
    assert grid_target_token_indices(ids, 9, box=g["tile_boxes"][0], **strict) == [9, 10, 16, 17, 23, 24]
    with pytest.raises(ValueError, match="patch grid"):
        grid_target_token_indices(ids, 9, box=g["tile_boxes"][0], **{**kwargs, "patch_grid": (4, 4)})

    # Margin-free 2×2 collage of 20 px tiles: each tile is one quadrant of a 4×4 patch map.
    sample = build_grid(target, pool, random.Random(2), num_tiles=4, tile_size=20, margin=0)
    ids = [1, *[9] * 16, 2]
    groups = augmented_token_groups(sample, ids, 9, tokens_per_image=16, patch_grid=(4, 4), input_size=8)
    assert groups == [[1, 2, 5, 6], [3, 4, 7, 8], [9, 10, 13, 14], [11, 12, 15, 16]]


def test_centre_crop_loses_outer_tiles_unless_square(target, pool):
    ids = [1, *[9] * 36, 2]
    kwargs = {"tokens_per_image": 36, "patch_grid": (6, 6), "input_size": 48}  # mmpo's tiny LLaVA
    wide = build_grid(target, pool, random.Random(0), num_tiles=3, tile_size=64, margin=16)  # 224 × 80
    assert [len(g) for g in augmented_token_groups(wide, ids, 9, **kwargs)] == [0, 20, 0]
    square = build_grid(target, pool, random.Random(0), num_tiles=3, tile_size=64, margin=16, square=True)
    groups = augmented_token_groups(square, ids, 9, **kwargs)
    assert all(groups) and len(set().union(*groups)) == sum(map(len, groups))  # non-empty, disjoint


def test_pic_in_pic_token_indices_by_hand(target):
    ids = [1, *[9] * 16, 2]
    assert pic_in_pic_token_indices(ids, 9, tokens_per_image=16, patch_grid=(4, 4)) == [6, 7, 10, 11]
    llava = pic_in_pic_token_indices([*[9] * 576], 9, tokens_per_image=576, patch_grid=(24, 24))
    assert len(llava) == 256 and llava[0] == 4 * 24 + 4 and llava[-1] == 19 * 24 + 19  # the paper's 16×16
    # The pasted box of a 40 px inset in a 100 px background: (15, 15, 85, 85); 25 px patches.
    box_kwargs = {"box": (15, 15, 85, 85), "image_size": (100, 100), "input_size": 8}
    assert pic_in_pic_token_indices(ids, 9, tokens_per_image=16, patch_grid=(4, 4), **box_kwargs) == [6, 7, 10, 11]
    assert (
        len(pic_in_pic_token_indices(ids, 9, tokens_per_image=16, patch_grid=(4, 4), min_coverage=0.1, **box_kwargs))
        == 16
    )

    sample = build_pic_in_pic(target, [("bg", solid((100, 100), BLUE))], random.Random(0))
    inset, rest = augmented_token_groups(sample, ids, 9, tokens_per_image=16, patch_grid=(4, 4), input_size=8)
    assert inset == [6, 7, 10, 11] and rest == [1, 2, 3, 4, 5, 8, 9, 12, 13, 14, 15, 16]


def test_sequence_token_groups(target, pool):
    sample = build_sequence(target, pool, random.Random(1), num_images=2)
    ids = [1, 5, 9, 9, 9, 9, 6, 9, 9, 9, 9, 2]
    groups = augmented_token_groups(sample, ids, 9, tokens_per_image=4, patch_grid=(2, 2), input_size=8)
    assert groups == [[2, 3, 4, 5], [7, 8, 9, 10]]
