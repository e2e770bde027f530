"""Every committed table is the output of the front door: the two commands printed above it are
`python -m flbench --multirun +experiment=<name>` and `python -m flbench.report <its results_dir> ...`, and the
experiment file composes to exactly the grid the table shows (its rows, and its seeds in every cell)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from flbench.cli import CONF_DIR
from flbench.results.labels import value_label

ROOT = Path(__file__).resolve().parents[1]
TABLES = sorted((ROOT / "experiments").rglob("table*.md"))


def front_door(table: Path) -> tuple[str, list[str]]:
    """(experiment name, report arguments) from the ```bash block at the top of the table."""
    block = re.match(r"```bash\n(.*?)\n```", table.read_text(), flags=re.S)
    assert block, f"{table} does not start with its two commands in a ```bash block"
    sweep, report = block.group(1).splitlines()
    match = re.fullmatch(r"python -m flbench --multirun \+experiment=(\S+)", sweep)
    assert match, f"{table}: first command is not the front door: {sweep!r}"
    words = shlex.split(report)
    assert words[:3] == ["python", "-m", "flbench.report"], f"{table}: second command is not the report: {report!r}"
    return match.group(1), words[3:]


def grid(name: str) -> tuple[dict, dict[str, list[str]]]:
    data = yaml.safe_load((Path(CONF_DIR) / "experiment" / f"{name}.yaml").read_text())
    params = data.get("hydra", {}).get("sweeper", {}).get("params", {})
    # a config-group key ("+backbone/attention", "algorithm") names the same thing as its dotted config key
    return data, {key.lstrip("+").replace("/", "."): [v.strip() for v in str(values).split(",")]
                  for key, values in params.items()}


def table_rows(table: Path) -> list[str]:
    lines = [line for line in table.read_text().splitlines() if line.startswith("|")]
    return [line.split("|")[1].strip() for line in lines[2:]]


def test_there_are_tables():
    assert len(TABLES) >= 3, TABLES  # the glob must find the committed tables, or the check below checks nothing


@pytest.mark.parametrize("table", TABLES, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_each_table_is_the_output_of_its_experiment_file(table):
    name, report = front_door(table)
    data, params = grid(name)
    assert report[0] == data["results_dir"], "the report reads the records the sweep writes"
    rows_key = report[report.index("--rows") + 1]
    assert "," not in rows_key, "one key per row keeps the check exact"
    group = rows_key.removesuffix(".name")
    values = params.get(group, params.get(rows_key))
    assert values, f"{name} does not sweep {rows_key}, the table's rows"
    other = {k: v for k, v in params.items() if k not in (group, rows_key, "seed") and len(v) > 1}
    assert not other, f"{name} sweeps {sorted(other)}, which the table's rows do not show"
    shown = [row for row in table_rows(table) if row != "zero-shot"]
    assert sorted(shown) == sorted(value_label(rows_key, v) for v in values)
    seeds = len(params.get("seed", ["0"]))
    assert f"n = {seeds} seed" in table.read_text(), f"every cell holds {seeds} seeds"
