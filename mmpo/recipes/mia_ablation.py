"""``mmpo mia-demo --seeds ... [--ablation]``: the MIA-DPO demonstration over several draws, and the filter ablation.

For each seed, in ``WORKDIR/seed<S>``: the world, the pretrained tiny LLaVA and the SFT model of
``mmpo mia-demo --seed S``, the SFT model's probe figures, one build, then the preference stage on
each training set and its probe figures. With ``--ablation`` the build keeps every *candidate* (a
wrong answer passing every check but attention: ``selection.filter=none``) and three training sets
come from the same answers (:func:`augment.mia.candidates.write_selection`):

- ``none``: every candidate;
- ``attention``: the candidates at or below the threshold, a quantile of the candidates' ratios per
  format and image count (``--attention-quantile``, 0.5 by default) or the paper's thresholds
  (``--attention-quantile paper``);
- ``random_matched``: per format and count, a seeded random subset as large as ``attention``'s.

Without ``--ablation`` the build's own ``train.jsonl`` is trained on (``build``). Probes report on
``REPORT_PROBE_SEED`` (held-out scenes) unless ``--probe-seed`` says otherwise. The table (mean ± sample
std over seeds) is printed and written with every per-seed figure to ``WORKDIR/ablation.json``; each
seed's target-attention histograms (wrong vs right answers, per format and count) go to
``WORKDIR/seed<S>/attention_ratios.png``, all seeds pooled to ``WORKDIR/attention_ratios.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from mmpo.recipes.mia_demo import (
    REPORT_PROBE_SEED,
    ROWS,
    prepare,
    probe_callback,
    probe_figures,
    resolve_config,
    stage_cli,
)
from mmpo.recipes.report import spread

__all__ = ["ABLATION_MODES", "format_table", "merge", "mode_config", "pooled_thresholds", "report", "run", "summarise"]

ABLATION_MODES = ("none", "attention", "random_matched")
# (text of dpo.yaml, its replacement for a mode): the mode's training file and its own output folders
_MODE_EDITS = (
    ("runs/mia_dpo/mia-data/train.jsonl", "runs/mia_dpo/mia-data/train-{mode}.jsonl"),
    ("default_root_dir: runs/mia_dpo/dpo\n", "default_root_dir: runs/mia_dpo/dpo-{mode}\n"),
    ("name: dpo\n", "name: dpo-{mode}\n"),
    ("save_dir: runs/mia_dpo/dpo-adapter", "save_dir: runs/mia_dpo/dpo-{mode}-adapter"),
)


def mode_config(config: Path, mode: str, out: Path) -> Path:
    """``out``: ``config`` (dpo.yaml) training on ``mia-data/train-<mode>.jsonl``, writing under ``dpo-<mode>``."""
    text = config.read_text()
    for old, new in _MODE_EDITS:
        if text.count(old) != 1:
            raise ValueError(f"{config}: expected {old.strip()!r} exactly once, found it {text.count(old)} times")
        text = text.replace(old, new.format(mode=mode))
    out.write_text(text)
    return out


def summarise(runs: list[dict], columns: list[str]) -> dict[str, dict[str, list[float]]]:
    """``{column: {metric: [value per seed]}}`` from per-seed ``{"before": ..., "after": {mode: ...}}``.

    Column ``SFT`` is the SFT model; the others are modes. A metric missing in one seed is left out.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for column in columns:
        figures = [r["before"] if column == "SFT" else r["after"][column] for r in runs]
        keys = set.intersection(*(set(f) for f in figures)) if figures else set()
        out[column] = {k: [f[k] for f in figures] for k in sorted(keys)}
    return out


def _cell(values: list[float] | None) -> str:
    return spread(values or [])


def format_table(summary: dict[str, dict[str, list[float]]], settings: list[str], prefix: str = "val") -> list[str]:
    """One row per setting and metric, one column per model: mean ± sample std over seeds (mean alone for one)."""
    columns = list(summary)
    label_width = max(len(f"{s} {label}") for s in settings for _, label in ROWS) + 2
    lines = [f"{'':<{label_width}}" + "".join(f"{c:>18}" for c in columns)]
    for setting in settings:
        for key, label in ROWS:
            name = f"{prefix}/hallucination/{setting}/{key}"
            cells = [_cell(summary[c].get(name)) for c in columns]
            if any(cell != "-" for cell in cells):
                lines.append(f"{setting + ' ' + label:<{label_width}}" + "".join(f"{cell:>18}" for cell in cells))
    return lines


