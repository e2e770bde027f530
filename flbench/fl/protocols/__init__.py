"""FL protocols: a Flower strategy on the server, plus whatever the protocol asks of a client's local steps.

A protocol is registered by name (== its module here == conf/protocol/<name>.yaml) as a `Protocol`: a factory for
the server's Flower strategy and, where the protocol needs one, a `ClientSide` that adds gradient hooks to local
training (FedProx's proximal term, SCAFFOLD's correction) and records to the reply. Flower strategies are used as
they are; only what Flower lacks (SCAFFOLD, local-only training) is written here.

Modules: `flower` (FedAvg, FedAdam, FedYogi, FedAdagrad, FedAvgM), `fedprox`, `scaffold`, `local` (local and
centralized). System heterogeneity (client sampling, stragglers, failures) applies to every protocol and lives in
`flbench.fl.heterogeneity`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from flbench.algorithms.base import Encoded, PromptMethod
from flbench.datasets.base import ImageSet
from flbench.engine import GradientHook, LocalResult
from flbench.errors import ConfigError
from flbench.registry import Registry


@dataclass
class ClientRound:
    """Everything a protocol's client side may use in one round of one client's local training."""

    method: PromptMethod  # loaded with the server's shared state (or the client's own, protocol=local)
    global_state: Mapping[str, torch.Tensor]  # what the server sent, before any local step
    config: ConfigRecord  # the server's train config ("server-round", "proximal-mu", …)
    content: RecordDict  # the whole incoming message (extra records such as SCAFFOLD's server control variate)
    state: RecordDict  # the client's Flower Context.state: persists across rounds, never leaves the client
    images: ImageSet  # this client's training shard
    cached: Encoded | None  # its frozen image features, when the method allows caching
    train_cfg: Mapping[str, Any]  # the `train` config group (lr, batch size, epochs, optimizer)
    scratch: dict[str, Any] = field(default_factory=dict)  # hooks() → finish() within the round


class ClientSide:
    """What a protocol does inside a client. The default (FedAvg and every server-only strategy) does nothing."""

    def hooks(self, rnd: ClientRound) -> tuple[GradientHook, ...]:
        """Gradient hooks for this round's local steps (called after the method is loaded, before training)."""
        return ()

    def finish(self, rnd: ClientRound, result: LocalResult, reply: RecordDict) -> None:
        """After local training: update client-held protocol state, add extra records to the reply."""


StrategyFactory = Callable[[Mapping[str, Any], dict[str, Any]], Strategy]


@dataclass
class Protocol:
    strategy: StrategyFactory  # (protocol config, common Flower kwargs) → Strategy
    client: ClientSide = field(default_factory=ClientSide)
    aggregates: bool = True  # False for "local": clients keep training their own model, the server's is unused
    centralized: bool = False  # True: one node holding the union of every training client's shard
    # Size of a message relative to the shared state, each way: SCAFFOLD also sends control variates (2), local
    # training communicates nothing (0).
    communication: float = 1.0


PROTOCOLS: Registry[Protocol] = Registry("protocols", "protocol.name")
register = PROTOCOLS.register


def get_protocol(name: str) -> Protocol:
    protocol = PROTOCOLS.get(name)
    if not isinstance(protocol, Protocol):
        raise ConfigError(f"protocol.name={name!r} is {protocol!r}, not a flbench.fl.protocols.Protocol")
    return protocol


def sampling_kwargs(cfg: Mapping[str, Any], num_nodes: int) -> dict[str, Any]:
    """Flower's sampling settings from protocol config: fraction of clients per round, minimum counts.

    Flower samples int(fraction·N) nodes, but never fewer than `min_train_nodes`; the ServerApp gives its sampler a
    generator seeded per round and lists nodes in partition order, so both backends pick the same clients.
    """
    fraction = float(cfg.get("fraction", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"protocol.fraction={fraction} must be in (0, 1]")
    min_train = max(1, min(num_nodes, int(cfg.get("min_clients", 1))))
    return dict(fraction_train=fraction, min_train_nodes=min_train, min_available_nodes=num_nodes)


def option(cfg: Mapping[str, Any], key: str, default: float) -> float:
    """A numeric protocol option (null in YAML means the default)."""
    value = cfg.get(key)
    return float(default if value is None else value)


# Importing the protocol modules registers them; PROTOCOLS is complete once this package is imported.
from flbench.fl.protocols import fedprox, flower, local, scaffold  # noqa: E402,F401
