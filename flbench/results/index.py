"""`records/index.csv`: one readable line per RunRecord (the files themselves are named by config hash).

Rebuilt from the records every time (never appended to), under an flock so that parallel sweep jobs cannot
interleave; written atomically, so a reader never sees half a file. Files that are not complete records are listed
with why, so the index also shows what `python -m flbench.report` would refuse.
"""

from __future__ import annotations

import csv
import fcntl
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flbench.io import atomic_write
from flbench.results.tables import order_metrics, records_folder, scan_records

INDEX_NAME = "index.csv"
COLUMNS = ("file", "name", "method", "protocol", "dataset", "scenario", "backbone", "seed", "clients", "rounds",
           "metric", "best_val", "last", "finished_at", "problem")


def _row(path_name: str, record: Mapping[str, Any]) -> dict[str, Any]:
    cfg = record["config"]
    name = lambda group: (cfg.get(group) or {}).get("name", "")  # noqa: E731
    metrics = order_metrics(list(record["metrics"]))
    headline = metrics[0] if metrics else ""
    values = record["metrics"].get(headline, {})
    return {"file": path_name, "name": record.get("name", ""), "method": name("algorithm"),
            "protocol": name("protocol"), "dataset": name("dataset"), "scenario": name("scenario"),
            "backbone": name("backbone"), "seed": record.get("seed"), "clients": cfg.get("num_clients"),
            "rounds": cfg.get("num_rounds"), "metric": headline, "best_val": values.get("best_val"),
            "last": values.get("last"), "finished_at": record.get("finished_at", ""), "problem": ""}


def write_index(results_dir: str | Path) -> Path:
    """Rewrite `<records folder>/index.csv`; returns its path."""
    folder = records_folder(results_dir)
    with open(folder / ".index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records, unusable = scan_records(results_dir)
        rows = [_row(path.name, record) for path, record in records]
        rows += [{**dict.fromkeys(COLUMNS, ""), "file": path.name, "problem": why} for path, why in unusable]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        path = atomic_write(folder / INDEX_NAME, lambda f: f.write(buffer.getvalue()), mode="w")
    path.chmod(0o644)
    return path
