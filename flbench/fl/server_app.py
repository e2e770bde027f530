"""The ServerApp: Flower's strategy loop, server-side evaluation of the aggregate each round, per-round history.

The server and the run driver live in the same process for both backends, so the history is handed back through
a plain `RoundLog` object rather than through Flower's result types.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flbench.experiment import derive_seed, get_experiment
from flbench.fl.client_app import CLIENT_META, to_state
from flbench.fl.protocols import get_protocol, sampling_kwargs

log = logging.getLogger("flbench")


@dataclass
class RoundLog:
    """What the server saw, round by round: one flat metrics dict per round (round 0 = before training)."""

    rounds: list[dict[str, float]] = field(default_factory=list)
    aggregates: list[dict[str, Any]] = field(default_factory=list)  # the shared state after each round
    final_state: dict[str, Any] = field(default_factory=dict)
    pending_train: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)


def _progress_line(row: Mapping[str, float], num_rounds: int, selection: str) -> str:
    parts = [f"round {int(row['round']):>3}/{num_rounds}"]
    if "train/loss" in row:
        parts.append(f"train loss {row['train/loss']:.3f}")
    parts.append(f"{selection} {row[selection]:5.1f}")
    parts += [f"{k} {v:5.1f}" for k, v in row.items() if k.startswith("test/") and "/domain/" not in k]
    parts.append(f"({row['time_s']:.1f} s)")
    return "  ".join(parts)


def _partition_of(reply: Message) -> int:
    return -1 if reply.has_error() else int(reply.content[CLIENT_META]["partition-id"])


def in_partition_order(strategy: Strategy) -> Strategy:
    """Aggregate replies in partition order, not arrival order: floating-point sums then do not depend on which
    Ray worker finished first, so the same seed gives the same numbers on every backend."""
    aggregate_train = strategy.aggregate_train
    strategy.aggregate_train = lambda server_round, replies: aggregate_train(  # type: ignore[method-assign]
        server_round, sorted(replies, key=_partition_of))
    return strategy


def make_server_app(cfg: Mapping[str, Any], round_log: RoundLog) -> ServerApp:
    app = ServerApp()
    num_rounds = int(cfg["num_rounds"])

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(derive_seed(int(cfg["seed"]), 3))  # Flower samples clients with the `random` module
        experiment = get_experiment(cfg)
        protocol = get_protocol(cfg["protocol"]["name"])
        selection = experiment.scenario.selection

        def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
            metrics = aggregate_metricrecords(records, weight_key)
            round_log.pending_train = {"train/loss": float(metrics["train_loss"]), "clients": len(records)}
            return metrics

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            round_log.aggregates.append(to_state(arrays))
            metrics = experiment.evaluate_state(round_log.aggregates)
            row = {"round": server_round, **round_log.pending_train, **metrics,
                   "time_s": time.perf_counter() - round_log.started}
            round_log.pending_train = {}
            round_log.rounds.append(row)
            log.info(_progress_line(row, num_rounds, selection))
            return MetricRecord({k: float(v) for k, v in metrics.items()})

        common = dict(sampling_kwargs(cfg["protocol"], int(cfg["num_clients"])), fraction_evaluate=0.0,
                      train_metrics_aggr_fn=aggregate_train_metrics)
        strategy = in_partition_order(protocol.strategy(cfg["protocol"], common))
        method = experiment.fresh()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(method.shared_state()), num_rounds=num_rounds,
                                train_config=ConfigRecord({}), evaluate_fn=evaluate)
        round_log.final_state = to_state(result.arrays) if result.arrays is not None else {}

    return app
