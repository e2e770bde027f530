"""FL protocols against hand-computed updates on tiny least-squares problems, through the real Flower strategies,
the real ClientApp (with a stand-in experiment) and the in-process grid; plus system heterogeneity and sampling."""

from __future__ import annotations

import logging
import random
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from flbench.algorithms.base import PromptMethod
from flbench.datasets.base import ImageSet
from flbench.engine import train_local
from flbench.experiment import Experiment
from flbench.fl.backends import InProcessGrid
from flbench.fl.client_app import OWN_KEY, make_client_app
from flbench.fl.heterogeneity import fails, straggler_steps
from flbench.fl.protocols import ClientRound, get_protocol, sampling_kwargs
from flbench.fl.protocols.fedprox import ProximalClient
from flbench.fl.protocols.scaffold import CLIENT_C
from flbench.fl.server_app import PartitionOrderedGrid

SGD = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the process's task identity (run_inprocess sets it the same way); its
    per-round INFO log would dominate these tests' time."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
    flower_log = logging.getLogger("flwr")
    level = flower_log.level
    flower_log.setLevel(logging.WARNING)
    yield
    flower_log.setLevel(level)


class LeastSquares(PromptMethod):
    """A 'method' whose shared state is one vector w; its cached features are rows [x, t]; loss ½·mean (x·w − t)²."""

    def __init__(self, dim: int) -> None:
        super().__init__(SimpleNamespace(device=torch.device("cpu")), ["y"], [])  # no CLIP: only its device
        self.w = nn.Parameter(torch.zeros(dim))

    def loss(self, encoded: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((encoded[:, :-1] @ self.w - encoded[:, -1]) ** 2).mean()


class Rows(ImageSet):
    def __init__(self, n: int) -> None:
        self.labels = np.zeros(n, np.int64)
        self.domains = np.zeros(n, np.int64)


class ToyFederation:
    """What the ClientApp asks of an Experiment, for clients holding least-squares data."""

    def __init__(self, data: list[torch.Tensor]) -> None:
        self.data = data
        self.method = LeastSquares(data[0].shape[1] - 1)
        self.initial = {k: v.clone() for k, v in self.method.state_dict().items()}
        self.scenario = SimpleNamespace(personal=False)

    def fresh(self) -> LeastSquares:
        self.method.load_state_dict(self.initial)
        return self.method

    def client_images(self, partition_id: int) -> Rows:
        return Rows(len(self.data[partition_id]))

    def client_cache(self, partition_id: int) -> torch.Tensor:
        return self.data[partition_id]


def grad(data: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x, t = data[:, :-1], data[:, -1]
    return x.t() @ (x @ w - t) / len(data)


def gd(data: torch.Tensor, w: torch.Tensor, steps: int, lr: float, extra=lambda w: 0.0) -> torch.Tensor:
    for _ in range(steps):
        w = w - lr * (grad(data, w) + extra(w))
    return w


def federate(name: str, data: list[torch.Tensor], rounds: int, local_steps: int, protocol: dict | None = None,
             train: dict | None = None):
    """Run `rounds` of protocol `name` with full-batch local steps; returns (Flower result, strategy, grid)."""
    cfg = {"seed": 0, "protocol": {"name": name, **(protocol or {})},
           "train": {**SGD, "batch_size": max(len(d) for d in data), "epochs": local_steps, **(train or {})}}
    federation = ToyFederation(data)
    grid = InProcessGrid(make_client_app(cfg, experiment_fn=lambda _: federation), len(data))
    common = dict(sampling_kwargs(cfg["protocol"], len(data)), fraction_evaluate=0.0)
    strategy = get_protocol(name).strategy(cfg["protocol"], common)
    random.seed(0)
    result = strategy.start(grid=PartitionOrderedGrid(grid), num_rounds=rounds,
                            initial_arrays=ArrayRecord(federation.fresh().shared_state()))
    return result, strategy, grid


def final_w(result) -> torch.Tensor:
    return result.arrays.to_torch_state_dict()["w"]


# Two clients whose curvatures differ: local optima pull FedAvg away from the global optimum (client drift).
DRIFT = [torch.tensor([[3.0, 0.0, 3.0], [0.0, 0.5, 1.0]]), torch.tensor([[0.5, 0.0, -1.0], [0.0, 3.0, 3.0]])]


def global_optimum(data: list[torch.Tensor]) -> torch.Tensor:
    hessian = sum(d[:, :-1].t() @ d[:, :-1] / len(d) for d in data)
    target = sum(d[:, :-1].t() @ d[:, -1] / len(d) for d in data)
    return torch.linalg.solve(hessian, target)


# --- FedAvg / FedProx -----------------------------------------------------------------------------------------
def test_fedavg_round_is_the_weighted_mean_of_local_gd():
    data = [DRIFT[0], torch.cat([DRIFT[1], DRIFT[1][:1]])]  # 2 and 3 examples
    result, _, _ = federate("fedavg", data, rounds=1, local_steps=3)
    w0 = torch.zeros(2)
    expected = (2 * gd(data[0], w0, 3, 0.1) + 3 * gd(data[1], w0, 3, 0.1)) / 5
    assert torch.allclose(final_w(result), expected, atol=1e-6)


def test_fedprox_client_adds_mu_times_distance_to_the_gradient():
    method, anchor = LeastSquares(2), torch.tensor([1.0, -2.0])
    method.w.data = torch.tensor([0.5, 0.5])
    rnd = ClientRound(method, {"w": anchor}, ConfigRecord({"proximal-mu": 0.3}), RecordDict(), RecordDict(), Rows(2),
                      DRIFT[0], SGD)
    train_local(method, Rows(2), {**SGD, "batch_size": 2}, torch.Generator(), cached=DRIFT[0],
                gradient_hooks=ProximalClient().hooks(rnd))
    w0 = torch.tensor([0.5, 0.5])
    expected = w0 - 0.1 * (grad(DRIFT[0], w0) + 0.3 * (w0 - anchor))
    assert torch.allclose(method.w.data, expected, atol=1e-6)


def test_fedprox_round_uses_the_mu_flower_sends():
    mu = 0.5
    result, _, _ = federate("fedprox", DRIFT, rounds=2, local_steps=3, protocol={"mu": mu})
    w = torch.zeros(2)
    for _ in range(2):
        anchor = w.clone()
        w = sum(gd(d, anchor, 3, 0.1, extra=lambda v: mu * (v - anchor)) for d in DRIFT) / 2
    assert torch.allclose(final_w(result), w, atol=1e-5)
    plain, _, _ = federate("fedavg", DRIFT, rounds=2, local_steps=3)
    assert not torch.allclose(final_w(result), final_w(plain), atol=1e-3), "μ must change the update"


# --- server optimisers --------------------------------------------------------------------------------------------
def _server_round(strategy, server_round: int, x: np.ndarray, ys: list[np.ndarray]) -> np.ndarray:
    """One round of a strategy's configure/aggregate on hand-made replies (equal weights)."""
    grid = InProcessGrid(ClientApp(), len(ys))
    messages = list(strategy.configure_train(server_round, ArrayRecord({"w": torch.tensor(x)}), ConfigRecord(), grid))
    replies = []
    for message, y in zip(messages, ys):
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": torch.tensor(y)}),
                                           "metrics": MetricRecord({"num-examples": 1})}), reply_to=message))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict()["w"].numpy()


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimisers_match_their_update_rules(name):
    cfg = {"eta": 0.05, "tau": 0.01, "beta_1": 0.9, "beta_2": 0.99, "server_lr": 0.7, "server_momentum": 0.9}
    strategy = get_protocol(name).strategy(cfg, dict(sampling_kwargs({}, 2), fraction_evaluate=0.0))
    x = np.array([0.2, -0.1], np.float32)
    rounds = [[np.array([0.4, -0.1], np.float32), np.array([0.2, 0.3], np.float32)],
              [np.array([0.1, 0.0], np.float32), np.array([0.3, 0.1], np.float32)]]
    m = v = momentum = np.zeros(2)
    expected = x.astype(np.float64)
    for t, ys in enumerate(rounds, start=1):
        got = _server_round(strategy, t, expected.astype(np.float32), ys)
        delta = np.mean(ys, axis=0) - expected
        if name == "fedavgm":  # Hsu et al.: momentum on the pseudo-gradient x − ȳ
            momentum = (x - np.mean(ys, axis=0)) if t == 1 else 0.9 * momentum + (expected - np.mean(ys, axis=0))
            expected = expected - 0.7 * momentum
        elif name == "fedadagrad":  # Reddi et al.: v ← v + Δ², x ← x + η Δ / (√v + τ)
            v = v + delta ** 2
            expected = expected + 0.05 * delta / (np.sqrt(v) + 0.01)
        else:
            m = 0.9 * m + 0.1 * delta
            if name == "fedadam":  # Adam with Flower's bias correction (its round counter starts at t + 1)
                v = 0.99 * v + 0.01 * delta ** 2
                step = 0.05 * np.sqrt(1 - 0.99 ** (t + 1)) / (1 - 0.9 ** (t + 1))
            else:  # Yogi: v ← v − (1 − β₂) Δ² sign(v − Δ²)
                v = v - 0.01 * delta ** 2 * np.sign(v - delta ** 2)
                step = 0.05
            expected = expected + step * m / (np.sqrt(v) + 0.01)
        assert np.allclose(got, expected, atol=1e-5), (name, t, got, expected)


