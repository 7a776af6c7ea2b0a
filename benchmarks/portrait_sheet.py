"""Contact sheet of the portrait world for docs/tlpo.md: one clip's frames over its envelope and measured mouth.

python benchmarks/portrait_sheet.py docs/images/portrait-world.png
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from datamodules.worlds.portrait import PortraitWorld  # noqa: E402
from mmpo.portrait_critics import measure_mouth  # noqa: E402

world = PortraitWorld(seed=0)
fig, axes = plt.subplots(4, 1, figsize=(10, 6.4), gridspec_kw={"height_ratios": [1, 1, 1, 1.6]})
for row, index in enumerate((0, 2, 3)):
    record = world.record("train", index)
    frames = world.frames(record)
    axes[row].imshow(np.concatenate(list(frames), axis=1), interpolation="nearest")
    axes[row].set_axis_off()
    axes[row].set_title(f"{record['id']} ({record['identity']}), 16 frames 32x32 at 8 fps", fontsize=8, loc="left")
record = world.record("train", 0)
mouth = measure_mouth(world.frames(record)).numpy()
t = np.arange(len(mouth))
axes[3].plot(t, record["envelope"], "o-", label="audio envelope (from the WAV)")
axes[3].plot(t, mouth / mouth.max(), "s--", label="mouth opening measured from pixels (scaled)")
axes[3].set_xlabel("frame")
axes[3].set_xlim(-0.5, len(mouth) - 0.5)
axes[3].legend(fontsize=8, loc="upper left")
axes[3].set_title(
    f"{record['id']}: lip-sync critic r = {np.corrcoef(mouth, record['envelope'])[0, 1]:.3f}", fontsize=8, loc="left"
)
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=110)
print(sys.argv[1])
