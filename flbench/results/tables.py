"""Paper-style tables as pure functions of RunRecords: group, average over seeds, render.

A table has one row per value of the `rows` config keys (e.g. `algorithm.name`) and one block of metric columns
per value of the `columns` keys (e.g. `dataset.family`). Each cell is the mean over the records in it ± their spread
(sample std by default; standard error or a Student-t 95 % confidence interval on request) with its n, and those
records must differ in nothing but their seed: a cell that would mix two configurations is refused with a message
naming the keys that differ, so a number in a table always means one thing; so is a table whose records of one
backbone come from two builds of it (another CPU type builds another tiny CLIP). A record file that cannot be read is
never dropped silently: the report refuses, or (asked to skip) names every skipped file in the table's notes.

Rules the numbers follow (the same as CoOp / CoCoOp / MaPLe tables):
- HM is the harmonic mean of the *averaged* base and novel accuracies, never the mean of per-seed HMs.
- The zero-shot row comes from the records' own `zeroshot` block (same backbone, same test splits). When every row
  key changes the zero-shot numbers (e.g. `--rows backbone.attention.name`: each row is its own backbone), zero-shot
  is a column beside each row's metrics instead of a second row per row.
- Best per column in bold: the highest accuracy; the lowest cost (the zero-shot row takes no part in cost columns);
  nothing in bold when the best value is shared (a tie points at nobody).
- A value identical over all seeds (zero-shot, deterministic methods) has no "± 0.00".
Rendering (markdown / LaTeX / CSV / HTML) is in render.py; human names for keys and metrics in labels.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flbench.errors import ConfigError
from flbench.metrics import harmonic_mean
from flbench.results.cost_columns import efficiency_columns
from flbench.results.labels import key_label, metric_label, value_label
from flbench.results.record import result_config

SELECTIONS = ("best_val", "last")
SPREADS = {"std": "sample std", "se": "standard error", "ci95": "95 % CI (Student t)"}
# "hm" is recomputed from the averaged pair it is the harmonic mean of (first pair present wins).
HM_PAIRS = (("base", "novel"), ("global", "personal"))
# Config groups whose values change the zero-shot numbers; rows keyed by them get one zero-shot row per value.
ZEROSHOT_GROUPS = ("dataset", "backbone", "scenario")
ZEROSHOT_LABEL = "zero-shot"


class ReportError(ConfigError):
    """A report that cannot be made as asked (empty folder, mixed cells, unknown key): one line, what to do."""


# --- records --------------------------------------------------------------------------------------------------
def records_folder(results_dir: str | Path) -> Path:
    root = Path(results_dir)
    folder = root / "records" if (root / "records").is_dir() else root
    if not folder.is_dir():
        raise ReportError(f"no records folder at {root}: run `python -m flbench results_dir={root}` first")
    return folder


def _read_record(path: Path) -> dict[str, Any]:
    """One record file as data (JSON only); ValueError says why it cannot be used."""
    try:
        record = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"unreadable ({error.strerror or error})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not JSON ({getattr(error, 'msg', error)})") from None
    if not isinstance(record, dict) or record.get("complete") is not True:
        raise ValueError("incomplete (not marked complete)")
    missing = [k for k in ("config", "metrics", "seed") if k not in record]
    if missing:
        raise ValueError(f"not a RunRecord (no {', '.join(missing)})")
    return record


def scan_records(results_dir: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[tuple[Path, str]]]:
    """([(file, RunRecord)] under `results_dir/records` or `results_dir`, [(file, why it is not usable)])."""
    records, unusable = [], []
    for path in sorted(records_folder(results_dir).glob("*.json")):
        try:
            records.append((path, _read_record(path)))
        except ValueError as error:
            unusable.append((path, str(error)))
    return records, unusable


def read_records(results_dir: str | Path) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    records, unusable = scan_records(results_dir)
    return [record for _, record in records], unusable


def load_records(results_dir: str | Path, skip_unreadable: bool = False
                 ) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """(records, skipped files). A file that is not a complete RunRecord is refused unless `skip_unreadable`: a
    table must never average 3 of 4 seeds without saying so."""
    folder = records_folder(results_dir)
    records, unusable = read_records(results_dir)
    if unusable and not skip_unreadable:
        path, why = unusable[0]
        more = f" and {len(unusable) - 1} more" if len(unusable) > 1 else ""
        raise ReportError(f"{len(unusable)} of {len(records) + len(unusable)} record files in {folder} cannot be used: "
                          f"{path.name} is {why}{more}; repair or delete them, or pass --skip-unreadable to tabulate "
                          f"the other {len(records)} (skipped files are then named in the table's notes)")
    if not records:
        raise ReportError(f"no complete RunRecords in {folder}: run `python -m flbench results_dir={folder.parent}` "
                          "first (incomplete or corrupt files are never read)")
    return records, unusable


def skipped_note(unusable: Sequence[tuple[Path, str]]) -> str:
    return (f"{len(unusable)} record file(s) skipped (--skip-unreadable): " +
            "; ".join(f"{path.name}: {why}" for path, why in unusable))


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists become JSON text so that they compare and print as one value."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


def record_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields a table can filter or group by: the result-determining config, flattened, with seed."""
    return flatten(result_config(record["config"]))


