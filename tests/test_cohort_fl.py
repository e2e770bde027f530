"""Cohorts in the federation: the in-process grid hands a round's train messages to the ClientApp's cohort trainer,
which answers as the clients would one at a time — same replies (arrays, metrics, protocol records, injected
failures), same kept client state, same records — to the fp32 reassociation tolerance of tests/test_cohort.py.
Errors name the client whose part failed; checkpoint/resume gives the uninterrupted sequential record."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

import flbench.fl.client_app as client_app
from flbench.algorithms.coop import CoOp
from flbench.errors import ClientError, ConfigError
from flbench.experiment import get_experiment
from flbench.fl.backends import InProcessGrid
from flbench.fl.protocols import get_protocol, sampling_kwargs
from flbench.run import run
from helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
HETEROGENEOUS = ["protocol.stragglers=0.5", "protocol.failure_prob=0.25", "partition=quantity-skew"]
CASES = [("coop", "fedavg", HETEROGENEOUS), ("kgcoop", "fedprox", []), ("coop", "scaffold", []),
         ("fedpgp", "scaffold", ["protocol.control_update=difference", "train.optimizer=sgd", "train.momentum=0",
                                 "scenario=personal"]),
         ("promptfolio", "local", ["scenario=personal"]), ("dpfpl", "fedavg", ["scenario=personal", *HETEROGENEOUS]),
         # augmentation draws from torch's global stream while loading (uncached) or per step (cached views)
         ("dpfpl", "fedprox", ["scenario=personal", "train.augment=true", "cache_features=false"]),
         ("prograd", "fedavg", ["train.augment=true", "cache_views=2"])]


class Federation:
    """Two in-process grids over one experiment: clients one at a time (`backend.cohort_size=1`) and as cohorts."""

    def __init__(self, overrides: list[str]) -> None:
        # Flower stamps messages with the task identity its runtimes (and flbench's run_inprocess) set
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
        self.cfg = compose_config(["checkpoint.every=0", *overrides])
        self.experiment = get_experiment(self.cfg)
        n = self.experiment.num_nodes
        sequential = {**self.cfg, "backend": {**self.cfg["backend"], "cohort_size": 1}}
        self.grids = {name: InProcessGrid(client_app.make_client_app(cfg, experiment_fn=lambda _: self.experiment), n)
                      for name, cfg in (("sequential", sequential), ("cohort", self.cfg))}
        protocol = self.cfg["protocol"]
        self.strategy = get_protocol(protocol["name"]).strategy(protocol, dict(sampling_kwargs(protocol, n),
                                                                              fraction_evaluate=0.0))

    def round(self, name: str, server_round: int) -> list:
        grid = self.grids[name]
        random.seed(server_round)  # Flower samples with `random`: both grids get the same clients
        arrays = ArrayRecord(self.experiment.fresh().shared_state())
        messages = list(self.strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        return list(grid.pull_messages(grid.push_messages(messages)))


def _same_records(a, b, where: str) -> None:
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], ArrayRecord):
            x, y = a[key].to_torch_state_dict(), b[key].to_torch_state_dict()
            assert set(x) == set(y), (where, key)
            for name in x:
                assert torch.allclose(x[name], y[name], **TOLERANCE), (where, key, name)
        else:
            assert dict(a[key]) == pytest.approx(dict(b[key]), rel=1e-5, abs=1e-6), (where, key)


@pytest.mark.parametrize("algorithm, protocol, extra", CASES, ids=[f"{a}-{p}" for a, p, _ in CASES])
def test_a_cohort_round_answers_as_the_clients_one_at_a_time(algorithm, protocol, extra):
    federation = Federation([f"algorithm={algorithm}", f"protocol={protocol}", *extra])
    cohorts = []
    real = client_app.train_cohort
    client_app_spy = lambda method, members, cfg: cohorts.append(len(members)) or real(method, members, cfg)  # noqa
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client_app, "train_cohort", client_app_spy)
        for server_round in (1, 2):  # round 2 starts from what each client kept after round 1
            alone, together = federation.round("sequential", server_round), federation.round("cohort", server_round)
            assert len(alone) == len(together) > 0
            for a, b in zip(alone, together):
                assert a.metadata.src_node_id == b.metadata.src_node_id
                assert a.has_error() == b.has_error()
                if a.has_error():
                    assert a.error.code == b.error.code
                else:
                    _same_records(a.content, b.content, f"round {server_round} reply")
    assert cohorts and max(cohorts) > 1, "the cohort grid trained clients together"
    for node, context in federation.grids["sequential"].contexts.items():
        _same_records(context.state, federation.grids["cohort"].contexts[node].state, f"node {node} state")
    if extra == HETEROGENEOUS or HETEROGENEOUS[0] in extra:
        replies = alone + together
        assert any(r.has_error() for r in replies), "an injected failure was exercised"
        assert any(not r.has_error() and r.content["metrics"]["straggler"] for r in replies), "and a straggler"


def test_a_cohort_run_gives_the_sequential_record(tmp_path):
    overrides = ["checkpoint.every=0", *HETEROGENEOUS, "num_rounds=2"]
    sequential = run(compose_config([*overrides, "backend.cohort_size=1"], results_dir=tmp_path / "sequential"))
    cohort = run(compose_config(overrides, results_dir=tmp_path / "cohort"))
    assert cohort["config_hash"] == sequential["config_hash"], "the backend is no part of the result"
    for a, b in zip(sequential["history"], cohort["history"]):
        assert {k: v for k, v in b.items() if k != "time_s"} == pytest.approx(
            {k: v for k, v in a.items() if k != "time_s"}, rel=1e-5, abs=1e-6)
    assert set(cohort["metrics"]) == set(sequential["metrics"])
    for name, summary in sequential["metrics"].items():
        assert cohort["metrics"][name] == pytest.approx(summary, rel=1e-5, abs=1e-6), name


def test_an_interrupted_cohort_run_resumes_to_the_sequential_record(tmp_path, monkeypatch):
    overrides = ["num_rounds=3", "checkpoint.every=1", "protocol=scaffold", "protocol.fraction=0.5"]
    real = client_app.straggler_steps

    def failing_in_round_3(cfg, server_round, partition_id, num_examples):
        if server_round == 3:
            raise OSError("disk gone")
        return real(cfg, server_round, partition_id, num_examples)

    monkeypatch.setattr(client_app, "straggler_steps", failing_in_round_3)
    cfg = compose_config(overrides, results_dir=tmp_path / "resumed")
    with pytest.raises(ClientError, match=r"client \d failed: OSError: disk gone"):
        run(cfg)
    monkeypatch.setattr(client_app, "straggler_steps", real)
    resumed = run(cfg)
    reference = run(compose_config([*overrides, "checkpoint.every=0", "backend.cohort_size=1"],
                                   results_dir=tmp_path / "reference"))
    for a, b in zip(reference["history"], resumed["history"]):
        assert {k: v for k, v in b.items() if k != "time_s"} == pytest.approx(
            {k: v for k, v in a.items() if k != "time_s"}, rel=1e-5, abs=1e-6)


def test_errors_name_the_client_whose_part_failed(monkeypatch):
    federation = Federation([])
    real_cache = federation.experiment.client_cache

    def cache(partition_id):
        if partition_id == 2:
            raise ConfigError("client 2's features are unreadable")
        return real_cache(partition_id)

    monkeypatch.setattr(federation.experiment, "client_cache", cache)
    with pytest.raises(ConfigError, match=r"^client 2: client 2's features"):  # FlbenchErrors keep their type
        federation.round("cohort", 1)
    monkeypatch.setattr(federation.experiment, "client_cache", real_cache)

    losses = []
    real_loss = CoOp.text_loss

    def text_loss(self, *args):  # the second client's part of the joint step
        losses.append(1)
        if len(losses) == 2:
            raise RuntimeError("nan in the head")
        return real_loss(self, *args)

    owners = []
    real_cohort = client_app.train_cohort
    monkeypatch.setattr(client_app, "train_cohort", lambda m, members, c: owners.extend(
        member.state.owner for member in members) or real_cohort(m, members, c))
    monkeypatch.setattr(CoOp, "text_loss", text_loss)
    with pytest.raises(ClientError, match=r"^client (\d) failed: RuntimeError: nan in the head") as raised:
        federation.round("cohort", 1)
    assert raised.match(f"^client {owners[1]} "), "the second client of the cohort, not the first or the cohort"
    monkeypatch.setattr(CoOp, "text_loss", real_loss)

    def joint(self, states, encoded, labels):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(CoOp, "cohort_backward", joint)
    with pytest.raises(ClientError, match=r"^clients 0, 1, 2, 3 \(one cohort\) failed: RuntimeError: out of memory"):
        federation.round("cohort", 1)


def test_cohort_size_memory_budget_and_fallback(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="flbench.fl.client_app")
    sizes = []
    real = client_app.train_cohort
    monkeypatch.setattr(client_app, "train_cohort", lambda m, members, c: sizes.append(len(members)) or real(m, members, c))
    federation = Federation(["backend.cohort_size=3"])
    federation.round("cohort", 1)
    assert sizes == [2, 2], "4 clients in cohorts of at most 3: two of 2"
    sizes.clear()
    federation = Federation(["backend.cohort_memory_mb=0.01"])  # less than one client's step
    federation.round("cohort", 1)
    assert sizes == [] and "cohorts of at most 1 clients" in caplog.text
    monkeypatch.setattr(CoOp, "stacks", False)
    federation = Federation([])
    federation.round("cohort", 1)
    assert sizes == [] and "clients train one at a time: algorithm coop does not say how its state stacks" in caplog.text
    assert client_app._chunks(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_cohort_keys_are_checked_and_ray_refuses_them():
    from flbench.validation import validate

    for bad, message in (("backend.cohort_size=0", "must be ≥ 1"), ("backend.cohort_memory_mb=-1", "must be > 0")):
        with pytest.raises(ConfigError, match=f"{bad.split('=')[0]}.*{message}"):
            validate(compose_config([bad]))
    with pytest.raises(ConfigError, match="backend.cohort_size is not a known key for backend.name=ray"):
        validate(compose_config(["backend=ray", "+backend.cohort_size=2"]))
