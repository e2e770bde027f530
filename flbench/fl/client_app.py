"""The ClientApp: one client's local training (and, for personalised scenarios, evaluation).

Shared parameters arrive in the message; client-local parameters (personal prompts, control variates) live in
the client's Flower `Context.state` between rounds — never averaged, never lost. The experiment (data, backbone,
cached features) is looked up per process, so every simulated client in a process shares one frozen backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flbench.engine import train_local
from flbench.experiment import derive_seed, get_experiment
from flbench.fl.protocols import get_protocol

log = logging.getLogger(__name__)

LOCAL_KEY = "flbench.local"
CLIENT_META = "flbench.client"


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict() if len(record) else {}


def load_client_method(cfg: Mapping[str, Any], global_state: Mapping[str, torch.Tensor], context: Context):
    """The process's method reset to its initial state, then the server's shared state, then this client's own."""
    experiment = get_experiment(cfg)
    method = experiment.fresh()
    method.load_partial(global_state)
    if LOCAL_KEY in context.state:
        method.load_partial(to_state(context.state[LOCAL_KEY]))
    return experiment, method


def make_client_app(cfg: Mapping[str, Any]) -> ClientApp:
    """A ClientApp bound to a resolved config (a plain dict, so it pickles into Ray workers)."""
    app = ClientApp()
    protocol = get_protocol(cfg["protocol"]["name"])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition_id = int(context.node_config["partition-id"])
        config = msg.content["config"]
        server_round = int(config["server-round"])
        torch.manual_seed(derive_seed(int(cfg["seed"]), server_round, partition_id, 1))
        global_state = to_state(msg.content["arrays"])
        experiment, method = load_client_method(cfg, global_state, context)
        hooks = protocol.client.hooks(method, global_state, config, context.state)
        generator = torch.Generator().manual_seed(derive_seed(int(cfg["seed"]), server_round, partition_id, 2))
        result = train_local(method, experiment.client_images(partition_id), cfg["train"], generator,
                             cached=experiment.client_cache(partition_id), gradient_hooks=hooks)
        local = method.local_state()
        if local:
            context.state[LOCAL_KEY] = ArrayRecord(local)
        reply = RecordDict({
            "arrays": ArrayRecord(method.shared_state()),
            "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                                     "local_steps": result.steps}),
            CLIENT_META: ConfigRecord({"partition-id": partition_id}),
        })
        protocol.client.finish(method, global_state, result, config, context.state, reply)
        return Message(reply, reply_to=msg)

    return app
