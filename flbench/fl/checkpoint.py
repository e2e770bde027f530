"""Resumable runs: checkpoints every N rounds, and a restart that continues to the same final metrics.

A run killed at any point and started again with the same command continues from its last checkpoint. What a
checkpoint holds, and where each part lives:

- server (`<dir>/<config hash>/server.pt`, written at the end of every N-th round): the round, the aggregate
  after it, the strategy's own state (every picklable attribute: FedAdam/FedYogi moments, FedAvgM momentum,
  SCAFFOLD's server variate, ...), the server's per-round history and aggregates, and RNG states (Flower samples
  clients with Python's `random`);
- clients (`<dir>/<config hash>/clients/<partition>/round_<r>.pt`, written by each client after its own training):
  the client's Flower `Context.state` (personal prompts, SCAFFOLD client variates, protocol=local models). A
  restarted process starts with empty contexts; a client restores the newest file older than the current round.

Resuming fast-forwards Flower's strategy loop: rounds up to the checkpoint send no messages and the aggregate of
the checkpointed round is handed back, so round numbers (and the per-(seed, round, client) training seeds derived
from them) are those of an uninterrupted run. Every file is written atomically; a half-written checkpoint is
never read (the rename happens after fsync). The folder is removed once the run's record is written.

Nothing in a checkpoint can run code when it is read: a results folder may be shared, or handed over as a tarball.
Files are written as plain data — tensors, numbers, strings, lists, tuples and dicts, with numpy arrays and Flower
records turned into tagged dicts of tensors (`encode`) — and read with `torch.load(weights_only=True)`, whose
unpickler refuses every class and function that is not such data. A file that cannot be read that way is an error
that names it (never a silent fresh start): delete the run's checkpoint folder to start afresh.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flbench.errors import ConfigError, DataFileError
from flbench.io import atomic_write, load_torch_data

log = logging.getLogger("flbench")

SCHEMA = 1


_RECORDS = {"ArrayRecord": ArrayRecord, "ConfigRecord": ConfigRecord, "MetricRecord": MetricRecord}
_PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def encode(value: Any) -> Any:
    """`value` as plain data that `torch.load(weights_only=True)` reads back; TypeError for anything else."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("object arrays are not data")
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(value).copy())}
    if isinstance(value, np.generic):
        return {"__npscalar__": torch.from_numpy(np.asarray(value).copy())}
    if isinstance(value, Array):
        return {"__Array__": torch.from_numpy(value.numpy().copy())}
    for name, kind in _RECORDS.items():
        if isinstance(value, kind):
            items = value.to_torch_state_dict() if kind is ArrayRecord else dict(value)
            return {f"__{name}__": {k: encode(v) for k, v in items.items()}}
    if isinstance(value, tuple):
        return tuple(encode(v) for v in value)
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {k: encode(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} is not checkpoint data")


def decode(value: Any) -> Any:
    """The inverse of `encode`."""
    if isinstance(value, tuple):
        return tuple(decode(v) for v in value)
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__ndarray__":
            return inner.numpy()
        if tag == "__npscalar__":
            return inner.numpy()[()]
        if tag == "__Array__":
            return Array(inner.numpy())
        if isinstance(tag, str) and tag.startswith("__") and tag.strip("_") in _RECORDS:
            kind, items = _RECORDS[tag.strip("_")], {k: decode(v) for k, v in inner.items()}
            return ArrayRecord(items) if kind is ArrayRecord else kind(items)
    return {k: decode(v) for k, v in value.items()}


def _save(path: Path, payload: Any) -> None:
    data = encode(payload)
    atomic_write(path, lambda f: torch.save(data, f))


def _load(path: Path) -> Any | None:
    """The checkpoint at `path`, None when there is none; DataFileError (one line naming the file) when it is not a
    plain-data file (corrupt, or crafted to run code: it is never unpickled beyond plain data)."""
    if not path.exists():
        return None
    return decode(load_torch_data(path, what="checkpoint", fix=f"delete {path.parent} to start this run afresh"))


def _is_data(value: Any) -> bool:
    try:
        encode(value)
        return True
    except TypeError:  # locks, sockets, lambdas, bound methods: behaviour, not strategy state
        return False


def strategy_state(strategy: Any) -> dict[str, Any]:
    """The strategy's attributes that are data (moments, variates, current arrays), not behaviour."""
    return {k: v for k, v in vars(strategy).items() if not callable(v) and _is_data(v)}


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@dataclass
class Checkpointer:
    root: Path  # this run's folder: <checkpoint dir>/<config hash>
    every: int  # checkpoint after every `every`-th round
    weights: str | None = None  # the backbone's weights fingerprint: a resume must continue on the same weights

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], weights: str | None = None) -> Checkpointer | None:
        """None when checkpointing is off (`checkpoint.every=0`). `weights`: the backbone's fingerprint."""
        from flbench.experiment import config_hash
        from flbench.results.record import result_config

        options = cfg.get("checkpoint") or {}
        every = options.get("every", 0) or 0
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(f"checkpoint.every={every!r} must be an integer ≥ 0 (0 turns checkpoints off)")
        if every == 0:
            return None
        base = Path(options.get("dir") or Path(cfg["results_dir"]) / "checkpoints")
        return cls(base / config_hash(result_config(cfg)), every, weights)

    # --- server side ------------------------------------------------------------------------------------------
    @property
    def server_path(self) -> Path:
        return self.root / "server.pt"

    def load_server(self) -> dict[str, Any] | None:
        state = _load(self.server_path)
        if state is not None and not (isinstance(state, dict) and state.get("schema") == SCHEMA):
            raise DataFileError(f"checkpoint {self.server_path} is not an flbench {SCHEMA=} checkpoint; delete "
                                f"{self.root} to start this run afresh")
        saved = state.get("weights") if state is not None else None
        if saved is not None and self.weights is not None and saved != self.weights:
            # The config hash is the same on every machine, the tiny CLIP built from it is not (another CPU type
            # builds other weights): continuing would give a record that is half one model, half another.
            raise DataFileError(f"checkpoint {self.server_path} was made with backbone weights {saved}, this process "
                                f"has {self.weights} (built on another CPU type or library build?); resume it where "
                                f"it was made, or delete {self.root} to start this run afresh")
        return state

    def save_server(self, server_round: int, arrays: Mapping[str, torch.Tensor], round_log: Any,
                    strategy: Any) -> None:
        _save(self.server_path, {
            "schema": SCHEMA, "round": server_round, "arrays": dict(arrays), "strategy": strategy_state(strategy),
            "rounds": list(round_log.rounds), "aggregates": list(round_log.aggregates), "rng": rng_state(),
            "elapsed_s": time.perf_counter() - round_log.started, "weights": self.weights,
        })
        log.info("checkpoint: round %d saved to %s", server_round, self.server_path)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def attach(self, strategy: Any, evaluate_fn: Callable[[int, ArrayRecord], Any], round_log: Any
               ) -> Callable[[int, ArrayRecord], Any]:
        """Resume from the last checkpoint (if any) and save new ones; returns the evaluate_fn to give Flower.

        Call after the strategy is built and wrapped, and after the server seeded `random`."""
        state = self.load_server()
        done = -1  # the last round already in the history (none on a fresh start, not even round 0)
        if state is None:
            # A fresh start: client files of an earlier, unfinished attempt must not leak into this run.
            shutil.rmtree(self.root / "clients", ignore_errors=True)
        else:
            done = int(state["round"])
            vars(strategy).update(state["strategy"])
            round_log.rounds[:] = state["rounds"]
            round_log.aggregates[:] = state["aggregates"]
            round_log.started = time.perf_counter() - float(state["elapsed_s"])
            set_rng_state(state["rng"])
            fast_forward(strategy, done, state["arrays"])
            log.info("checkpoint: resuming after round %d from %s", done, self.server_path)

        def evaluate(server_round: int, arrays: ArrayRecord) -> Any:
            if server_round <= done:
                return None  # already in the restored history
            metrics = evaluate_fn(server_round, arrays)
            if server_round > 0 and server_round % self.every == 0:
                self.save_server(server_round, arrays.to_torch_state_dict() if len(arrays) else {}, round_log,
                                 strategy)
            return metrics

        return evaluate

    # --- client side ------------------------------------------------------------------------------------------
    def _client_dir(self, partition_id: int) -> Path:
        return self.root / "clients" / str(partition_id)

    @staticmethod
    def _rounds(folder: Path) -> list[int]:
        return sorted(int(p.stem.removeprefix("round_")) for p in folder.glob("round_*.pt")) if folder.is_dir() \
            else []

    def save_client(self, partition_id: int, server_round: int, state: RecordDict) -> None:
        """After the client's training in `server_round`. Older files are pruned, keeping the newest one that a
        resume from the last server checkpoint (at most `every` rounds back) could need."""
        if not len(state):
            return
        folder = self._client_dir(partition_id)
        _save(folder / f"round_{server_round}.pt", {"round": server_round, "state": dict(state.items())})
        rounds = self._rounds(folder)
        older = [r for r in rounds if r < server_round - self.every]
        for r in older[:-1]:
            (folder / f"round_{r}.pt").unlink(missing_ok=True)

    def restore_client(self, partition_id: int, server_round: int, state: RecordDict) -> bool:
        """Fill an empty (restarted) client state from the newest file written before `server_round`."""
        if len(state):
            return False
        folder = self._client_dir(partition_id)
        for r in reversed([r for r in self._rounds(folder) if r < server_round]):
            saved = _load(folder / f"round_{r}.pt")
            if saved is not None:
                for key, value in saved["state"].items():
                    state[key] = value
                return True
        return False


