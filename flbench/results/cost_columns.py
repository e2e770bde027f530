"""The cost columns of a results table: what a run spent (parameters, bytes per round, wall time) and, per
converted attention tower, its K/V budget (nominal and measured), bytes per token and FLOPs, read from each record's
`costs`. `efficiency_columns` picks the ones the tabulated records have values for."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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


# Per converted tower (gqa or routed_kv in some record): K/V budget and work, from the records' costs.attention.
# "measured" is what the routed layers stored for the rows the run encoded; GQA and dense store exactly their nominal
# K/V, so their measured value is the realised one. Bytes are K/V of one token over all layers (+ expert index).
TOWER_COLUMNS = (  # (label, digits, value from one tower's cost figures)
    ("KV % nominal", 1, lambda t: 100 * t["kv_fraction"]),
    ("KV % measured", 1, lambda t: 100 * t.get("kv_fraction_measured", t["kv_fraction_realised"])),
    ("KV bytes / token", 1, lambda t: t["layers"] * t.get("kv_bytes_per_token_per_layer_measured",
                                                          t["kv_bytes_per_token_per_layer_realised"])),
    ("K/V-proj MFLOPs / seq", 2, lambda t: t["kv_proj_flops_per_sequence"] / 1e6),
    ("attention MFLOPs / seq", 2, lambda t: t["attention_flops_per_sequence"] / 1e6),
)


def _tower_figure(record: Mapping[str, Any], tower: str, get: Any) -> float | None:
    figures = ((record.get("costs") or {}).get("attention") or {}).get(tower)
    try:
        return None if not isinstance(figures, Mapping) else float(get(figures))
    except KeyError:  # a record from before these figures existed
        return None


def _tower_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int, Any]]:
    """TOWER_COLUMNS for each tower that some record converts (its dense rows show the same tower's dense figures)."""
    towers = sorted({tower for r in records for tower, figures in ((r.get("costs") or {}).get("attention") or {}).items()
                     if isinstance(figures, Mapping) and figures.get("kind") not in (None, "dense")})
    return [(f"{tower} {label}", "", digits, lambda r, tower=tower, get=get: _tower_figure(r, tower, get))
            for tower in towers for label, digits, get in TOWER_COLUMNS]


def efficiency_columns(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, int, Any]]:
    """The EFFICIENCY columns some record has a value for. The whole-model "KV bytes %" only where it adds something:
    some backbone is not dense (a column of 100.0 says nothing), and not exactly one tower is converted (then that
    tower's own nominal and measured columns are the budget, and a third figure beside them only confuses)."""
    towers = _tower_columns(records)

    def shown(label: str, get: Any) -> bool:
        values = [v for r in records if (v := get(r)) is not None]
        if label != "KV bytes %":
            return bool(values)
        return len(towers) != len(TOWER_COLUMNS) and any(abs(v - 100.0) > 1e-9 for v in values)

    return [column for column in EFFICIENCY if shown(column[0], column[3])] + towers