def parse_filters(items: Iterable[str]) -> dict[str, str]:
    filters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ReportError(f"--filter {item!r} must look like key=value, e.g. scenario.name=base2novel")
        filters[key.strip()] = value.strip()
    return filters


def _matches(value: Any, wanted: str) -> bool:
    return any(str(value) == w or json.dumps(value) == w for w in wanted.split("|"))


def filter_records(records: Sequence[Mapping[str, Any]], filters: Mapping[str, str]) -> list[Mapping[str, Any]]:
    """Records whose config has every `key=value` (`a|b` accepts either value)."""
    if not filters:
        return list(records)
    known = set().union(*(record_fields(r) for r in records)) if records else set()
    for key in filters:
        if key not in known:
            raise ReportError(f"--filter key {key!r} is in no record's config; known keys include "
                              f"{sorted(known)[:12]}")
    kept = [r for r in records if all(_matches(record_fields(r).get(k), v) for k, v in filters.items())]
    if not kept:
        raise ReportError(f"no record matches the filters {dict(filters)}")
    return kept


# --- the table --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None  # sample std over seeds; None with one seed or for derived values (HM)
    n: int = 0
    bold: bool = False

    @property
    def constant(self) -> bool:
        """Identical over all its seeds (zero-shot, a deterministic method): no spread to print."""
        return self.std is not None and self.n > 1 and self.std == 0.0

    def spread(self, kind: str = "std") -> float | None:
        """Half-width of the ± band: the sample std, its standard error, or a Student-t 95 % CI of the mean."""
        if self.std is None or self.n < 2:
            return None
        if kind == "std":
            return self.std
        se = self.std / math.sqrt(self.n)
        return se if kind == "se" else se * t_quantile_975(self.n - 1)


