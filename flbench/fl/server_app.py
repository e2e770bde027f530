"""The ServerApp: Flower's strategy loop, server-side evaluation each round, per-round history.

The server and the run driver live in the same process for both backends, so the history is handed back through
a plain `RoundLog` object rather than through Flower's result types. Each history row holds, for one round: what
the clients reported about training (loss, how many were sampled, answered, failed, straggled), the server's
evaluation of the reported model, and — for personalised scenarios or protocol=local — what the clients reported
about their own models (Flower's client-side evaluation, sent to every client every round).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy import strategy_utils
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flbench.errors import ClientError
from flbench.experiment import Experiment, derive_seed, get_experiment
from flbench.fl.backends import FEDERATION_STOP
from flbench.fl.checkpoint import Checkpointer
from flbench.fl.client_app import CLIENT_META, to_state
from flbench.fl.heterogeneity import INJECTED_FAILURE_CODE
from flbench.fl.protocols import get_protocol, sampling_kwargs
from flbench.scenarios import summarise_clients

log = logging.getLogger("flbench")


@dataclass
class RoundLog:
    """What the server saw, round by round: one flat metrics dict per round (round 0 = before training)."""

    rounds: list[dict[str, float]] = field(default_factory=list)
    aggregates: list[dict[str, Any]] = field(default_factory=list)  # the shared state after each round
    final_state: dict[str, Any] = field(default_factory=dict)
    pending_train: dict[str, float] = field(default_factory=dict)
    pending_eval: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    on_round: Callable[[list[dict[str, float]]], None] | None = None  # told all rows after each new one

    def add(self, row: dict[str, float]) -> None:
        """Append one round's row and tell `on_round` (live W&B logging) while the run goes on."""
        self.rounds.append(row)
        if self.on_round is not None:
            self.on_round(self.rounds)


def _progress_line(row: Mapping[str, float], num_rounds: int, selection: str) -> str:
    parts = [f"round {int(row['round']):>3}/{num_rounds}"]
    if "train/loss" in row:
        parts.append(f"train loss {row['train/loss']:.3f}")
    if row.get("failures"):
        parts.append(f"failed {int(row['failures'])}/{int(row['sampled'])}")
    if selection in row:
        parts.append(f"{selection} {row[selection]:5.1f}")
    parts += [f"{k} {v:5.1f}" for k, v in row.items()
              if k.startswith("test/") and "/domain/" not in k and "/client/" not in k and "/target/" not in k]
    parts.append(f"({row['time_s']:.1f} s)")
    return "  ".join(parts)


def _partition_of(reply: Message) -> int:
    return -1 if reply.has_error() else int(reply.content[CLIENT_META]["partition-id"])


class PartitionOrderedGrid(Grid):
    """The grid the strategy sees: the real one, with nodes listed in partition order.

    Flower samples clients with `random.sample(node_ids, k)`. Node ids are random under the Ray engine and
    sequential in-process, so the same seed would pick different *partitions* on the two backends. One query
    round asks every node for its partition id; listing nodes in that order makes seeded sampling pick the same
    clients everywhere.
    """

    def __init__(self, grid: Grid, min_nodes: int = 0, timeout_s: float = 600.0) -> None:
        self.grid = grid
        nodes = list(grid.get_node_ids())
        # Nodes may still be connecting (Ray actors on an existing cluster, SuperNodes under `flwr run`): ask only
        # once all `min_nodes` are there, or a late node would never get a partition id (and never be sampled).
        deadline = time.monotonic() + timeout_s
        while len(nodes) < min_nodes:
            _check_stop()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {min_nodes} clients connected within {timeout_s:.0f} s")
            time.sleep(0.5)
            nodes = list(grid.get_node_ids())
        queries = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
                   for n in nodes]
        self.partition_of = {reply.metadata.src_node_id: _partition_of(reply)
                             for reply in grid.send_and_receive(queries)}
        missing = set(nodes) - set(self.partition_of)
        if missing or any(p < 0 for p in self.partition_of.values()):
            raise RuntimeError(f"{len(missing)} of {len(nodes)} clients did not report their partition id")

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.partition_of, key=self.partition_of.__getitem__)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply is in (or `timeout`), as Flower's grids do, but stop waiting when the
        federation is torn down: Flower's own loop would poll forever in the ServerApp thread after Ctrl-C."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            _check_stop()
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if deadline is not None and time.monotonic() > deadline:
                break
            if pending and not got:
                time.sleep(0.02)
        return replies


