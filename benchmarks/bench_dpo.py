"""DPO training throughput and peak memory: mmpo against TRL's DPOTrainer on the same LLaVA and data.

    .venv/bin/pip install -e '.[bench]'          # TRL, for the comparison only
    .venv/bin/python benchmarks/bench_dpo.py --preset tiny --images 1 3 --steps 10 --warmup 2 --out results.json

Each (preset, images, framework) runs in a fresh child process, so its peak RSS is its own; the
parent builds the model and data once, prints a table and writes JSON. Frameworks: ``mmpo``
(shared prompt pass), ``mmpo-naive`` (prompt and images once per response, as TRL does),
``mmpo-cached`` (shared prompt pass and reference log-probs computed before training; the caching
pass is timed on its own) and ``trl``. See benchmarks/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from presets import PRESETS, build_model, model_vocab, train_flops_per_pair, write_data  # noqa: E402

FRAMEWORKS = ("mmpo", "mmpo-naive", "mmpo-cached", "trl")
# Dense bf16 tensor-core peaks (FLOP/s) for the model FLOP utilisation column.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 3], help="images per prompt (1 and/or 3)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of " + ",".join(FRAMEWORKS)
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: cores)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per framework, interleaved; the best is reported")
    ap.add_argument("--workdir", default="runs/bench", help="where the models and data sets are written")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak, for MFU on unknown GPUs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one framework's run
    return ap.parse_args(argv)


def _child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from runners import check_response_tokens, run_mmpo, run_trl

    preset = PRESETS[args.preset]
    images = args.images[0]
    root = Path(args.workdir)
    model_dir = root / preset.name / "model"
    data = root / preset.name / f"data-{images}img-{preset.batch[images] * (args.steps + args.warmup)}" / "train.jsonl"
    if args.child == "trl":
        result = run_trl(preset, model_dir, data, images, args.steps, args.warmup)
    else:
        shared = args.child in ("mmpo", "mmpo-cached")
        cached = args.child == "mmpo-cached"
        result = run_mmpo(preset, model_dir, data, images, args.steps, args.warmup, shared, cached)
    check_response_tokens(result)
    result["torch_threads"] = torch.get_num_threads()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _run_child(args: argparse.Namespace, framework: str, images: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--child={framework}",
        f"--preset={args.preset}",
        f"--images={images}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--workdir={args.workdir}",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{framework} ({args.preset}, {images} image(s)) failed:\n{tail}")
    return json.loads(lines[-1].removeprefix("BENCH_RESULT "))


def _peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    if PRESETS[args.preset].device != "cuda":
        return None, platform.processor() or platform.machine()
    import torch

    name = torch.cuda.get_device_name(0)
    if args.peak_tflops:
        return args.peak_tflops * 1e12, name
    return next((v for k, v in PEAK_BF16.items() if k in name), None), name


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "lightning", "trl", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _table(rows: list[dict[str, Any]], with_mfu: bool) -> str:
    head = f"{'preset':<9}{'images':>7}  {'framework':<12}{'pairs/s':>9}{'× TRL':>8}{'peak MB':>10}{'mem/TRL':>9}"
    head += f"{'MFU':>8}" if with_mfu else f"{'train MB':>10}{'/TRL':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r['speedup_vs_trl']:.2f}" if r.get("speedup_vs_trl") else "-"
        mem = f"{r['memory_vs_trl']:.2f}" if r.get("memory_vs_trl") else "-"
        line = f"{r['preset']:<9}{r['images']:>7}  {r['framework']:<12}{r['pairs_per_s']:>9.3f}{speed:>8}"
        line += f"{r['peak_mb']:>10.0f}{mem:>9}"
        if with_mfu:
            line += f"{r['mfu'] * 100:>7.1f}%" if r.get("mfu") is not None else f"{'-':>8}"
        else:  # CPU: the peak RSS above the RSS right after the framework's imports
            above = f"{r['above_imports_vs_trl']:.2f}" if r.get("above_imports_vs_trl") else "-"
            line += f"{r.get('above_imports_mb', float('nan')):>10.0f}{above:>6}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse(argv)
    args.threads = args.threads or len(os.sched_getaffinity(0))
    if args.child:
        _child(args)
        return []
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    if unknown := set(frameworks) - set(FRAMEWORKS):
        raise SystemExit(f"unknown framework(s) {sorted(unknown)}; choose from {FRAMEWORKS}")
    preset = PRESETS[args.preset]
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"preset {preset.name!r} needs a CUDA GPU; none is available")
    if bad := [n for n in args.images if n not in preset.batch]:
        raise SystemExit(f"preset {preset.name!r} is defined for {sorted(preset.batch)} images, not {bad}")
    root = Path(args.workdir)
    load_before = os.getloadavg()[0]
    vocab = model_vocab(build_model(preset, root))
    peak, device = _peak_flops(args)
    rows: list[dict[str, Any]] = []
    for images in args.images:
        write_data(preset, images, preset.batch[images] * (args.steps + args.warmup), root)
        best: dict[str, dict[str, Any]] = {}
        runs: dict[str, list[float]] = {fw: [] for fw in frameworks}  # pairs/s of every run, in order
        for rep in range(args.repeats):
            for fw in frameworks:
                r = _run_child(args, fw, images)
                print(
                    f"  [{preset.name}, {images} img, run {rep + 1}] {fw}: {r['pairs_per_s']:.3f} pairs/s, "
                    f"{r['peak_mb']:.0f} MB",
                    flush=True,
                )
                runs[fw].append(r["pairs_per_s"])
                if fw not in best or r["pairs_per_s"] > best[fw]["pairs_per_s"]:
                    best[fw] = r
        trl = best.get("trl")
        for fw in frameworks:
            r = best[fw]
            shared = fw in ("mmpo", "mmpo-cached")  # cached also skips the reference pass: not counted here
            required = train_flops_per_pair(preset, images, r["prompt_tokens"], shared_prefix=True, vocab=vocab)
            executed = train_flops_per_pair(preset, images, r["prompt_tokens"], shared_prefix=shared, vocab=vocab)
            paired = [a / b for a, b in zip(runs[fw], runs["trl"], strict=True)] if trl else None
            row = {
                "preset": preset.name,
                "images": images,
                "framework": fw,
                "pairs_per_step": preset.batch[images],
                "pairs_per_s": r["pairs_per_s"],
                "peak_mb": r["peak_mb"],
                "speedup_vs_trl": r["pairs_per_s"] / trl["pairs_per_s"] if trl else None,
                "memory_vs_trl": r["peak_mb"] / trl["peak_mb"] if trl else None,
                "runs_pairs_per_s": runs[fw],
                # each repeat against TRL's run of the same repeat (adjacent in time): the spread of the ratio
                "paired_speedups_vs_trl": paired,
                "median_paired_speedup_vs_trl": statistics.median(paired) if paired else None,
                "above_imports_vs_trl": (
                    r["above_imports_mb"] / trl["above_imports_mb"] if trl and trl.get("above_imports_mb") else None
                ),
                "flops_per_pair_required": required,
                "flops_per_pair_executed": executed,
                "mfu": required * r["pairs_per_s"] / peak if peak else None,
                "hfu": executed * r["pairs_per_s"] / peak if peak else None,
                **{k: v for k, v in r.items() if k not in ("pairs_per_s", "peak_mb")},
            }
            rows.append(row)
    print()
    print(
        f"{preset.name}: {preset.notes}; {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.threads} threads, {device}, load average {load_before:.1f} at start"
    )
    print(_table(rows, with_mfu=peak is not None))
    if args.repeats > 1:
        for r in rows:
            if r["framework"] != "trl" and r.get("paired_speedups_vs_trl"):
                paired = ", ".join(f"{x:.2f}" for x in r["paired_speedups_vs_trl"])
                median = r["median_paired_speedup_vs_trl"]
                print(f"{r['framework']}, {r['images']} img: × TRL run by run: {paired} (median {median:.2f})")
    for r in rows:
        if "cache_seconds" in r:
            n = r["pairs_per_step"] * (args.steps + args.warmup)
            print(
                f"mmpo-cached, {r['images']} img: caching pass over {n} pairs took {r['cache_seconds']:.2f} s "
                f"({n / r['cache_seconds']:.1f} pairs/s), outside the timed window"
            )
    if args.out:
        meta = {"args": vars(args) | {"child": None}, "device": device, "load_average_at_start": load_before}
        meta["versions"] = _versions()
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        print(f"results written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