# --- SCAFFOLD ----------------------------------------------------------------------------------------------------
def test_scaffold_round_matches_the_paper_option_ii():
    """One round from c = c_i = 0 with plain SGD: y_i = K GD steps, c_i⁺ = (x − y_i)/(Kη), c = |S|/N · mean Δc_i."""
    result, strategy, grid = federate("scaffold", DRIFT, rounds=1, local_steps=4,
                                      protocol={"control_update": "difference", "server_lr": 0.5})
    x = torch.zeros(2)
    ys = [gd(d, x, 4, 0.1) for d in DRIFT]
    assert torch.allclose(final_w(result), x + 0.5 * (sum(ys) / 2 - x), atol=1e-6)
    client_cs = [(x - y) / (4 * 0.1) for y in ys]
    for context, expected in zip(grid.contexts.values(), client_cs):
        assert torch.allclose(context.state[CLIENT_C].to_torch_state_dict()["w"], expected, atol=1e-5)
    assert np.allclose(strategy.control["w"], (sum(client_cs) / 2).numpy(), atol=1e-5)


def test_scaffold_option_i_control_is_the_gradient_at_the_server_model():
    _, strategy, grid = federate("scaffold", DRIFT, rounds=1, local_steps=4)
    for context, data in zip(grid.contexts.values(), DRIFT):
        assert torch.allclose(context.state[CLIENT_C].to_torch_state_dict()["w"], grad(data, torch.zeros(2)))
    # c is the mean over all N clients of their c_i; with half the clients sampled, |S|/N = 1/2 of the mean Δc
    _, half, grid = federate("scaffold", DRIFT, rounds=1, local_steps=4, protocol={"fraction": 0.5})
    trained = [c for c in grid.contexts.values() if CLIENT_C in c.state]
    assert len(trained) == 1
    assert np.allclose(half.control["w"], trained[0].state[CLIENT_C].to_torch_state_dict()["w"].numpy() / 2)


