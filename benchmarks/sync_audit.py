"""Where one mmpo training step waits for the accelerator: every host read, by call site.

    .venv/bin/python benchmarks/sync_audit.py --preset tiny --images 3
    python3 benchmarks/sync_audit.py --preset small --images 3 --cuda-debug     # on a GPU

Trains the preset's model for three steps, as bench_dpo.py's mmpo run does (``runners.run_mmpo``), and
records one step (forward, backward, optimizer step, logging) with ``mmpo.diagnostics.count_device_syncs``,
which works on the CPU too. On a GPU, ``--cuda-debug`` also turns on torch's own detector
(``torch.cuda.set_sync_debug_mode("warn")``) for that step and counts its warnings by call site; it
sees what the counter cannot (blocking copies between host and device).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from presets import PRESETS, build_model, write_data  # noqa: E402
from runners import run_mmpo  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument(
        "--reference", choices=["auto", "cached"], default="auto", help="cached: reference log-probs cached"
    )
    ap.add_argument("--naive", action="store_true", help="shared_prefix=False (the prompt once per response)")
    ap.add_argument("--cuda-debug", action="store_true", help="also count torch's CUDA sync warnings")
    ap.add_argument("--workdir", default="runs/bench")
    args = ap.parse_args(argv)

    import lightning as L
    import torch

    from mmpo.diagnostics import count_device_syncs

    preset = PRESETS[args.preset]
    cuda = preset.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset.name!r} needs a CUDA GPU")
    root = Path(args.workdir)
    model = build_model(preset, root)
    batch = preset.batch[args.images]
    data = write_data(preset, args.images, batch * 3, root)
    audited = 2  # the third step: caches, allocator and lazy imports are warm
    found: dict[str, object] = {}
    cuda_sites: collections.Counter[str] = collections.Counter()

    def cuda_warning(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            site = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
            cuda_sites[site] += 1

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if batch_idx == audited:
                found["cm"] = count_device_syncs()
                found["report"] = found["cm"].__enter__()
                if args.cuda_debug:
                    found["showwarning"] = warnings.showwarning
                    warnings.simplefilter("always")
                    warnings.showwarning = cuda_warning
                    torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if batch_idx == audited:
                if args.cuda_debug:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("default")
                    warnings.showwarning = found["showwarning"]
                found["cm"].__exit__(None, None, None)

    run_mmpo(preset, model, data, args.images, steps=1, warmup=audited, shared_prefix=not args.naive,
             cached_reference=args.reference == "cached", callbacks=[Probe()])  # fmt: skip
    report = found["report"]
    mode = "naive" if args.naive else "shared prefix"
    print(f"\n{preset.name}, {args.images} image(s), {batch} pairs, {mode}, reference {args.reference}:", end=" ")
    print(f"step {audited + 1}")
    print(report.table())
    own = sum(n for site, n in report.sites().items() if re.match(r"(mmpo|datamodules)/", site))
    print(f"{own} of them in mmpo's own code")
    if args.cuda_debug:
        print(f"\ntorch.cuda sync debug mode: {sum(cuda_sites.values())} synchronizing operations")
        for site, n in cuda_sites.most_common():
            print(f"{n:>5}  {site}")


if __name__ == "__main__":
    main()
