"""Figures from RunRecords, for papers: accuracy per round (mean and a band over seeds) and per-client spread.

Like the tables, plots are pure functions of the records (no training is ever rerun). Each figure is written as PDF
(vector, for LaTeX) and PNG; labels are human (labels.py), every legend entry says how many seeds it averages, the
band is the sample std, the standard error or a Student-t 95 % CI (`spread`), colours are the Okabe–Ito palette
(distinguishable with the common colour-vision deficiencies) with a new line style for every 8 curves past the
first 8, and the legend sits outside the axes so it never hides a curve. matplotlib runs headless.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flbench.results.labels import metric_label, value_label
from flbench.results.tables import SPREADS, Cell, ReportError, group_records

log = logging.getLogger(__name__)

# Per-client metrics in a history row, e.g. "test/personal/client/3" → ("test/personal", 3).
CLIENT_KEY = re.compile(r"^(?P<metric>test/.+?)/client/(?P<client>\d+)$")
# Okabe & Ito (2008), "Color Universal Design": safe for protanopia, deuteranopia and tritanopia.
OKABE_ITO = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FORMATS = ("pdf", "png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def curve_style(index: int) -> dict[str, Any]:
    """Colour i of the palette; past 8 curves the line style (and marker) changes, so 9+ methods stay apart."""
    return {"color": OKABE_ITO[index % len(OKABE_ITO)],
            "linestyle": LINE_STYLES[(index // len(OKABE_ITO)) % len(LINE_STYLES)],
            "marker": MARKERS[index % len(MARKERS)]}


def history_label(metric: str) -> str:
    """'test/global' → 'Global test accuracy (%)'; 'val/base' → 'Base validation accuracy (%)'."""
    split, _, name = metric.partition("/")
    kind = {"test": "test", "val": "validation"}.get(split)
    return f"{metric_label(name)} {kind} accuracy (%)" if kind else metric_label(metric)


def row_label(rows: Sequence[str], key: tuple[str, ...]) -> str:
    return " · ".join(value_label(k, v) for k, v in zip(rows, key))


def round_curves(records: Sequence[Mapping[str, Any]], rows: Sequence[str], metric: str, spread: str = "std"
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """label → (rounds, mean, band half-width, n seeds) of `metric`, on the rounds every seed has."""
    if spread not in SPREADS:
        raise ReportError(f"--spread {spread!r} is unknown; choose one of {sorted(SPREADS)}")
    curves = {}
    for key, group in group_records(records, rows).items():
        series = [{int(r["round"]): float(r[metric]) for r in rec["history"] if metric in r} for rec in group]
        series = [s for s in series if s]
        if not series:
            continue
        common = sorted(set.intersection(*(set(s) for s in series)))
        values = np.array([[s[r] for r in common] for s in series])
        band = np.zeros(len(common))
        if len(series) > 1:
            band = np.array([Cell(float(v.mean()), float(v.std(ddof=1)), len(v)).spread(spread) for v in values.T])
        curves[row_label(rows, key)] = (np.array(common), values.mean(0), band, len(series))
    if not curves:
        raise ReportError(f"--plot-metric {metric!r} is in no record's history; e.g. test/global or val/global")
    return curves


def plot_rounds(records: Sequence[Mapping[str, Any]], rows: Sequence[str], metric: str, path: str | Path,
                spread: str = "std") -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=150)
    for index, (label, (rounds, mean, band, n)) in enumerate(round_curves(records, rows, metric, spread).items()):
        style = curve_style(index)
        ax.plot(rounds, mean, markersize=3, linewidth=1.4, label=f"{label} (n={n})", **style)
        if n > 1:
            ax.fill_between(rounds, mean - band, mean + band, alpha=0.15, color=style["color"], linewidth=0)
    zeroshot = [float(r["zeroshot"][metric.split("/", 1)[1]]) for r in records
                if metric.startswith("test/") and metric.split("/", 1)[1] in (r.get("zeroshot") or {})]
    if zeroshot:
        ax.axhline(float(np.mean(zeroshot)), color="grey", linestyle=(0, (4, 2)), linewidth=1, label="zero-shot CLIP")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("communication round")
    ax.set_ylabel(history_label(metric))
    ax.set_title(f"mean and {SPREADS[spread]} over seeds", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
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


def plot_clients(records: Sequence[Mapping[str, Any]], rows: Sequence[str], path: str | Path) -> list[Path] | None:
    """Box plot of per-client accuracies per row (all seeds pooled); None when no record has per-client metrics."""
    groups: dict[tuple[str, str], list[float]] = {}
    seeds: dict[tuple[str, str], int] = {}
    for key, group in group_records(records, rows).items():
        for record in group:
            for metric, values in client_accuracies(record).items():
                groups.setdefault((metric, row_label(rows, key)), []).extend(values)
                seeds[(metric, row_label(rows, key))] = seeds.get((metric, row_label(rows, key)), 0) + 1
    if not groups:
        log.info("no per-client metrics in these records (scenarios such as personal/dual report them): "
                 "skipping the per-client plot")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4), dpi=150)
    boxes = ax.boxplot(list(groups.values()), showmeans=True, patch_artist=True)
    for index, box in enumerate(boxes["boxes"]):
        box.set(facecolor=OKABE_ITO[index % len(OKABE_ITO)], alpha=0.35)
    ax.set_xticks(range(1, len(groups) + 1),
                  [f"{label}\n{history_label(metric)}\n(n={seeds[(metric, label)]} seeds)"
                   for metric, label in groups], fontsize=7)
    ax.set_ylabel("test accuracy per client (%)")
    ax.set_title("per-client accuracy at the last round (seeds pooled)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> list[Path]:
    """The figure as PDF and PNG beside each other (`path`'s suffix is replaced)."""
    base = Path(path).with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        target = base.with_suffix(f".{fmt}")
        fig.savefig(target, bbox_inches="tight")  # "tight" keeps the outside legend in the file
        written.append(target)
    plt.close(fig)
    return written
