"""Picture of a partition: per-client class and domain histograms as stacked bars (a PNG for papers and sanity).

Works on what every RunRecord stores under "partition" (run.py `_partition_stats`), so any finished run can be
plotted without rerunning it:

    python -m flbench.datasets.partition_plot results/records/<hash>.json [out.png]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _stacked(ax: Any, histograms: np.ndarray, title: str, labels: Sequence[str] | None, cmap: str) -> None:
    import matplotlib.pyplot as plt

    clients, groups = histograms.shape
    colours = plt.get_cmap(cmap)(np.linspace(0, 1, max(groups, 2)))
    bottom = np.zeros(clients)
    for g in range(groups):
        if histograms[:, g].any():
            ax.bar(np.arange(clients), histograms[:, g], bottom=bottom, color=colours[g], width=0.85,
                   label=labels[g] if labels and groups <= 12 else None)
        bottom += histograms[:, g]
    ax.set_title(title)
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xticks(np.arange(clients))
    if labels and groups <= 12:
        ax.legend(fontsize="small", ncol=2)


def plot_partition(stats: Mapping[str, Any], path: str | Path, domain_names: Sequence[str] | None = None,
                   class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write a PNG with two panels — samples per class and per domain for each client — and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    classes = np.asarray(stats["class_histograms"])
    domains = np.asarray(stats["domain_histograms"])
    width = max(6.0, 0.45 * len(classes) + 2)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 7), constrained_layout=True)
    _stacked(top, classes, f"classes per client ({classes.shape[1]} classes)", class_names, "tab20")
    _stacked(bottom, domains, "domains per client", domain_names, "Set2")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_record(record_path: str | Path, out: str | Path | None = None) -> Path:
    record = json.loads(Path(record_path).read_text())
    domains = (record.get("config", {}).get("dataset") or {}).get("domains")
    out = out or Path(record_path).with_suffix(".partition.png")
    return plot_partition(record["partition"], out, domain_names=domains, title=record.get("name"))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m flbench.datasets.partition_plot RECORD.json [OUT.png]")
    print(plot_record(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
