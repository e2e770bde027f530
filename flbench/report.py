"""`python -m flbench.report`: paper-style tables, plots and the W&B leaderboard from a folder of RunRecords.

    python -m flbench.report results                                  # markdown table of every record
    python -m flbench.report results --filter scenario.name=base2novel --rows algorithm.name \\
        --columns dataset.family --format latex --out table.tex
    python -m flbench.report results --plots figures/                 # accuracy per round, per-client spread
    python -m flbench.report results --wandb --project flbench         # leaderboard: W&B Table + local md/html

Reading records never trains anything: rerunning a report is cheap and always gives the same table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flbench.io import atomic_write
from flbench.results.tables import (RENDERERS, SELECTIONS, ReportError, build_table, filter_records, load_records,
                                    parse_filters, render)

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
    p.add_argument("--format", default="markdown", choices=sorted(RENDERERS))
    p.add_argument("--out", default=None, help="write the table here instead of printing it")
    p.add_argument("--no-zeroshot", action="store_true", help="leave out the zero-shot row")
    p.add_argument("--no-efficiency", action="store_true", help="leave out params / MB per round / KV / wall time")
    p.add_argument("--caption", default="")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write PNG plots to DIR")
    p.add_argument("--plot-metric", default="test/global", help="history metric for the per-round plot")
    p.add_argument("--wandb", action="store_true", help="push the table as a W&B Table and write leaderboard.md/html")
    p.add_argument("--project", default="flbench", help="W&B project for --wandb")
    p.add_argument("--entity", default=None)
    p.add_argument("--wandb-mode", default="offline", choices=("offline", "online"),
                   help="offline (default) writes the run locally; sync it later with `wandb sync`")
    p.add_argument("--leaderboard-dir", default=None, help="where --wandb writes leaderboard.md/html and its run "
                   "(default: <results_dir>/leaderboard)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        records = filter_records(load_records(args.results_dir), parse_filters(args.filter))
        rows = _keys(args.rows)
        if not rows:
            raise ReportError("--rows needs at least one config key, e.g. algorithm.name")
        table = build_table(records, rows, _keys(args.columns), _keys(args.metrics) or None, args.selection,
                            zeroshot=not args.no_zeroshot, efficiency=not args.no_efficiency, caption=args.caption)
        text = render(table, args.format)
        if args.out:
            os.chmod(atomic_write(args.out, lambda f: f.write(text), mode="w"), 0o644)  # a table, not a secret
            log.info("table (%d records) written to %s", len(records), args.out)
        else:
            sys.stdout.write(text)
        if args.plots:
            from flbench.results.plots import plot_clients, plot_rounds

            out = Path(args.plots)
            written = [plot_rounds(records, rows, args.plot_metric, out / "rounds.png"),
                       plot_clients(records, rows, out / "clients.png")]
            log.info("plots: %s", ", ".join(str(p) for p in written if p))
        if args.wandb:
            from flbench.results.leaderboard import push_wandb, write_local

            board_dir = Path(args.leaderboard_dir or Path(args.results_dir) / "leaderboard")
            files = write_local(table, board_dir)
            run_dir = push_wandb(table, args.project, args.entity, args.wandb_mode, board_dir,
                                 config={"filters": args.filter, "rows": rows, "columns": _keys(args.columns),
                                         "selection": args.selection, "records": len(records)})
            log.info("leaderboard: %s; W&B run (%s) in %s", ", ".join(map(str, files)), args.wandb_mode, run_dir)
    except ReportError as error:
        print(f"flbench.report: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
