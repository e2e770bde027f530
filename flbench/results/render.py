"""Tables as text: markdown, LaTeX (booktabs), CSV (machine-readable: raw keys, mean/std/n columns) and HTML.

Readers see human names (labels.py): "method", "CoOp", "HM", "photo"; CSV keeps the raw keys and full precision.
A cell prints `mean ± spread` (the table's spread: std, standard error or 95 % CI), no ± where every seed gave the
same number, and `(n=3)` when the table's cells differ in n (or always, with --show-n).
"""

from __future__ import annotations

import csv
import html
import io
import math

from flbench.results.labels import value_label
from flbench.results.tables import ZEROSHOT_LABEL, Cell, Column, ReportError, Table, is_zeroshot_row, row_titles


def format_cell(cell: Cell, column: Column, plus_minus: str = " ± ", spread: str = "std", show_n: bool = False
                ) -> str:
    if cell.mean is None or (isinstance(cell.mean, float) and math.isnan(cell.mean)):
        return "–"
    if column.kind == "cost":
        return f"{cell.mean:,.{column.digits}f}"
    text = f"{cell.mean:.{column.digits}f}"
    width = None if cell.constant else cell.spread(spread)
    if width is not None:
        text += f"{plus_minus}{width:.{column.digits}f}"
    return text + (f" (n={cell.n})" if show_n else "")


def _cells(table: Table, line: list[Cell], plus_minus: str = " ± ") -> list[str]:
    return [format_cell(c, col, plus_minus, table.spread, table.show_n and col.kind == "accuracy")
            for c, col in zip(line, table.columns)]


def row_values(table: Table, row: tuple[str, ...]) -> list[str]:
    """A row's values as readers see them ('CoOp', 'FedAvg'); the zero-shot row keeps its label."""
    if not is_zeroshot_row(row):
        return [value_label(key, value) for key, value in zip(table.row_keys, row)]
    return [part if not part or part == ZEROSHOT_LABEL or part.endswith(f"({ZEROSHOT_LABEL})") else
            value_label(key, part) for key, part in zip(table.row_keys, row)]


def _header(table: Table) -> list[str]:
    return [*row_titles(table), *(c.title for c in table.columns)]


def to_markdown(table: Table) -> str:
    lines = ["| " + " | ".join(_header(table)) + " |",
             "|" + "|".join(["---"] * len(table.row_keys) + ["---:"] * len(table.columns)) + "|"]
    for row, line in zip(table.rows, table.cells):
        texts = [f"**{text}**" if c.bold else text for c, text in zip(line, _cells(table, line))]
        lines.append("| " + " | ".join([*row_values(table, row), *texts]) + " |")
    foot = [f"\n_{table.caption}_"] + [f"_{n}_" for n in table.notes] if table.caption or table.notes else []
    return "\n".join(lines + foot) + "\n"


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "±": r"$\pm$", "–": "--", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
          "→": r"$\rightarrow$", "α": r"$\alpha$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    spec = "l" * len(table.row_keys) + "r" * len(table.columns)
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(_latex_escape(h) for h in _header(table)) + r" \\", r"\midrule"]
    for row, line in zip(table.rows, table.cells):
        texts = []
        for c, text in zip(line, _cells(table, line, plus_minus=r" $\pm$ ")):
            text = text.replace("–", "--").replace(",", "{,}")
            texts.append(rf"\textbf{{{text}}}" if c.bold else text)
        lines.append(" & ".join([*(_latex_escape(r) for r in row_values(table, row)), *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% {_latex_escape(n)}" for n in [table.caption, *table.notes] if n]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Machine-readable: raw keys, mean, std and n as separate columns, full precision, no formatting."""
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
        tds = [f"<td>{html.escape(r)}</td>" for r in row_values(table, row)]
        for c, text in zip(line, _cells(table, line)):
            text = html.escape(text)
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