def _check_stop() -> None:
    if FEDERATION_STOP.is_set():
        raise RuntimeError("the federation is being stopped")


def check_client_errors(replies: list[Message], partition_of: Mapping[int, int], server_round: int) -> None:
    """Only injected failures (`protocol.failure_prob`) may count as failed clients: any other error a client sent
    back (the simulation engine turns a client's exception into an error reply) is deterministic and stops the run."""
    for reply in replies:
        if reply.has_error() and reply.error.code != INJECTED_FAILURE_CODE:
            client = partition_of.get(reply.metadata.src_node_id, "?")
            reason = (reply.error.reason or "").strip().splitlines()
            raise ClientError(f"client {client} failed in round {server_round}: {reason[-1] if reason else 'error'}")


@contextmanager
def seeded_sampling(seed: int) -> Iterator[None]:
    """Flower samples clients with the `random` module's global state, which other threads of the Ray engine also
    draw from. For the duration of one configure call, its sampler gets a private generator seeded per round."""
    shared = strategy_utils.random
    strategy_utils.random = random.Random(seed)  # type: ignore[assignment]
    try:
        yield
    finally:
        strategy_utils.random = shared


def instrument(strategy: Strategy, experiment: Experiment, round_log: RoundLog,
               partition_of: Mapping[int, int]) -> Strategy:
    """Wrap a Flower strategy's hooks without changing what it computes:

    - sample clients from a generator seeded by (seed, round), the same on every backend, and independent of
      whether clients are also asked to evaluate;
    - aggregate replies in partition order, not arrival order (float sums then do not depend on which Ray worker
      finished first), and count sampled / failed replies for the round's row (a client's own error stops the
      run: `check_client_errors`);
    - send clients the model the server reports (PromptMethod.reported_state), for their own evaluation.
    """
    aggregate_train = strategy.aggregate_train
    configure_train = strategy.configure_train
    configure_evaluate = strategy.configure_evaluate
    seed = experiment.seed

    def seeded_configure_train(server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
        with seeded_sampling(derive_seed(seed, 3, server_round)):
            return list(configure_train(server_round, arrays, config, grid))

    aggregate_evaluate = strategy.aggregate_evaluate

    def ordered_aggregate_train(server_round: int, replies: Iterable[Message]) -> Any:
        replies = sorted(replies, key=_partition_of)
        check_client_errors(replies, partition_of, server_round)
        failures = sum(reply.has_error() for reply in replies)
        round_log.pending_train = {"sampled": len(replies), "failures": failures, "clients": len(replies) - failures}
        if failures:
            log.info("round %d: %d of %d sampled clients failed", server_round, failures, len(replies))
        return aggregate_train(server_round, replies)

    def reported_configure_evaluate(server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Any:
        reported = experiment.method.reported_state(round_log.aggregates + [to_state(arrays)])
        with seeded_sampling(derive_seed(seed, 4, server_round)):
            return list(configure_evaluate(server_round, ArrayRecord(reported) if reported else arrays, config, grid))

    def checked_aggregate_evaluate(server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        check_client_errors(replies, partition_of, server_round)
        return aggregate_evaluate(server_round, replies)

    strategy.aggregate_evaluate = checked_aggregate_evaluate  # type: ignore[method-assign]
    strategy.configure_train = seeded_configure_train  # type: ignore[method-assign]
    strategy.aggregate_train = ordered_aggregate_train  # type: ignore[method-assign]
    strategy.configure_evaluate = reported_configure_evaluate  # type: ignore[method-assign]
    return strategy


def client_evaluation(records: list[RecordDict]) -> dict[str, float]:
    """Personal metrics over every client's counts, and (protocol=local) the client-mean of each shared split."""
    records = sorted(records, key=lambda r: int(r[CLIENT_META]["partition-id"]))
    metrics = [next(iter(r.metric_records.values())) for r in records]
    out: dict[str, float] = {}
    if metrics and "personal.client" in metrics[0]:  # per-client lists → one row per data client
        keys = [k.removeprefix("personal.") for k in metrics[0] if k.startswith("personal.")]
        rows = [dict(zip(keys, values)) for m in metrics for values in zip(*[m[f"personal.{k}"] for k in keys])]
        out.update(summarise_clients(rows, "personal"))
    shared = sorted({k for m in metrics for k in m if k.startswith(("val/", "test/"))})
    out.update({k: float(np.mean([m[k] for m in metrics if k in m])) for k in shared})
    return out


def make_server_app(cfg: Mapping[str, Any], round_log: RoundLog) -> ServerApp:
    app = ServerApp()
    num_rounds = int(cfg["num_rounds"])

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(derive_seed(int(cfg["seed"]), 3))  # sampling itself is seeded per round (seeded_sampling)
        experiment = get_experiment(cfg)
        protocol = get_protocol(cfg["protocol"]["name"])
        scenario = experiment.scenario
        client_eval = scenario.personal or not protocol.aggregates
        num_nodes = experiment.num_nodes

        def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
            metrics = aggregate_metricrecords(records, weight_key)
            stragglers = sum(int(next(iter(r.metric_records.values())).get("straggler", 0)) for r in records)
            round_log.pending_train.update({"train/loss": float(metrics["train_loss"]), "stragglers": stragglers})
            return metrics

        def aggregate_eval_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
            round_log.pending_eval = client_evaluation(records)
            return MetricRecord({k: v for k, v in round_log.pending_eval.items() if "/client/" not in k})

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            round_log.aggregates.append(to_state(arrays))
            if server_round > 0 and not protocol.aggregates:
                metrics = {}  # the server's model never changes; the clients' own models were evaluated instead
                if experiment.heldout_clients:
                    metrics = experiment.evaluate_unseen(experiment.method.reported_state(round_log.aggregates),
                                                         server_round)
            else:
                metrics = experiment.evaluate_state(round_log.aggregates, server_round,
                                                    with_personal=server_round == 0)
            metrics = scenario.complete({**metrics, **round_log.pending_eval})
            row = {"round": server_round, **round_log.pending_train, **metrics,
                   "time_s": time.perf_counter() - round_log.started}
            round_log.pending_train, round_log.pending_eval = {}, {}
            round_log.add(row)
            log.info(_progress_line(row, num_rounds, scenario.selection))
            return MetricRecord({k: float(v) for k, v in metrics.items() if "/client/" not in k})

        common = dict(sampling_kwargs(cfg["protocol"], num_nodes),
                      fraction_evaluate=1.0 if client_eval else 0.0,
                      min_evaluate_nodes=num_nodes if client_eval else 0,
                      train_metrics_aggr_fn=aggregate_train_metrics, evaluate_metrics_aggr_fn=aggregate_eval_metrics)
        ordered_grid = PartitionOrderedGrid(grid, num_nodes)
        strategy = instrument(protocol.strategy(cfg["protocol"], common), experiment, round_log,
                              ordered_grid.partition_of)
        # resumes from the last checkpoint (made on the same weights), saves new ones
        checkpointer = Checkpointer.from_config(cfg, experiment.backbone.fingerprint())
        evaluate_fn = checkpointer.attach(strategy, evaluate, round_log) if checkpointer else evaluate
        method = experiment.fresh()
        result = strategy.start(grid=ordered_grid, initial_arrays=ArrayRecord(method.shared_state()),
                                num_rounds=num_rounds, train_config=ConfigRecord({}), evaluate_fn=evaluate_fn)
        round_log.final_state = to_state(result.arrays) if result.arrays is not None else {}

    return app