def test_scaffold_corrects_the_drift_that_fedavg_suffers():
    optimum = global_optimum(DRIFT)
    fedavg, _, _ = federate("fedavg", DRIFT, rounds=30, local_steps=10)  # converged after ~10
    assert (final_w(fedavg) - optimum).norm() > 0.2, "the problem must make FedAvg drift, or the test shows nothing"
    for update, rounds in (("difference", 30), ("gradient", 80)):  # option I lags a round behind: slower here
        scaffold, _, _ = federate("scaffold", DRIFT, rounds=rounds, local_steps=10,
                                  protocol={"control_update": update})
        assert (final_w(scaffold) - optimum).norm() < 1e-3, update


# --- local and centralized ----------------------------------------------------------------------------------------
def test_local_clients_train_alone_and_the_server_model_never_moves():
    result, _, grid = federate("local", DRIFT, rounds=2, local_steps=3)
    assert not result.arrays, "no aggregate may ever be produced"
    for context, data in zip(grid.contexts.values(), DRIFT):
        own = context.state[OWN_KEY].to_torch_state_dict()["w"]
        assert torch.allclose(own, gd(data, torch.zeros(2), 6, 0.1), atol=1e-6)  # 2 rounds × 3 steps, alone


def _stub_experiment(shards: list[np.ndarray], unseen_fraction: float = 0.0) -> Experiment:
    experiment = Experiment.__new__(Experiment)
    experiment.seed, experiment.shards = 0, shards
    experiment.scenario = SimpleNamespace(unseen_fraction=unseen_fraction)
    return experiment


