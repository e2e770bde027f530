"""The small table printed at the end of a run: zero-shot vs the learned prompt, and what it cost."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    cfg = record["config"]
    algo = cfg["algorithm"]["name"]
    lines = [f"{algo} · {cfg['protocol']['name']} · {cfg['dataset']['name']} · scenario {cfg['scenario']['name']} · "
             f"{cfg['num_clients']} clients · {cfg['num_rounds']} rounds · seed {record['seed']}"]
    if record.get("skipped"):
        lines.append("(skipped: record already existed)")
    header = f"{'metric':<22}{'zero-shot':>10}{algo + ' (best val)':>22}{algo + ' (last)':>18}"
    lines += [header, "-" * len(header)]
    for metric, values in record["metrics"].items():
        zs = record["zeroshot"].get(metric)
        zs_text = f"{zs:10.2f}" if zs is not None else f"{'-':>10}"
        lines.append(f"{metric:<22}{zs_text}{values['best_val']:22.2f}{values['last']:18.2f}")
    best = next(iter(record["metrics"].values()))["best_val_round"]
    costs = record["costs"]
    lines += [f"best-by-validation round: {best} (selected on {record['selection']})",
              f"trainable parameters: {costs['trainable_params']:,} · sent per client per round: "
              f"{_fmt_bytes(costs['bytes_up_per_client'])} up, {_fmt_bytes(costs['bytes_down_per_client'])} down · "
              f"per round: {_fmt_bytes(costs['bytes_per_round'])} · wall time {costs['wall_time_s']:.1f} s"]
    return lines


def print_summary(record: Mapping[str, Any]) -> None:
    print("\n".join(summary_lines(record)))
