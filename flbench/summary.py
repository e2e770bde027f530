"""What a run prints for its user: a job counter at the start of each sweep job, and at the end a small table of
zero-shot vs the learned prompt (test accuracy, %), what it cost, and where the record and the W&B run are."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flbench.results.record import record_path
from flbench.results.tables import order_metrics


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def describe(cfg: Mapping[str, Any]) -> str:
    """'coop · fedavg · synthetic · scenario global · 10 clients · 10 rounds · seed 0' (before validation too)."""
    name = lambda group: (cfg.get(group) or {}).get("name", "?")  # noqa: E731
    return (f"{name('algorithm')} · {name('protocol')} · {name('dataset')} · scenario {name('scenario')} · "
            f"{cfg.get('num_clients')} clients · {cfg.get('num_rounds')} rounds · seed {cfg.get('seed')}")


def summary_lines(record: Mapping[str, Any]) -> list[str]:
    cfg = record["config"]
    algo = cfg["algorithm"]["name"]
    lines = [describe({**cfg, "seed": record["seed"]})]
    if record.get("skipped"):
        lines.append("(skipped: record already existed)")
    header = f"{'test accuracy (%)':<22}{'zero-shot':>10}{algo + ' (best val)':>22}{algo + ' (last)':>18}"
    lines += [header, "-" * len(header)]
    for metric in order_metrics(list(record["metrics"])):
        values = record["metrics"][metric]
        zs = record["zeroshot"].get(metric)
        zs_text = f"{zs:10.2f}" if zs is not None else f"{'-':>10}"
        lines.append(f"{metric:<22}{zs_text}{values['best_val']:22.2f}{values['last']:18.2f}")
    best = next(iter(record["metrics"].values()))["best_val_round"]
    costs = record["costs"]
    lines += [f"best-by-validation round: {best} (selected on {record['selection']})",
              f"trainable parameters: {costs['trainable_params']:,} · sent per client per round: "
              f"{_fmt_bytes(costs['bytes_up_per_client'])} up, {_fmt_bytes(costs['bytes_down_per_client'])} down · "
              f"per round: {_fmt_bytes(costs['bytes_per_round'])} · wall time {costs['wall_time_s']:.1f} s",
              f"record: {record_path(cfg['results_dir'], record['config_hash'])}"]
    if record.get("wandb_dir"):
        mode = (record.get("wandb") or {}).get("mode", "offline")
        lines.append(f"W&B run ({mode}): {record['wandb_dir']}" +
                     (f" · upload: wandb sync {record['wandb_dir']}" if mode == "offline" else ""))
    return lines


def print_summary(record: Mapping[str, Any]) -> None:
    print("\n".join(summary_lines(record)))


# --- sweeps ---------------------------------------------------------------------------------------------------
def sweep_size(argv: Sequence[str], sweeper_params: Mapping[str, Any]) -> int | None:
    """How many jobs a Hydra multirun launches: the product of the sweep lists on the command line and in the
    experiment's `hydra.sweeper.params` (the command line wins for a key in both). None when it cannot be told."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        sizes = {o.get_key_element(): _values(o) for o in parser.parse_overrides(
            [f"{key}={value}" for key, value in (sweeper_params or {}).items()])}
        sizes.update({o.get_key_element(): _values(o) for o in parser.parse_overrides(
            [a for a in argv if "=" in a and not a.startswith("-")])})
    except Exception:  # an override Hydra itself would refuse, or a launcher's own argv: no counter then
        return None
    return math.prod(sizes.values())


def _values(override: Any) -> int:
    return len(list(override.sweep_iterator())) if override.is_sweep_override() else 1


def job_banner(cfg: Mapping[str, Any]) -> str | None:
    """'job 3/24: coop · fedavg · …' for a job of a Hydra multirun (None for a single run)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover
        return None
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    number = int(hydra_cfg.job.num) + 1
    total = sweep_size(sys.argv[1:], hydra_cfg.sweeper.get("params") or {}) if _launched_here() else None
    return f"job {number}/{total}: {describe(cfg)}" if total else f"job {number}: {describe(cfg)}"


def _launched_here() -> bool:
    """Jobs of the basic launcher run in the process whose argv holds the sweep; launcher plug-ins' workers do not."""
    script = Path(sys.argv[0])
    return script.name == "__main__.py" and script.parent.name == "flbench"