def test_centralized_is_one_node_with_every_training_shard():
    shards = [np.array([4, 0]), np.array([1, 7]), np.array([2, 3])]
    experiment = _stub_experiment(shards)
    experiment._layout_nodes(get_protocol("centralized"))
    assert experiment.num_nodes == 1 and experiment.node_clients == [[0, 1, 2]]
    assert np.array_equal(experiment.node_shards[0], [0, 1, 2, 3, 4, 7])
    experiment._layout_nodes(get_protocol("fedavg"))
    assert experiment.num_nodes == 3 and all(np.array_equal(a, np.sort(b)) for a, b in zip(experiment.node_shards, shards))
    held = _stub_experiment(shards, unseen_fraction=0.34)
    held._layout_nodes(get_protocol("centralized"))
    assert len(held.heldout_clients) == 1 and held.heldout_clients[0] not in held.node_clients[0]
    assert len(held.node_shards[0]) == 4


# --- system heterogeneity and sampling ------------------------------------------------------------------------
def test_stragglers_run_the_configured_share_of_their_steps():
    full, _, _ = federate("fedavg", DRIFT, rounds=1, local_steps=10)
    slow, _, _ = federate("fedavg", DRIFT, rounds=1, local_steps=10,
                          protocol={"stragglers": 1.0, "straggler_work": 0.3})
    assert full.train_metrics_clientapp[1]["local_steps"] == 10
    assert slow.train_metrics_clientapp[1]["local_steps"] == 3
    w0 = torch.zeros(2)
    assert torch.allclose(final_w(slow), sum(gd(d, w0, 3, 0.1) for d in DRIFT) / 2, atol=1e-6)


def test_failures_and_stragglers_are_seeded_per_round_and_client():
    cfg = {"seed": 3, "protocol": {"failure_prob": 0.3, "stragglers": 0.4}, "train": {"batch_size": 4}}
    draws = [(fails(cfg, r, c), straggler_steps(cfg, r, c, 40)) for r in range(1, 51) for c in range(20)]
    assert draws == [(fails(cfg, r, c), straggler_steps(cfg, r, c, 40)) for r in range(1, 51) for c in range(20)]
    assert abs(np.mean([f for f, _ in draws]) - 0.3) < 0.05
    assert abs(np.mean([s is not None for _, s in draws]) - 0.4) < 0.05
    assert {s for _, s in draws} == {None, 5}  # half of 10 steps


def test_a_round_where_every_client_fails_keeps_the_model():
    result, _, _ = federate("fedavg", DRIFT, rounds=2, local_steps=2, protocol={"failure_prob": 1.0})
    assert not result.arrays and not result.train_metrics_clientapp


def test_sampling_picks_the_same_partitions_whatever_the_node_ids():
    """Ray gives nodes random ids; listed in partition order, seeded sampling picks the same clients."""
    def sampled(grid) -> list[int]:
        random.seed(11)
        strategy = FedAvg(fraction_train=0.3, min_train_nodes=1, min_available_nodes=10, fraction_evaluate=0.0)
        picks = []
        for rnd in (1, 2, 3):
            messages = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)
            picks.append(sorted(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"]
                                if hasattr(grid, "contexts") else grid.grid.contexts[m.metadata.dst_node_id]
                                .node_config["partition-id"] for m in messages))
        return picks

    app = make_client_app({"seed": 0, "protocol": {"name": "fedavg"}, "train": SGD})
    ordered = InProcessGrid(app, 10)
    shuffled = InProcessGrid(app, 10)
    ids = random.Random(5).sample(range(10**6, 10**7), 10)
    shuffled.contexts = {new: shuffled.contexts[old] for new, old in
                         sorted(zip(ids, shuffled.contexts), key=lambda pair: pair[0] % 7)}
    assert sampled(PartitionOrderedGrid(shuffled)) == sampled(ordered)
    assert sampled(shuffled) != sampled(ordered), "without the ordering the test would not detect anything"
