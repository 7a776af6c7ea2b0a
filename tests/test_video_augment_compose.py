"""augment.video: composing augmentations, and the package standing alone (torch only, without mmpo)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.clips import SEEDS, T, gen, index_clip, indices, others_for, random_clip

import augment.video as video
from augment.video import ClipSwap, Compose, GaussianBlur, RandomChoice, Reverse, Shuffle, SpeedChange, StaticClip

# --------------------------------------------------------------------------- composition


def test_compose_applies_in_order_and_is_reproducible():
    x = random_clip()
    assert torch.equal(Compose([Reverse(), Reverse()])(x, gen()), x)
    pipeline = Compose([Shuffle(), GaussianBlur(), ClipSwap(0.25)])
    assert pipeline.min_frames == 2 and pipeline.needs_others
    out = pipeline(x, gen(4), others=others_for(x))
    assert torch.equal(out, pipeline(x, gen(4), others=others_for(x)))
    assert not torch.equal(out, pipeline(x, gen(5), others=others_for(x)))
    # the steps draw from the one generator in turn
    g = gen(4)
    step = GaussianBlur()(Shuffle()(x, g), g)
    assert torch.equal(out, ClipSwap(0.25)(step, g, others=others_for(x)))


def test_random_choice_probabilities_and_seeding():
    x = index_clip()
    only_reverse = RandomChoice([StaticClip(), Reverse()], probabilities=[0, 3])
    assert not only_reverse.needs_others and only_reverse.min_frames == 1
    for seed in SEEDS:
        assert indices(only_reverse(x, gen(seed))) == list(range(T))[::-1]
    choice = RandomChoice([Reverse(), SpeedChange(2.0)])
    outputs = [tuple(indices(choice(x, gen(seed)))) for seed in SEEDS]
    assert set(outputs) == {tuple(range(T))[::-1], (0, 2, 4, 6, 0, 2, 4, 6)}
    assert outputs == [tuple(indices(choice(x, gen(seed)))) for seed in SEEDS]
    assert choice.choose(gen(0)) == choice.choose(gen(0))


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Compose([]), "at least one augmentation"),
        (lambda: Compose([Reverse(), "blur"]), r"transforms\[1\] must be a VideoAugmentation"),
        (lambda: RandomChoice([Reverse()], [0.5, 0.5]), "one entry per transform"),
        (lambda: RandomChoice([Reverse(), StaticClip()], [1, -1]), ">= 0"),
        (lambda: RandomChoice([Reverse(), StaticClip()], [0, 0]), "not all be 0"),
    ],
)
def test_composition_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# --------------------------------------------------------------------------- standing alone


def test_package_imports_only_torch():
    allowed = {"__future__", "typing", "collections", "dataclasses", "math", "torch", "augment"}  # stdlib + torch
    modules = ["__init__", "base", "temporal", "spatial", "color", "mixing", "compose", "pami"]
    for path in (Path(video.__file__).parent / f"{name}.py" for name in modules):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in names:
                assert module.split(".")[0] in allowed, f"{path.name} imports {module}"
                if module.startswith("augment"):
                    assert module.startswith("augment.video"), f"{path.name} imports {module}"


def test_the_video_package_imports_without_mmpo_or_datamodules():
    code = (
        "import sys, augment.video\n"
        "heavy = [m for m in ('mmpo', 'datamodules', 'transformers', 'augment.mia') if m in sys.modules]\n"
        "print(heavy)\n"
        "import augment\n"
        "augment.build_grid  # the MIA-DPO names still load on first use\n"
        "print('augment.mia' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]
