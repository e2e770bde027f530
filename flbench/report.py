"""`python -m flbench.report`: paper-style tables, plots and the W&B leaderboard from a folder of RunRecords.

    python -m flbench.report results                                  # markdown table of every record
    python -m flbench.report results --filter scenario.name=base2novel --rows algorithm.name \\
        --columns dataset.family --format latex --out table.tex
    python -m flbench.report results --plots figures/ --spread ci95   # accuracy per round (PDF + PNG), per client
    python -m flbench.report results --wandb                          # leaderboard: W&B Table + local md/html

Reading records never trains anything: rerunning a report is cheap and always gives the same table. A record file
that cannot be read stops the report (one line naming it); `--skip-unreadable` tabulates the rest and names the
skipped files in the table's notes and on stderr. The report also rewrites `records/index.csv` (one readable line
per record file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flbench.io import atomic_write
from flbench.results.render import RENDERERS, render
from flbench.results.tables import (SELECTIONS, SPREADS, ReportError, build_table, filter_records, load_records,
                                    parse_filters, skipped_note)

log = logging.getLogger("flbench.report")


def _keys(text: str | None) -> list[str]:
    return [k.strip() for k in (text or "").split(",") if k.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flbench.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", nargs="?", default="results", help="folder with records/ (default: results)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="keep records whose config has KEY=VALUE (dotted keys; VALUE may be a|b); repeatable")
    p.add_argument("--rows", default="algorithm.name", help="comma-separated config keys, one row per value")
    p.add_argument("--columns", default="", help="comma-separated config keys, one block of metric columns per value")
    p.add_argument("--metrics", default="", help="comma-separated metric names (default: all reported)")
    p.add_argument("--selection", default="best_val", choices=SELECTIONS,
                   help="which round's value: best-by-validation (default) or last")
    p.add_argument("--spread", default="std", choices=sorted(SPREADS),
                   help="what ± (and the plots' band) shows: sample std (default), standard error, or 95%% CI")
    p.add_argument("--show-n", action="store_true", help="print n in every cell (default: only when cells differ)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="tabulate the readable records when some files are not (they are named in the notes)")
    p.add_argument("--format", default="markdown", choices=sorted(RENDERERS))
    p.add_argument("--out", default=None, help="write the table here instead of printing it")
    p.add_argument("--no-zeroshot", action="store_true", help="leave out the zero-shot row")
    p.add_argument("--no-efficiency", action="store_true", help="leave out params / MB per round / KV / wall time")
    p.add_argument("--caption", default="")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write plots (PDF and PNG) to DIR")
    p.add_argument("--plot-metric", default="test/global", help="history metric for the per-round plot")
    p.add_argument("--wandb", action="store_true", help="push the table as a W&B Table and write leaderboard.md/html")
    p.add_argument("--project", default="flbench", help="W&B project for --wandb")
    p.add_argument("--entity", default=None)
    p.add_argument("--group", default=None, help="W&B group of the leaderboard run (default: the records' group)")
    p.add_argument("--wandb-mode", default="offline", choices=("offline", "online"),
                   help="offline (default) writes the run locally; sync it later with `wandb sync`")
    p.add_argument("--leaderboard-dir", default=None, help="where --wandb writes leaderboard.md/html "
                   "(default: <results_dir>/leaderboard); its W&B run goes to <results_dir>/wandb/ with the runs")
    return p


def records_group(records: Sequence[dict[str, Any]]) -> str | None:
    """The W&B group the records' runs share (a sweep's), or None when they have none or several."""
    groups = {(r.get("wandb") or {}).get("group") for r in records}
    return groups.pop() if len(groups) == 1 else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        loaded, skipped = load_records(args.results_dir, skip_unreadable=args.skip_unreadable)
        if skipped:
            log.warning("flbench.report: %s", skipped_note(skipped))
        _write_index(args.results_dir)
        records = filter_records(loaded, parse_filters(args.filter))
        rows = _keys(args.rows)
        if not rows:
            raise ReportError("--rows needs at least one config key, e.g. algorithm.name")
        table = build_table(records, rows, _keys(args.columns), _keys(args.metrics) or None, args.selection,
                            zeroshot=not args.no_zeroshot, efficiency=not args.no_efficiency, caption=args.caption,
                            spread=args.spread, show_n=True if args.show_n or skipped else None)
        if skipped:
            table.notes.append(skipped_note(skipped))
        text = render(table, args.format)
        if args.out:
            os.chmod(atomic_write(args.out, lambda f: f.write(text), mode="w"), 0o644)  # a table, not a secret
            log.info("table (%d records) written to %s", len(records), args.out)
        else:
            sys.stdout.write(text)
        if args.plots:
            _plots(records, rows, args)
        if args.wandb:
            _leaderboard(table, records, rows, args)
    except ReportError as error:
        print(f"flbench.report: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


def _write_index(results_dir: str) -> None:
    from flbench.results.index import write_index

    try:
        write_index(results_dir)
    except OSError as error:  # a read-only results folder still gets its table
        log.info("records/index.csv not written (%s)", error.strerror or error)


def _plots(records: Sequence[dict[str, Any]], rows: list[str], args: argparse.Namespace) -> None:
    from flbench.results.plots import plot_clients, plot_rounds

    out = Path(args.plots)
    written = plot_rounds(records, rows, args.plot_metric, out / "rounds", spread=args.spread)
    written += plot_clients(records, rows, out / "clients") or []
    log.info("plots: %s", ", ".join(str(p) for p in written))


def _leaderboard(table: Any, records: Sequence[dict[str, Any]], rows: list[str], args: argparse.Namespace) -> None:
    from flbench.results.leaderboard import push_wandb, write_local

    board_dir = Path(args.leaderboard_dir or Path(args.results_dir) / "leaderboard")
    files = write_local(table, board_dir)
    group = args.group or records_group(records)
    run_dir = push_wandb(table, args.project, args.entity, args.wandb_mode, args.results_dir, group=group,
                         config={"filters": args.filter, "rows": rows, "columns": _keys(args.columns),
                                 "selection": args.selection, "spread": args.spread, "records": len(records)})
    sync = f"; upload it with: wandb sync {run_dir}" if args.wandb_mode == "offline" else ""
    log.info("leaderboard: %s; W&B run (%s, group %s) in %s%s", ", ".join(map(str, files)), args.wandb_mode,
             group or "none", run_dir, sync)


if __name__ == "__main__":
    sys.exit(main())
