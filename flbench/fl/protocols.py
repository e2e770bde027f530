"""FL protocols: a Flower strategy on the server, plus whatever the protocol asks of a client's local steps.

A protocol is registered by name with a `Protocol` that builds the strategy and, when the protocol needs it,
client-side behaviour (FedProx's proximal term, SCAFFOLD's control variates) as gradient hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy

from flbench.algorithms.base import PromptMethod
from flbench.engine import GradientHook, LocalResult
from flbench.errors import ConfigError


class ClientSide:
    """What a protocol does inside a client. The default (FedAvg and every server-only strategy) does nothing."""

    def hooks(self, method: PromptMethod, global_state: Mapping[str, torch.Tensor], config: ConfigRecord,
              state: RecordDict) -> tuple[GradientHook, ...]:
        return ()

    def finish(self, method: PromptMethod, global_state: Mapping[str, torch.Tensor], result: LocalResult,
               config: ConfigRecord, state: RecordDict, reply: RecordDict) -> None:
        """After local training: update client-held protocol state, add extra records to the reply."""


StrategyFactory = Callable[[Mapping[str, Any], dict[str, Any]], Strategy]


@dataclass
class Protocol:
    strategy: StrategyFactory
    client: ClientSide = field(default_factory=ClientSide)
    aggregates: bool = True  # False for "local": clients never receive the aggregate


PROTOCOLS: dict[str, Protocol] = {}


def register(name: str, protocol: Protocol) -> None:
    PROTOCOLS[name] = protocol


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol.name={name!r} is unknown; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def sampling_kwargs(cfg: Mapping[str, Any], num_clients: int) -> dict[str, Any]:
    """Flower's sampling settings from protocol config: fraction of clients per round, minimum counts."""
    fraction = float(cfg.get("fraction", 1.0))
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"protocol.fraction={fraction} must be in (0, 1]")
    min_train = max(1, min(num_clients, int(cfg.get("min_clients", 1))))
    return dict(fraction_train=fraction, min_train_nodes=min_train, min_available_nodes=num_clients)


register("fedavg", Protocol(lambda cfg, common: FedAvg(**common)))
