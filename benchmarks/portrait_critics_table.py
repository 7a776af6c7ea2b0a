"""Measured figures of the portrait critics (docs/tlpo.md): each critic on true clips and on degraded copies.

python benchmarks/portrait_critics_table.py [N]    # N train clips of PortraitWorld(seed=0), default 32
"""

import sys

import numpy as np
import torch

from datamodules.worlds.portrait import PortraitWorld, render_face
from mmpo.portrait_critics import preference_pairs, score_clip

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
world = PortraitWorld(seed=0)
rng = np.random.default_rng(0)
table: dict[str, list[dict]] = {}
for i in range(n):
    record = world.record("train", i)
    ident = world.identity(int(record["identity"][3:]))
    ref, env, truth = world.reference(ident), np.array(record["envelope"]), record["truth"]

    def render(openings=env, heads=truth["head"], ident=ident, truth=truth):
        return np.stack(
            [
                render_face(ident, world.size, h, r, o, not b)
                for h, r, o, b in zip(heads, truth["tilt"], openings, truth["blink"], strict=True)
            ]
        )

    true = render()
    x = torch.from_numpy(true).permute(0, 3, 1, 2).float()
    variants = {
        "true": true,
        "mouth shifted 3 frames": render(openings=np.roll(env, 3)),
        "mouth reversed": render(openings=env[::-1]),
        "frozen (first frame)": np.repeat(true[:1], len(true), 0),
        "head jitter ±1.5 px": render(
            heads=[[hx + rng.uniform(-1.5, 1.5), hy + rng.uniform(-1.5, 1.5)] for hx, hy in truth["head"]]
        ),
        "blur 3x3 box": torch.nn.functional.avg_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).round().byte().numpy(),
        "noise σ=60": np.clip(true + rng.normal(0, 60, true.shape), 0, 255).astype(np.uint8),
        "uniform noise": rng.integers(0, 256, true.shape, dtype=np.uint8),
    }
    for name, frames in variants.items():
        table.setdefault(name, []).append(score_clip(frames, env, ref))

print(f"{n} clips of PortraitWorld(seed=0), 16 frames 32x32 at 8 fps; mean [min, max]")
print("| clip | lip_sync | motion | quality |\n|---|---|---|---|")
for name, rows in table.items():
    cells = []
    for dim in ("lip_sync", "motion", "quality"):
        v = np.array([r[dim] for r in rows])
        cells.append(f"{v.mean():.2f} [{v.min():.2f}, {v.max():.2f}]")
    print(f"| {name} | " + " | ".join(cells) + " |")
print("\npairs (true vs degraded) kept per dimension at margin 0.05, and how often the true clip wins:")
for name, rows in table.items():
    if name == "true":
        continue
    kept = {d: preference_pairs(table["true"], rows, d, 0.05) for d in ("lip_sync", "motion", "quality")}
    print(
        f"- {name}: " + ", ".join(f"{d} {len(p)}/{n} (true wins {sum(w == 0 for _, w in p)})" for d, p in kept.items())
    )
