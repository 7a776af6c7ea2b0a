"""``mmpo plot RUN_DIR``: a run's reward curves, from its logs, in one PNG.

Reads Lightning's ``CSVLogger`` file (``metrics.csv``) and TensorBoard event files found under the run
directory (the newest version of each), and draws the TRL-named figures the module logs (see
:func:`mmpo.metrics.reward_metrics`) against the optimizer step: chosen and rejected rewards, their
margin, the reward accuracy and the loss, training and validation where logged. Training figures
logged every step are drawn as lines, their epoch means and the validation figures as markers.

Example:
    mmpo plot runs/quickstart/dpo          # writes runs/quickstart/dpo/reward_curves.png
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from datamodules.core.atomic import atomic_file

__all__ = [
    "PANELS",
    "PlotError",
    "Series",
    "find_logs",
    "main",
    "plot_ratio_histograms",
    "plot_run",
    "read_csv_metrics",
    "read_run",
    "read_tensorboard_metrics",
]

Series = dict[str, tuple[list[int], list[float]]]  # logged name -> (steps, values), in step order

# (title, y label, metrics): the metric names as the module logs them, after "train/" or "val/"
PANELS = (
    ("rewards: chosen and rejected", "reward", ("rewards/chosen", "rewards/rejected")),
    ("reward margin (chosen - rejected)", "margin", ("rewards/margins",)),
    ("reward accuracy", "accuracy", ("rewards/accuracies",)),
    ("loss", "loss", ("loss",)),
)
SPLITS = ("train", "val")
FIGSIZE, DPI = (12, 8), 100  # a 1200 x 800 PNG
_COLOURS = {"rewards/chosen": "tab:green", "rewards/rejected": "tab:red"}
# how each logged form is drawn: Lightning adds _step / _epoch to figures logged with on_step and on_epoch
_STYLES = {
    ("train", "_step"): {"linestyle": "-", "linewidth": 1.2},
    ("train", ""): {"linestyle": "-", "linewidth": 1.2},
    ("train", "_epoch"): {"linestyle": ":", "marker": "s", "markersize": 5},
    ("val", ""): {"linestyle": "--", "marker": "o", "markersize": 5},
    ("val", "_epoch"): {"linestyle": "--", "marker": "o", "markersize": 5},
}
_LABELS = {"_step": "", "": "", "_epoch": " (epoch mean)"}


class PlotError(Exception):
    """A run directory ``mmpo plot`` cannot draw; the message says why."""


def _log(message: str) -> None:
    print(f"[mmpo plot] {message}", flush=True)


def find_logs(run_dir: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """The newest ``metrics.csv`` under ``run_dir`` and the newest directory of TensorBoard event files."""
    root = Path(run_dir)
    if not root.is_dir():
        raise PlotError(f"{root} is not a directory")
    csvs = sorted(root.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    events = sorted(root.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    return (csvs[-1] if csvs else None), (events[-1].parent if events else None)


def read_csv_metrics(path: str | os.PathLike) -> Series:
    """Every numeric column of a Lightning ``metrics.csv`` against its ``step`` column (blank cells skipped)."""
    series: Series = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for name, cell in row.items():
                if name in ("step", "epoch") or name is None or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                steps, values = series.setdefault(name, ([], []))
                steps.append(int(float(step)))
                values.append(value)
    return series


def read_tensorboard_metrics(directory: str | os.PathLike) -> Series:
    """Every scalar of the TensorBoard event files in ``directory`` against its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})  # 0: keep every point
    accumulator.Reload()
    series: Series = {}
    for tag in accumulator.Tags().get("scalars", []):
        events = sorted(accumulator.Scalars(tag), key=lambda e: e.step)
        series[tag] = ([e.step for e in events], [e.value for e in events])
    return series


def read_run(run_dir: str | os.PathLike) -> tuple[Series, list[Path]]:
    """The run's logged series (the CSV's first, TensorBoard's for names the CSV lacks) and the files read."""
    csv_file, tb_dir = find_logs(run_dir)
    if csv_file is None and tb_dir is None:
        raise PlotError(f"no logs under {run_dir}: no metrics.csv (CSVLogger) and no TensorBoard event files")
    series: Series = {}
    sources: list[Path] = []
    if csv_file is not None:
        series.update(read_csv_metrics(csv_file))
        sources.append(csv_file)
    if tb_dir is not None:
        try:
            events = read_tensorboard_metrics(tb_dir)
        except ImportError:
            if csv_file is None:
                raise PlotError(f"{tb_dir} holds TensorBoard logs: pip install tensorboard to read them") from None
            _log(f"tensorboard is not installed: {tb_dir} not read")
        else:
            series.update({k: v for k, v in events.items() if k not in series})
            sources.append(tb_dir)
    return series, sources