def _selection_settings(build_summary: dict, mode: str, quantile: float | None):
    from augment.mia.build_config import SelectionSettings

    settings = SelectionSettings(**build_summary["config"]["selection"])
    return dataclasses.replace(settings, filter=mode, attention_quantile=quantile if mode != "none" else None)


def _one_seed(args: argparse.Namespace, seed: int, workdir: Path, configs: Path, quantile: float | None) -> dict:
    from augment.mia.build import main as build_main
    from augment.mia.candidates import write_selection
    from mmpo.plot import plot_ratio_histograms

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    prepare(workdir, args.n_train, args.n_val, seed, args.vision_steps, args.language_steps, args.sft_text_lists)
    sft_extra = [f"--trainer.max_epochs={args.sft_epochs}"] if args.sft_epochs else []
    sft = stage_cli(configs / "sft.yaml", workdir, sft_extra)
    sft.trainer.fit(sft.model, datamodule=sft.datamodule)
    seconds["prepare and sft"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    overrides = [f"--{kv}" for kv in args.build_arg]
    overrides += ["--selection.balance_yes_no=true"] if args.balance_yes_no else []
    overrides += ["--selection.filter=none"] if args.ablation else []
    build = build_main(["--config", str(resolve_config(configs / "build.yaml", workdir)), *overrides])
    out = Path(build.summary["config"]["output"])
    pairs = {}
    for mode in ABLATION_MODES if args.ablation else ():
        selection = _selection_settings(build.summary, mode, quantile).build()
        written = write_selection(out, selection, build.summary["config"]["seed"], f"train-{mode}.jsonl")
        pairs[mode] = {k: v for k, v in written.items() if k != "decisions"}
    modes = list(ABLATION_MODES) if args.ablation else ["build"]
    pairs.setdefault("build", {"kept": build.summary["kept"]})
    seconds["build"] = round(time.perf_counter() - t0, 1)
    lines = {key: {"paper": value} for key, value in build.summary["thresholds"].items()}
    for key, value in pairs.get("attention", {}).get("thresholds", {}).items():
        if quantile is not None:
            lines.setdefault(key, {})[f"q={quantile:g}"] = value
    if build.summary["ratios"]:  # none when every answer was empty
        plot_ratio_histograms(
            build.summary["ratios"], workdir / "attention_ratios.png", lines, f"target-attention ratio, --seed {seed}"
        )

    before, after = {}, {}
    extra = [f"--trainer.max_epochs={args.dpo_epochs}"] if args.dpo_epochs else []
    for mode in modes:
        t0 = time.perf_counter()
        config = configs / "dpo.yaml"
        if mode != "build":
            config = mode_config(config, mode, workdir / f"dpo-{mode}.yaml")
        dpo = stage_cli(config, workdir, extra)
        probe_callback(dpo.trainer, args.probes, args.probe_seed)
        if not before:  # the LoRA starts at zero: the first mode's untrained model is the SFT model
            before = probe_figures(dpo.trainer.validate(dpo.model, datamodule=dpo.datamodule, verbose=False))
        dpo.trainer.fit(dpo.model, datamodule=dpo.datamodule)
        after[mode] = probe_figures(dpo.trainer.validate(dpo.model, datamodule=dpo.datamodule, verbose=False))
        seconds[f"dpo {mode}"] = round(time.perf_counter() - t0, 1)
    build_summary = {k: v for k, v in build.summary.items() if k not in ("ratios", "config")}
    return {
        "seed": seed,
        "before": before,
        "after": after,
        "pairs": pairs,
        "build": build_summary,
        "ratios": build.summary["ratios"],
        "thresholds": lines,
        "seconds": seconds,
    }


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """``mmpo mia-demo`` with ``--seeds`` and/or ``--ablation``: see the module docstring."""
    start = time.perf_counter()
    workdir, configs = Path(args.workdir), Path(args.configs)
    for name in ("sft.yaml", "build.yaml", "dpo.yaml"):
        if not (configs / name).is_file():
            parser.error(f"{configs / name} not found: run from the repository root or pass --configs")
    try:
        quantile = None if args.attention_quantile == "paper" else float(args.attention_quantile)
    except ValueError:
        parser.error(f"--attention-quantile: a number in (0, 1] or 'paper', got {args.attention_quantile!r}")
    if quantile is not None and not 0.0 < quantile <= 1.0:
        parser.error(f"--attention-quantile must be in (0, 1], got {quantile}")
    if args.probe_seed is None:
        args.probe_seed = REPORT_PROBE_SEED
    seeds = args.seeds or [args.seed]
    runs = []
    for seed in seeds:
        seed_dir = workdir / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        print(f"[mmpo] mia-demo: seed {seed} in {seed_dir}")
        runs.append(_one_seed(args, seed, seed_dir, configs, quantile))

    return report(runs, workdir, args.probe_seed, args.attention_quantile, time.perf_counter() - start)


def report(
    runs: list[dict], workdir: Path, probe_seed: int, attention_quantile: str, total: float | None = None
) -> dict:
    """Print the table of ``runs`` (per-seed results), write ``workdir/ablation.json`` and the pooled histograms."""
    from mmpo.plot import plot_ratio_histograms

    workdir.mkdir(parents=True, exist_ok=True)
    seeds = [r["seed"] for r in runs]
    modes = list(runs[0]["after"])
    summary = summarise(runs, ["SFT", *modes])
    settings = sorted({k.split("/")[2] for k in runs[0]["before"]}, key=lambda s: (s != "single", s))
    pooled: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for key, groups in r["ratios"].items():
            for status, values in groups.items():
                pooled.setdefault(key, {}).setdefault(status, []).extend(values)
    if pooled:
        plot_ratio_histograms(
            pooled, workdir / "attention_ratios.png", pooled_thresholds(runs),
            f"target-attention ratio of the SFT model's answers, wrong and right, seeds {seeds}",
        )  # fmt: skip
    lines = [
        "",
        f"mmpo mia-demo: hallucination probes (probe seed {probe_seed}) over seeds {seeds}, "
        + ("mean ± std" if len(seeds) > 1 else "one seed"),
        "",
        *format_table(summary, settings),
        "",
        "pairs per seed: " + "; ".join(f"{r['seed']}: " + ", ".join(f"{m} {p['kept']}" for m, p in r["pairs"].items()
                                                                    if m in modes) for r in runs),
        f"attention quantile: {attention_quantile}; ratio AUC (P(wrong < right)) per seed: "
        + "; ".join(f"{r['seed']}: {r['build']['ratio_auc']}" for r in runs),
    ]  # fmt: skip
    if total is not None:
        lines.append(f"total {total:.0f} s")
    print("\n".join(lines))
    result = {"seeds": seeds, "probe_seed": probe_seed, "attention_quantile": attention_quantile, "modes": modes,
              "summary": summary, "runs": runs, "total_seconds": total}  # fmt: skip
    (workdir / "ablation.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def pooled_thresholds(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per panel: each threshold the seeds share as it is, one that differs by seed as its mean over the seeds."""
    out: dict[str, dict[str, float]] = {}
    for key in {k for r in runs for k in r["thresholds"]}:
        names = {n for r in runs for n in r["thresholds"].get(key, {})}
        for name in sorted(names):
            values = [r["thresholds"][key][name] for r in runs if r["thresholds"].get(key, {}).get(name) is not None]
            if not values:
                continue
            label = name if len(set(values)) == 1 else f"{name} (mean of {len(values)} seeds)"
            out.setdefault(key, {})[label] = statistics.fmean(values)
    return out


def merge(files: list[Path], workdir: Path, attention_quantile: str | None = None) -> dict:
    """``mmpo mia-demo --report A.json B.json ... --workdir W``: one table over the seeds of several runs.

    Each file is an ``ablation.json`` written by ``--seeds``/``--ablation`` (for example one process per
    seed); they must share the probe seed, the modes and the attention quantile, and name no seed twice.
    """
    results = []
    for f in files:
        try:
            results.append(json.loads(Path(f).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"mmpo mia-demo --report: cannot read {f}: {e}") from e
    for key in ("probe_seed", "modes", "attention_quantile"):
        values = {json.dumps(r.get(key)) for r in results}
        if len(values) > 1:
            raise SystemExit(f"mmpo mia-demo --report: the files differ in {key}: {sorted(values)}")
    runs = [run for r in results for run in r["runs"]]
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"mmpo mia-demo --report: a seed appears twice among {seeds}")
    quantile = results[0].get("attention_quantile") or attention_quantile
    return report(runs, workdir, results[0]["probe_seed"], quantile if quantile is not None else "not recorded")
