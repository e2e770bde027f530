"""The leaderboard: the aggregated table as a W&B Table (one run of job type "leaderboard") and as local files.

The local markdown/HTML copy is always written, so the leaderboard exists without a W&B account; the W&B run is
offline unless the user asks for online mode (then `wandb sync` or online mode publishes it to the project). The run
joins the W&B group of the runs it tabulates (a sweep's group), so the sweep and its leaderboard sit together.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flbench.io import atomic_write
from flbench.results.render import row_values, to_html, to_markdown
from flbench.results.tables import Table, row_titles
from flbench.results.wandb_logger import check_run_folder

log = logging.getLogger(__name__)

TABLE_KEY = "leaderboard"


def leaderboard_rows(table: Table) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows for a W&B Table: numbers stay numbers (mean and std side by side) so W&B can sort them."""
    columns = row_titles(table)
    for column in table.columns:
        columns += [column.title, f"{column.title} (std)"]
    columns.append("seeds")
    data = []
    for row, line in zip(table.rows, table.cells):
        values: list[Any] = row_values(table, row)
        for cell in line:
            values += [cell.mean, cell.std]
        values.append(max((c.n for c in line), default=0))
        data.append(values)
    return columns, data


def write_local(table: Table, out_dir: str | Path, title: str = "flbench leaderboard") -> list[Path]:
    out = Path(out_dir)
    paths = [atomic_write(out / "leaderboard.md", lambda f: f.write(f"# {title}\n\n{to_markdown(table)}"), mode="w"),
             atomic_write(out / "leaderboard.html", lambda f: f.write(to_html(table, title)), mode="w")]
    for path in paths:
        path.chmod(0o644)  # temp files are created private; a leaderboard is meant to be read
    return paths


def push_wandb(table: Table, project: str = "flbench", entity: str | None = None, mode: str = "offline",
               run_dir: str | Path = "results", name: str = "leaderboard",
               config: dict[str, Any] | None = None, group: str | None = None) -> str:
    """Log the table as a W&B Table in its own run (in `group`); returns that run's local folder, which W&B puts
    under `<run_dir>/wandb/`."""
    import wandb

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    columns, data = leaderboard_rows(table)
    run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), name=name, job_type="leaderboard",
                     group=group, config=config or {}, reinit="finish_previous")
    folder = str(Path(run.dir).parent)
    try:
        run.log({TABLE_KEY: wandb.Table(columns=columns, data=data)})
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    if not run.disabled:
        check_run_folder(folder)  # a full disk leaves an empty run file without any error from wandb
    return folder
