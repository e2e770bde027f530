"""Paper-style tables as pure functions of RunRecords: group, average over seeds, render.

A table has one row per value of the `rows` config keys (e.g. `algorithm.name`) and one block of metric columns
per value of the `columns` keys (e.g. `dataset.family`). Each cell is mean ± sample std over the records in it,
which must differ in nothing but their seed: a cell that would mix two configurations is refused with a message
naming the keys that differ, so a number in a table always means one thing.

Rules the numbers follow (the same as CoOp / CoCoOp / MaPLe tables):
- HM is the harmonic mean of the *averaged* base and novel accuracies, never the mean of per-seed HMs.
- The zero-shot row comes from the records' own `zeroshot` block (same backbone, same test splits).
- Best per column in bold: the highest accuracy; the lowest cost (the zero-shot row takes no part in cost columns).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flbench.errors import ConfigError
from flbench.metrics import harmonic_mean
from flbench.results.record import load_record, result_config

SELECTIONS = ("best_val", "last")
# "hm" is recomputed from the averaged pair it is the harmonic mean of (first pair present wins).
HM_PAIRS = (("base", "novel"), ("global", "personal"))
# Config groups whose values change the zero-shot numbers; rows keyed by them get one zero-shot row per value.
ZEROSHOT_GROUPS = ("dataset", "backbone", "scenario")
ZEROSHOT_LABEL = "zero-shot"


class ReportError(ConfigError):
    """A report that cannot be made as asked (empty folder, mixed cells, unknown key): one line, what to do."""


# --- records --------------------------------------------------------------------------------------------------
def load_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete RunRecord under `results_dir/records` (or `results_dir` itself when it holds the JSONs)."""
    root = Path(results_dir)
    folder = root / "records" if (root / "records").is_dir() else root
    if not folder.is_dir():
        raise ReportError(f"no records folder at {root}: run `python -m flbench results_dir={root}` first")
    records = [r for r in (load_record(p) for p in sorted(folder.glob("*.json"))) if r is not None]
    if not records:
        raise ReportError(f"no complete RunRecords in {folder}: run `python -m flbench results_dir={root}` first "
                          "(incomplete or corrupt files are never read)")
    return records


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


@dataclass
class Column:
    label: str
    kind: str  # "accuracy" (higher is better) | "cost" (lower is better) | "count"
    unit: str = ""
    digits: int = 2


@dataclass
class Table:
    row_keys: list[str]
    rows: list[tuple[str, ...]]
    columns: list[Column]
    cells: list[list[Cell]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)

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


def _check_cell(records: Sequence[Mapping[str, Any]], label: str) -> None:
    """A cell averages seeds of ONE configuration; anything else varying is a mixed folder."""
    fields = [record_fields(r) for r in records]
    keys = set().union(*fields) - {"seed"}
    varying = {k: sorted({str(f.get(k)) for f in fields}) for k in sorted(keys)
               if len({json.dumps(f.get(k), default=str) for f in fields}) > 1}
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


def order_metrics(names: Sequence[str]) -> list[str]:
    """The one metric order of tables, plots and the run summary: headline metrics (global, base, novel, …) before
    their breakdowns (domain/photo, …), the HM pairs first, HM last; otherwise first-seen order."""
    names = list(dict.fromkeys(names))
    first = [m for pair in HM_PAIRS for m in pair if m in names]
    return sorted(names, key=lambda m: (m == "hm", "/" in m, first.index(m) if m in first else len(first),
                                        names.index(m)))


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


def kv_percent(costs: Mapping[str, Any]) -> float | None:
    """KV-cache bytes relative to the dense backbone, in %, when the record's backbone reports it."""
    for key in ("kv_percent", "kv_bytes_percent"):
        if costs.get(key) is not None:
            return float(costs[key])
    for key in ("kv_fraction", "kv_bytes_fraction"):
        if costs.get(key) is not None:
            return 100.0 * float(costs[key])
    towers = costs.get("attention")
    if isinstance(towers, Mapping) and towers:
        # KV-cache bytes of a whole sequence (realised capacities, router index included) over all towers and
        # layers, relative to dense multi-head K/V at the same element size.
        kv = dense = 0.0
        for tower in towers.values():
            if not tower.get("seq_len") or not tower.get("kv_fraction"):
                continue
            per_token = float(tower.get("kv_bytes_per_token_per_layer_realised", tower["kv_bytes_per_token_per_layer"]))
            element = round(float(tower["kv_bytes_per_token_per_layer"]) /
                            (2 * float(tower["kv_fraction"]) * tower["heads"] * tower["head_dim"]))
            tokens = tower["layers"] * tower["seq_len"]
            kv += tokens * per_token
            dense += tokens * 2 * tower["heads"] * tower["head_dim"] * max(element, 1)
        return 100.0 * kv / dense if dense else None
    return None


EFFICIENCY = (  # (label, unit, digits, value from a record)
    ("trainable params", "", 0, lambda r: r["costs"].get("trainable_params")),
    ("MB / round", "MB", 3, lambda r: None if r["costs"].get("bytes_per_round") is None
     else r["costs"]["bytes_per_round"] / 1e6),
    ("KV bytes %", "%", 1, lambda r: kv_percent(r["costs"])),
    ("wall time (s)", "s", 1, lambda r: r["costs"].get("wall_time_s")),
)


