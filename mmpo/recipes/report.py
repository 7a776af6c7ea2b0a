"""How the demonstrations print a figure measured over seeds: the mean, and the sample standard deviation."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

__all__ = ["publish", "spread"]


def spread(values: list[float], sep: str = " ± ") -> str:
    """``"0.512 ± 0.034"``: mean and sample standard deviation to 3 decimals; one value alone, ``"-"`` for none."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f}{sep}{statistics.stdev(values):.3f}"


def publish(workdir: Path, lines: list[str], results: dict) -> dict:
    """Print a demonstration's table ``lines`` and write ``results`` (every figure) to ``workdir/results.json``."""
    print("\n".join(lines))
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results
