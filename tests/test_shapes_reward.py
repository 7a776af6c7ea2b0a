"""The shapes world's programmatic image reward: objects read back exactly, and the caption score."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from datamodules.worlds.shapes import COLORS, SHAPES, ShapeObject, caption_for, render_scene, sample_scene
from datamodules.worlds.shapes_reward import batch_rewards, caption_reward, find_objects, label_pixels


@pytest.mark.parametrize("size", [32, 64])
def test_every_shape_and_colour_is_read_back_at_the_worlds_box_sizes(size):
    for side in (max(4, round(size / 4)), max(4, round(size * 3 / 8))):  # the smallest and largest boxes
        for shape in SHAPES:
            for color in COLORS:
                obj = ShapeObject(shape, color, (3, 5, 3 + side, 5 + side))
                (found,) = find_objects(render_scene([obj], size))
                assert (found.color, found.shape, found.bbox) == (color, shape, obj.bbox), (size, side)


@pytest.mark.parametrize("size", [32, 64])
def test_random_scenes_are_read_back_and_their_captions_score_one(size):
    for i in range(60):
        scene = sample_scene(random.Random(f"reward:{size}:{i}"), image_size=size)
        image = render_scene(scene, size)
        assert sorted((o.color, o.shape) for o in find_objects(image)) == sorted((o.color, o.shape) for o in scene)
        assert caption_reward(image, caption_for(scene)).score == 1.0


def test_the_score_by_hand():
    red_circle = ShapeObject("circle", "red", (4, 4, 24, 24))
    red_square = ShapeObject("square", "red", (4, 4, 24, 24))
    blue_square = ShapeObject("square", "blue", (36, 36, 56, 56))
    caption = "a red circle ."
    assert caption_reward(render_scene([red_circle]), caption).score == 1.0
    wrong_shape = caption_reward(render_scene([red_square]), caption)  # colour 0.5, shape 0, one extra -0.25
    assert (wrong_shape.color_hits, wrong_shape.shape_hits, wrong_shape.extras) == (1, 0, 1)
    assert wrong_shape.score == 0.25
    assert caption_reward(render_scene([red_circle, blue_square]), caption).score == 0.75  # an extra object
    assert caption_reward(render_scene([blue_square]), caption).score == 0.0  # nothing named, clipped at 0
    two = "a red circle and a blue square ."
    assert caption_reward(render_scene([red_circle]), two).score == 0.5  # one of two named objects
    assert caption_reward(render_scene([]), two).score == 0.0
    assert caption_reward(render_scene([red_square]), caption, extra_penalty=0.0).score == 0.5


def test_the_worlds_dispreferred_images_score_below_the_preferred_ones(tmp_path):
    import json

    from datamodules.diffusion.module import write_diffusion_pairs

    train = write_diffusion_pairs(tmp_path, n=24, seed=0, image_size=32)
    for record in map(json.loads, train.read_text().splitlines()):
        images = [Image.open(tmp_path / record[f"image_{k}"]) for k in (0, 1)]
        scores = batch_rewards(images, [record["caption"]] * 2)
        winner = 0 if record["label_0"] == 1.0 else 1
        assert scores[winner] == 1.0 and scores[1 - winner] == 0.0  # the loser shows none of the caption's colours


def test_noise_and_speckle_do_not_change_the_reading():
    scene = [ShapeObject("triangle", "green", (6, 6, 28, 28)), ShapeObject("diamond", "purple", (34, 30, 58, 54))]
    pixels = np.asarray(render_scene(scene), dtype=np.float32)
    noisy = pixels + np.random.default_rng(0).normal(0.0, 15.0, pixels.shape)
    noisy[60:62, 2:4] = COLORS["yellow"]  # a 4-pixel speckle, below the default 16 pixels at 64 px
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    assert sorted((o.color, o.shape) for o in find_objects(image)) == [("green", "triangle"), ("purple", "diamond")]
    assert caption_reward(image, caption_for(scene)).score == 1.0
    assert (label_pixels(np.full((2, 2, 3), 128.0)) == -1).all()  # far from every palette colour: unknown


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="names no"):
        caption_reward(render_scene([]), "describe the image .")
    with pytest.raises(ValueError, match="RGB"):
        label_pixels(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        batch_rewards([render_scene([])] * 2, ["a red circle ."])
