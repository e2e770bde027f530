"""PNG figures from RunRecords: accuracy per round (mean ± std band over seeds) and per-client accuracy spread.

Like the tables, plots are pure functions of the records (no training is ever rerun). matplotlib runs headless.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flbench.results.tables import ReportError, group_records

log = logging.getLogger(__name__)

# Per-client metrics in a history row, e.g. "test/personal/client/3" → ("test/personal", 3).
CLIENT_KEY = re.compile(r"^(?P<metric>test/.+?)/client/(?P<client>\d+)$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def round_curves(records: Sequence[Mapping[str, Any]], rows: Sequence[str], metric: str
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """label → (rounds, mean, std) of `metric` over the seeds of each row, on the rounds every seed has."""
    curves = {}
    for key, group in group_records(records, rows).items():
        series = [{int(r["round"]): float(r[metric]) for r in rec["history"] if metric in r} for rec in group]
        series = [s for s in series if s]
        if not series:
            continue
        common = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[s[r] for r in common] for s in series])
        curves[" · ".join(key)] = (np.array(common), values.mean(0), values.std(0, ddof=1) if len(series) > 1
                                   else np.zeros(len(common)))
    if not curves:
        raise ReportError(f"--plot-metric {metric!r} is in no record's history; e.g. test/global or val/global")
    return curves


def plot_rounds(records: Sequence[Mapping[str, Any]], rows: Sequence[str], metric: str, path: str | Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (rounds, mean, std) in round_curves(records, rows, metric).items():
        ax.plot(rounds, mean, marker="o", markersize=3, label=label)
        ax.fill_between(rounds, mean - std, mean + std, alpha=0.2)
    zeroshot = [float(r["zeroshot"][metric.split("/", 1)[1]]) for r in records
                if metric.startswith("test/") and metric.split("/", 1)[1] in (r.get("zeroshot") or {})]
    if zeroshot:
        ax.axhline(float(np.mean(zeroshot)), color="grey", linestyle="--", linewidth=1, label="zero-shot")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel(f"{metric} accuracy (%)")
    ax.set_title(f"{metric} per round (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def client_accuracies(record: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per-client final accuracies of one record: metric → values (from the last history row)."""
    per_metric: dict[str, list[tuple[int, float]]] = {}
    for key, value in (record["history"][-1] if record["history"] else {}).items():
        match = CLIENT_KEY.match(key)
        if match:
            per_metric.setdefault(match["metric"], []).append((int(match["client"]), float(value)))
    return {m: [v for _, v in sorted(pairs)] for m, pairs in per_metric.items()}


def plot_clients(records: Sequence[Mapping[str, Any]], rows: Sequence[str], path: str | Path) -> Path | None:
    """Box plot of per-client accuracies per row (all seeds pooled); None when no record has per-client metrics."""
    groups = {}
    for key, group in group_records(records, rows).items():
        for record in group:
            for metric, values in client_accuracies(record).items():
                groups.setdefault((metric, " · ".join(key)), []).extend(values)
    if not groups:
        log.info("no per-client metrics in these records (scenarios such as personal/dual report them): "
                 "skipping the per-client plot")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4), dpi=120)
    ax.boxplot(list(groups.values()), showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), [f"{label}\n{metric}" for metric, label in groups], fontsize=7)
    ax.set_ylabel("accuracy per client (%)")
    ax.set_title("per-client accuracy, last round (seeds pooled)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