def _efficiency_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int, Any]]:
    """The EFFICIENCY columns some record has a value for (KV bytes only when some backbone is not dense: a column
    of 100.0 says nothing)."""
    def shown(label: str, get: Any) -> bool:
        values = [v for r in records if (v := get(r)) is not None]
        return bool(values) and (label != "KV bytes %" or any(abs(v - 100.0) > 1e-9 for v in values))

    return [column for column in EFFICIENCY if shown(column[0], column[3])]


def build_table(records: Sequence[Mapping[str, Any]], rows: Sequence[str] = ("algorithm.name",),
                columns: Sequence[str] = (), metrics: Sequence[str] | None = None, selection: str = "best_val",
                zeroshot: bool = True, efficiency: bool = True, caption: str = "") -> Table:
    """The table of `records` (already filtered): rows × (column blocks × metrics) + efficiency columns."""
    if not records:
        raise ReportError("no records to tabulate (empty folder or filters matched nothing)")
    if selection not in SELECTIONS:
        raise ReportError(f"--selection {selection!r} is unknown; choose one of {SELECTIONS}")
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
    out_columns = [Column(f"{block_label[b]} · {m}" if b else m, "accuracy") for b in blocks for m in metrics]
    eff = _efficiency_columns(records) if efficiency else []
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
            line += [per_metric[m] for m in metrics]
        line += [_mean_std([v for r in row_records if (v := get(r)) is not None]) for _, _, _, get in eff]
        table_rows.append(row)
        cells.append(line)

    if zeroshot:
        for row, line in _zeroshot_rows(records, rows, columns, blocks, metrics, [e[0] for e in eff]):
            table_rows.append(row)
            cells.append(line)
        # zero-shot rows first, as papers print the baseline on top
        zs = [i for i, r in enumerate(table_rows) if is_zeroshot_row(r)]
        order = zs + [i for i in range(len(table_rows)) if i not in zs]
        table_rows, cells = [table_rows[i] for i in order], [cells[i] for i in order]

    _embolden(out_columns, table_rows, cells)
    chosen = "best-by-validation" if selection == "best_val" else "last"
    return Table(list(rows), table_rows, out_columns, cells,
                 caption or f"mean ± std over seeds (sample std, n = seeds); metrics at the {chosen} round", notes)


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
        if column.kind == "cost" and len(set(values)) == 1:
            continue  # all equal: nothing to point at
        for (i, _), v in zip(candidates, values):
            cells[i][j].bold = v == best


# --- rendering ----------------------------------------------------------------------------------------------------
def format_cell(cell: Cell, column: Column, plus_minus: str = " ± ") -> str:
    if cell.mean is None or (isinstance(cell.mean, float) and math.isnan(cell.mean)):
        return "–"
    if column.kind == "cost":
        return f"{cell.mean:,.{column.digits}f}"
    text = f"{cell.mean:.{column.digits}f}"
    return text + (f"{plus_minus}{cell.std:.{column.digits}f}" if cell.std is not None else "")


def _header(table: Table) -> list[str]:
    return [*table.row_keys, *(c.label for c in table.columns)]


def to_markdown(table: Table) -> str:
    lines = ["| " + " | ".join(_header(table)) + " |",
             "|" + "|".join(["---"] * len(table.row_keys) + ["---:"] * len(table.columns)) + "|"]
    for row, line in zip(table.rows, table.cells):
        texts = [f"**{format_cell(c, col)}**" if c.bold else format_cell(c, col) for c, col in zip(line, table.columns)]
        lines.append("| " + " | ".join([*row, *texts]) + " |")
    foot = [f"\n_{table.caption}_"] + [f"_{n}_" for n in table.notes] if table.caption or table.notes else []
    return "\n".join(lines + foot) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "±": r"$\pm$", "–": "--", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    spec = "l" * len(table.row_keys) + "r" * len(table.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(_latex_escape(h) for h in _header(table)) + r" \\", r"\midrule"]
    for row, line in zip(table.rows, table.cells):
        texts = []
        for c, col in zip(line, table.columns):
            text = format_cell(c, col, plus_minus=r" $\pm$ ").replace("–", "--").replace(",", "{,}")
            texts.append(rf"\textbf{{{text}}}" if c.bold else text)
        lines.append(" & ".join([*(_latex_escape(r) for r in row), *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.caption:
        lines.append(f"% {table.caption}")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: mean, std and n as separate columns, full precision, no formatting."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*table.row_keys, *(f"{c.label} {s}" for c in table.columns for s in ("mean", "std", "n"))])
    for row, line in zip(table.rows, table.cells):
        writer.writerow([*row, *(x for c in line for x in ("" if c.mean is None else c.mean,
                                                            "" if c.std is None else c.std, c.n))])
    return buffer.getvalue()


def to_html(table: Table, title: str = "flbench results") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _header(table))
    body = []
    for row, line in zip(table.rows, table.cells):
        tds = [f"<td>{html.escape(r)}</td>" for r in row]
        for c, col in zip(line, table.columns):
            text = html.escape(format_cell(c, col))
            tds.append(f"<td class=num>{'<b>' + text + '</b>' if c.bold else text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    notes = "".join(f"<p><i>{html.escape(n)}</i></p>" for n in [table.caption, *table.notes] if n)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "table{border-collapse:collapse;font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
            "td.num{text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table>{notes}</body></html>\n")


RENDERERS = {"markdown": to_markdown, "latex": to_latex, "csv": to_csv, "html": to_html}


def render(table: Table, fmt: str) -> str:
    if fmt not in RENDERERS:
        raise ReportError(f"--format {fmt!r} is unknown; choose one of {sorted(RENDERERS)}")
    return RENDERERS[fmt](table)