def fast_forward(strategy: Any, done: int, arrays: Mapping[str, torch.Tensor]) -> None:
    """Make rounds 1..done of Flower's loop no-ops that end with the checkpointed aggregate."""
    configure_train, aggregate_train = strategy.configure_train, strategy.aggregate_train
    configure_evaluate, aggregate_evaluate = strategy.configure_evaluate, strategy.aggregate_evaluate

    def ff_configure_train(server_round: int, *args: Any, **kwargs: Any) -> Iterable[Any]:
        return [] if server_round <= done else configure_train(server_round, *args, **kwargs)

    def ff_aggregate_train(server_round: int, replies: Iterable[Any]) -> Any:
        if server_round < done:
            return None, None
        if server_round == done:
            return (ArrayRecord(dict(arrays)) if arrays else None), None
        return aggregate_train(server_round, replies)

    def ff_configure_evaluate(server_round: int, *args: Any, **kwargs: Any) -> Iterable[Any]:
        return [] if server_round <= done else configure_evaluate(server_round, *args, **kwargs)

    def ff_aggregate_evaluate(server_round: int, replies: Iterable[Any]) -> Any:
        return None if server_round <= done else aggregate_evaluate(server_round, replies)

    strategy.configure_train = ff_configure_train
    strategy.aggregate_train = ff_aggregate_train
    strategy.configure_evaluate = ff_configure_evaluate
    strategy.aggregate_evaluate = ff_aggregate_evaluate