def t_quantile_975(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


@dataclass
class Column:
    label: str  # the key: metric name (with its block), or efficiency column name
    kind: str  # "accuracy" (higher is better) | "cost" (lower is better) | "count"
    unit: str = ""
    digits: int = 2
    title: str = ""  # what a reader sees: "Base", "shapes · HM", "trainable params"

    def __post_init__(self) -> None:
        self.title = self.title or self.label


@dataclass
class Table:
    row_keys: list[str]
    rows: list[tuple[str, ...]]
    columns: list[Column]
    cells: list[list[Cell]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    spread: str = "std"  # std | se | ci95: what ± shows
    show_n: bool = False  # n in every cell (cells differ in n, or files were skipped); else n is in the caption

    def value(self, row: Sequence[str], column: str) -> Cell:
        """The cell at a row label tuple and column label (handy in tests and notebooks)."""
        return self.cells[self.rows.index(tuple(row))][[c.label for c in self.columns].index(column)]


def _mean_std(values: Sequence[float]) -> Cell:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return Cell()
    return Cell(float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else None, int(arr.size))


def group_records(records: Sequence[Mapping[str, Any]], keys: Sequence[str]
                  ) -> dict[tuple[str, ...], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for record in records:
        fields = record_fields(record)
        groups.setdefault(tuple(str(fields.get(k, "–")) for k in keys), []).append(record)
    return dict(sorted(groups.items()))


def _follows_seed(key: str, fields: Sequence[Mapping[str, Any]]) -> bool:
    """A `*.seed` key equal to the run's seed in every record (`calibration.seed: ${seed}`): part of the seed, so
    the cell's ± covers it, not another configuration."""
    return key.rsplit(".", 1)[-1] == "seed" and all(f.get(key) == f.get("seed") for f in fields)


def _check_cell(records: Sequence[Mapping[str, Any]], label: str) -> None:
    """A cell averages seeds of ONE configuration; anything else varying is a mixed folder."""
    fields = [record_fields(r) for r in records]
    keys = set().union(*fields) - {"seed"}
    varying = {k: sorted({str(f.get(k)) for f in fields}) for k in sorted(keys)
               if len({json.dumps(f.get(k), default=str) for f in fields}) > 1 and not _follows_seed(k, fields)}
    if varying:
        # A different algorithm.name explains every other algorithm.* difference: name the choice, not its fallout.
        chosen = {k.rsplit(".", 1)[0] for k in varying if k.endswith(".name")}
        varying = {k: v for k, v in sorted(varying.items(), key=lambda kv: not kv[0].endswith(".name"))
                   if k.endswith(".name") or k.rsplit(".", 1)[0] not in chosen}
        shown = "; ".join(f"{k} ∈ {{{', '.join(v[:4])}{', …' if len(v) > 4 else ''}}}" for k, v in
                          list(varying.items())[:4])
        first = next(iter(varying))
        raise ReportError(f"mixed records in {label}: they differ in {shown}; add the key(s) to --rows/--columns "
                          f"or keep one value with --filter {first}=...")
    seeds = [r["seed"] for r in records]
    if len(set(seeds)) != len(seeds):
        raise ReportError(f"{label} holds two records with the same seed and config; delete the stale one")


def _check_builds(records: Sequence[Mapping[str, Any]]) -> None:
    """One backbone configuration, one build: records whose backbone (attention aside) is configured alike but was
    built into other weights come from another CPU type or library build (README), and their numbers differ."""
    builds: dict[str, set[str]] = {}
    for record in records:
        built = (record.get("backbone") or {}).get("build_sha1")  # absent in records made before it was stored
        if built:
            backbone = {k: v for k, v in (record["config"].get("backbone") or {}).items() if k != "attention"}
            builds.setdefault(json.dumps(backbone, sort_keys=True, default=str), set()).add(built)
    for backbone, shas in builds.items():
        if len(shas) > 1:
            raise ReportError(f"records of backbone {backbone} come from {len(shas)} builds (weights SHA-1 "
                              f"{', '.join(sorted(shas))}: other CPU types or library builds, other numbers); "
                              f"tabulate one machine's records (one results folder per machine)")


def order_metrics(names: Sequence[str]) -> list[str]:
    """The one metric order of tables, plots and the run summary, whatever order a record's JSON keeps: headline
    metrics (global, base, novel, …) before their breakdowns (domain/photo, …), the HM pairs first, HM last,
    otherwise alphabetical."""
    names = list(dict.fromkeys(names))
    first = [m for pair in HM_PAIRS for m in pair if m in names]
    return sorted(names, key=lambda m: (m == "hm", "/" in m, first.index(m) if m in first else len(first), m))


def metric_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Reported metrics of `records`, in `order_metrics` order."""
    return order_metrics([m for record in records for m in record["metrics"]])


def _hm_pair(metrics: Sequence[str]) -> tuple[str, str] | None:
    return next((pair for pair in HM_PAIRS if set(pair) <= set(metrics)), None)


def _metric_cells(values: Mapping[str, list[float]], metrics: Sequence[str]) -> dict[str, Cell]:
    cells = {m: _mean_std(values.get(m, [])) for m in metrics}
    pair = _hm_pair(list(values))
    if "hm" in metrics and pair:
        # HM of the averages (not the average of per-seed HMs).
        first, second = _mean_std(values[pair[0]]), _mean_std(values[pair[1]])
        cells["hm"] = Cell(harmonic_mean(first.mean, second.mean), None, first.n)
    return cells


def _selected(record: Mapping[str, Any], metric: str, selection: str) -> float | None:
    entry = record["metrics"].get(metric)
    return None if entry is None else float(entry[selection])


def build_table(records: Sequence[Mapping[str, Any]], rows: Sequence[str] = ("algorithm.name",),
                columns: Sequence[str] = (), metrics: Sequence[str] | None = None, selection: str = "best_val",
                zeroshot: bool = True, efficiency: bool = True, caption: str = "", spread: str = "std",
                show_n: bool | None = None) -> Table:
    """The table of `records` (already filtered): rows × (column blocks × metrics) + efficiency columns.
    `show_n=None`: n in every cell when cells differ in n, else once in the caption."""
    if not records:
        raise ReportError("no records to tabulate (empty folder or filters matched nothing)")
    if selection not in SELECTIONS:
        raise ReportError(f"--selection {selection!r} is unknown; choose one of {SELECTIONS}")
    if spread not in SPREADS:
        raise ReportError(f"--spread {spread!r} is unknown; choose one of {sorted(SPREADS)}")
    _check_builds(records)
    known = set().union(*(record_fields(r) for r in records))
    for key in (*rows, *columns):
        if key not in known:
            raise ReportError(f"--rows/--columns key {key!r} is in no record's config; e.g. {sorted(known)[:10]}")
    metrics = list(metrics or metric_names(records))
    missing = [m for m in metrics if not any(m in r["metrics"] for r in records)]
    if missing:
        raise ReportError(f"--metrics {missing} reported by no record; available: {metric_names(records)}")

    blocks = list(group_records(records, columns)) if columns else [()]
    block_label = {b: " · ".join(b) for b in blocks}
    block_title = {b: " · ".join(value_title(k, v) for k, v in zip(columns, b)) for b in blocks}
    # Rows that each change zero-shot (all keyed by ZEROSHOT_GROUPS): zero-shot is a column, not a row per row.
    zs_columns = zeroshot and all(k.split(".")[0] in ZEROSHOT_GROUPS for k in rows)
    prefixes = [f"{ZEROSHOT_LABEL} · ", ""] if zs_columns else [""]
    out_columns = [Column(f"{block_label[b]} · {z}{m}" if b else f"{z}{m}", "accuracy",
                          title=f"{block_title[b]} · {z}{metric_label(m)}" if b else f"{z}{metric_label(m)}")
                   for b in blocks for z in prefixes for m in metrics]
    eff = efficiency_columns(records) if efficiency else []
    out_columns += [Column(label, "cost", unit, digits) for label, unit, digits, _ in eff]
    notes = ["efficiency columns average over all of a row's column blocks"] if eff and len(blocks) > 1 else []

    table_rows: list[tuple[str, ...]] = []
    cells: list[list[Cell]] = []
    for row, row_records in group_records(records, rows).items():
        line: list[Cell] = []
        for block in blocks:
            members = [r for r in row_records if not columns or
                       tuple(str(record_fields(r).get(k, "–")) for k in columns) == block]
            if members:
                where = f"row {dict(zip(rows, row))}" + (f", column {block_label[block]}" if block else "")
                _check_cell(members, where)
            values = {m: [v for r in members if (v := _selected(r, m, selection)) is not None]
                      for m in {*metrics, *(x for p in HM_PAIRS for x in p)}}
            values = {m: v for m, v in values.items() if v}
            per_metric = _metric_cells(values, metrics)
            if zs_columns:
                zs = {m: [float(r["zeroshot"][m]) for r in members if m in (r.get("zeroshot") or {})]
                      for m in {*metrics, *(x for p in HM_PAIRS for x in p)}}
                zs_metric = _metric_cells({m: v for m, v in zs.items() if v}, metrics)
                line += [zs_metric[m] for m in metrics]
            line += [per_metric[m] for m in metrics]
        line += [_mean_std([v for r in row_records if (v := get(r)) is not None]) for _, _, _, get in eff]
        table_rows.append(row)
        cells.append(line)

    if zeroshot and not zs_columns:
        for row, line in _zeroshot_rows(records, rows, columns, blocks, metrics, [e[0] for e in eff]):
            table_rows.append(row)
            cells.append(line)
        # zero-shot rows first, as papers print the baseline on top
        zs = [i for i, r in enumerate(table_rows) if is_zeroshot_row(r)]
        order = zs + [i for i in range(len(table_rows)) if i not in zs]
        table_rows, cells = [table_rows[i] for i in order], [cells[i] for i in order]

    _embolden(out_columns, table_rows, cells)
    counts = {c.n for line, row in zip(cells, table_rows) if not is_zeroshot_row(row) for c, col in
              zip(line, out_columns) if c.mean is not None and col.kind == "accuracy"}
    show = len(counts) > 1 if show_n is None else show_n
    chosen = "best-by-validation" if selection == "best_val" else "last"
    seeds = f"n = {counts.pop()} seeds per cell" if len(counts) == 1 and not show else "n seeds in each cell"
    caption = caption or (f"test accuracy (%), mean ± {SPREADS[spread]} over seeds ({seeds}; no ± where all seeds "
                          f"agree); metrics at the {chosen} round")
    return Table(list(rows), table_rows, out_columns, cells, caption, notes, spread, show)


def value_title(key: str, value: str) -> str:
    return value_label(key, value)


def row_titles(table: Table) -> list[str]:
    return [key_label(k) for k in table.row_keys]


def _zeroshot_rows(records: Sequence[Mapping[str, Any]], rows: Sequence[str], columns: Sequence[str],
                   blocks: list[tuple[str, ...]], metrics: Sequence[str], eff_labels: Sequence[str]):
    """One zero-shot row per value of the row keys that change zero-shot numbers (dataset/backbone/scenario)."""
    zs_keys = [k for k in rows if k.split(".")[0] in ZEROSHOT_GROUPS]
    for zs_value, group in group_records(records, zs_keys).items():
        fixed = dict(zip(zs_keys, zs_value))
        free = [k for k in rows if k not in fixed]  # the first of these carries the "zero-shot" label
        label = tuple(fixed[k] if k in fixed else (ZEROSHOT_LABEL if k == free[0] else "") for k in rows) \
            if free else (*zs_value[:-1], f"{zs_value[-1]} ({ZEROSHOT_LABEL})")
        line: list[Cell] = []
        for block in blocks:
            members = [r for r in group if not columns or
                       tuple(str(record_fields(r).get(k, "–")) for k in columns) == block]
            # Records of one seed and zero-shot setting carry identical zero-shot numbers: count each once.
            unique: dict[str, Mapping[str, float]] = {}
            for r in members:
                fields = record_fields(r)
                key = json.dumps({k: v for k, v in fields.items() if k.split(".")[0] in (*ZEROSHOT_GROUPS, "seed")},
                                 sort_keys=True, default=str)
                unique.setdefault(key, r.get("zeroshot") or {})
            values = {}
            for zs in unique.values():
                for m, v in zs.items():
                    values.setdefault(m, []).append(float(v))
            per_metric = _metric_cells(values, metrics)
            line += [per_metric[m] for m in metrics]
        line += [Cell(0.0, None, 1) if name in ("trainable params", "MB / round") else Cell() for name in eff_labels]
        yield label, line


def is_zeroshot_row(row: Sequence[str]) -> bool:
    return any(part == ZEROSHOT_LABEL or part.endswith(f"({ZEROSHOT_LABEL})") for part in row)


def _embolden(columns: Sequence[Column], rows: Sequence[tuple[str, ...]], cells: list[list[Cell]]) -> None:
    for j, column in enumerate(columns):
        candidates = [(i, cells[i][j].mean) for i in range(len(rows)) if cells[i][j].mean is not None and
                      not (column.kind == "cost" and is_zeroshot_row(rows[i]))]
        if len(candidates) < 2:
            continue
        values = [round(v, column.digits if column.kind == "cost" else 2) for _, v in candidates]
        best = max(values) if column.kind == "accuracy" else min(values)
        if values.count(best) > 1:
            continue  # a tie (as printed) points at nobody
        for (i, _), v in zip(candidates, values):
            cells[i][j].bold = v == best