def _panel_series(series: Series, metric: str) -> list[tuple[str, str, tuple[list[int], list[float]]]]:
    """(split, suffix, data) of one metric, in drawing order."""
    found = []
    for split in SPLITS:
        for suffix in ("_step", "", "_epoch"):
            name = f"{split}/{metric}{suffix}"
            if name in series and (split, suffix) in _STYLES and series[name][0]:
                if suffix == "" and f"{name}_step" in series:
                    continue
                found.append((split, suffix, series[name]))
    return found


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the run's reward curves into ``out`` (default ``RUN_DIR/reward_curves.png``) and return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series, sources = read_run(run_dir)
    _log(f"read {', '.join(str(s) for s in sources)}")
    drawn = {m: _panel_series(series, m) for _, _, metrics in PANELS for m in metrics}
    if not any(drawn.values()):
        wanted = ", ".join(f"train/{m}" for _, _, metrics in PANELS for m in metrics)
        logged = ", ".join(sorted(series)[:12]) or "nothing"
        raise PlotError(f"no reward metrics in {', '.join(map(str, sources))} (looked for {wanted}, val/...); "
                        f"logged: {logged}")  # fmt: skip
    out_path = Path(out) if out is not None else Path(run_dir) / "reward_curves.png"
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg backend, without touching pyplot's global one
    axes = figure.subplots(2, 2).ravel()
    for ax, (title, ylabel, metrics) in zip(axes, PANELS, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        plotted = 0
        for metric in metrics:
            for split, suffix, (steps, values) in drawn[metric]:
                label = f"{split}{_LABELS[suffix]}" + (f" {metric.split('/')[-1]}" if len(metrics) > 1 else "")
                colour = _COLOURS.get(metric, "tab:blue" if split == "train" else "tab:orange")
                ax.plot(steps, values, label=label, color=colour, **_STYLES[(split, suffix)])
                plotted += 1
        if plotted:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    figure.suptitle(f"{run_dir}")
    with atomic_file(out_path) as tmp:  # a reader never sees half a PNG
        figure.savefig(tmp, format="png")
    return out_path


def plot_ratio_histograms(
    ratios: dict[str, dict[str, list[float]]],
    out: str | os.PathLike,
    thresholds: dict[str, dict[str, float | None]] | None = None,
    title: str = "",
) -> Path:
    """MIA-DPO's target-attention ratio, wrong vs right answers, one panel per format and image count.

    Args:
        ratios: ``{"sequence/2": {"wrong": [...], "right": [...]}, ...}`` (a build summary's ``ratios``).
        out: the PNG to write.
        thresholds: per panel key, named thresholds drawn as vertical lines, e.g.
            ``{"sequence/2": {"paper": 0.8, "q=0.5": 0.47}}`` (None values are skipped).
        title: the figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted(ratios)
    if not keys:
        raise PlotError("no ratios to draw")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    figure = Figure(figsize=(5 * cols, 3.6 * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        groups = ratios[key]
        values_all = [v for status in ("wrong", "right") for v in groups.get(status, [])] or [0.0, 1.0]
        # bins over the data's own range: a small model's ratios crowd near 1/n, far from the paper's thresholds
        pad = max(0.005, 0.05 * (max(values_all) - min(values_all)))
        lo, hi = max(0.0, min(values_all) - pad), min(1.0, max(values_all) + pad)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)]
        for status, colour in (("wrong", "tab:red"), ("right", "tab:green")):
            values = groups.get(status, [])
            if values:
                ax.hist(values, bins=bins, alpha=0.5, color=colour, label=f"{status} ({len(values)})", density=True)
        styles = iter(("--", ":", "-."))
        for name, value in ((thresholds or {}).get(key) or {}).items():
            if value is not None and lo <= value <= hi:
                ax.axvline(value, color="black", linestyle=next(styles, "--"), label=f"{name} {value:.3f}")
            elif value is not None:  # a legend entry without a line
                ax.plot([], [], " ", label=f"{name} {value:.3f} ({'right' if value > hi else 'left'} of the axis)")
        ax.set_title(key)
        ax.set_xlabel("attention on the target / sum over images")
        ax.set_ylabel("density")
        ax.set_xlim(lo, hi)
        ax.legend(fontsize="small")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title)
    out_path = Path(out)
    with atomic_file(out_path) as tmp:
        figure.savefig(tmp, format="png")
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="mmpo plot",
        description="Draw a run's reward curves (chosen/rejected rewards, margins, accuracies, loss; train and "
        "val) from its CSVLogger metrics.csv and TensorBoard event files into one PNG.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="the run's directory (searched for metrics.csv and events.out.tfevents.*)"
    )
    parser.add_argument("-o", "--out", help="the PNG to write (default: RUN_DIR/reward_curves.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except PlotError as e:
        raise SystemExit(f"mmpo plot: {e}") from None
    print(f"wrote {path}")
