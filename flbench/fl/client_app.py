"""The ClientApp: one client's local training, its own evaluation, and a query for its partition id.

Shared parameters arrive in the message; client-local parameters (personal prompts, control variates, and under
protocol=local the client's whole model) live in the client's Flower `Context.state` between rounds — never
averaged, never lost. The experiment (data, backbone, cached features) is looked up per process, so every
simulated client in a process shares one frozen backbone.

- train: load shared + own state, run the protocol's local steps (with its gradient hooks), reply with the shared
  state and metrics. System heterogeneity (a straggler's smaller step budget, an injected failure) is decided
  here from (seed, round, partition id), identically on every backend.
- evaluate: the client's own model on its personal val/test splits (personalised scenarios), and, under
  protocol=local where no global model exists, on the scenario's shared splits too.
- query: the partition id, so the server can list nodes in partition order (seeded sampling on every backend).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flbench.algorithms.base import PromptMethod
from flbench.engine import train_local
from flbench.experiment import Experiment, derive_seed, get_experiment
from flbench.fl.checkpoint import Checkpointer
from flbench.fl.heterogeneity import INJECTED_FAILURE_CODE, fails, straggler_steps
from flbench.fl.protocols import ClientRound, get_protocol

log = logging.getLogger(__name__)

LOCAL_KEY = "flbench.local"  # the method's client-local state (never sent)
OWN_KEY = "flbench.own"  # protocol=local: the client's own copy of the shared parameters
CLIENT_META = "flbench.client"  # {"partition-id": …} in every reply

ExperimentFn = Callable[[Mapping[str, Any]], Experiment]


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict() if len(record) else {}


def load_client_method(experiment: Experiment, global_state: Mapping[str, torch.Tensor], context: Context,
                       own_model: bool = False) -> PromptMethod:
    """The process's method reset to its initial state, then the server's shared state, then this client's own
    (under protocol=local its own shared parameters replace the server's, which never change)."""
    method = experiment.fresh()
    method.load_partial(global_state)
    if own_model and OWN_KEY in context.state:
        method.load_partial(to_state(context.state[OWN_KEY]))
    if LOCAL_KEY in context.state:
        method.load_partial(to_state(context.state[LOCAL_KEY]))
    return method


def make_client_app(cfg: Mapping[str, Any], experiment_fn: ExperimentFn = get_experiment) -> ClientApp:
    """A ClientApp bound to a resolved config (a plain dict, so it pickles into Ray workers). `experiment_fn` finds
    the process's experiment; tests pass a small stand-in."""
    app = ClientApp()
    protocol = get_protocol(cfg["protocol"]["name"])
    seed = int(cfg["seed"])
    checkpointer = Checkpointer.from_config(cfg)  # a restarted client restores its Context.state from disk

    def meta(partition_id: int) -> ConfigRecord:
        return ConfigRecord({"partition-id": partition_id})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition_id = int(context.node_config["partition-id"])
        config = msg.content["config"]
        server_round = int(config["server-round"])
        if fails(cfg, server_round, partition_id):
            # Before any work and without touching the client's state: as if the device had dropped out.
            return Message(Error(code=INJECTED_FAILURE_CODE, reason="injected failure (protocol.failure_prob)"),
                           reply_to=msg)
        if checkpointer:
            checkpointer.restore_client(partition_id, server_round, context.state)
        torch.manual_seed(derive_seed(seed, server_round, partition_id, 1))
        experiment = experiment_fn(cfg)
        global_state = to_state(msg.content["arrays"])
        method = load_client_method(experiment, global_state, context, own_model=not protocol.aggregates)
        images = experiment.client_images(partition_id)
        rnd = ClientRound(method=method, global_state=global_state, config=config, content=msg.content,
                          state=context.state, images=images, cached=experiment.client_cache(partition_id),
                          train_cfg=cfg["train"])
        hooks = protocol.client.hooks(rnd)
        budget = straggler_steps(cfg, server_round, partition_id, len(images))
        generator = torch.Generator().manual_seed(derive_seed(seed, server_round, partition_id, 2))
        result = train_local(method, images, cfg["train"], generator, cached=rnd.cached, gradient_hooks=hooks,
                             max_steps=budget)
        local = method.local_state()
        if local:
            context.state[LOCAL_KEY] = ArrayRecord(local)
        if not protocol.aggregates:
            context.state[OWN_KEY] = ArrayRecord(method.shared_state())
        reply = RecordDict({
            # protocol=local: nothing travels (an empty record keeps the reply's shape)
            "arrays": ArrayRecord(method.shared_state()) if protocol.aggregates else ArrayRecord(),
            "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                                     "local_steps": result.steps, "straggler": int(budget is not None)}),
            CLIENT_META: meta(partition_id),
        })
        protocol.client.finish(rnd, result, reply)
        if checkpointer:
            checkpointer.save_client(partition_id, server_round, context.state)
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Counts, not accuracies, so the server can weight by samples or average over clients exactly."""
        partition_id = int(context.node_config["partition-id"])
        if checkpointer:
            checkpointer.restore_client(partition_id, int(msg.content["config"]["server-round"]), context.state)
        experiment = experiment_fn(cfg)
        method = load_client_method(experiment, to_state(msg.content["arrays"]), context,
                                    own_model=not protocol.aggregates)
        metrics: dict[str, Any] = {}
        if experiment.scenario.personal:
            rows = experiment.evaluate_personal(method, experiment.node_clients[partition_id])
            metrics.update({f"personal.{k}": [float(r[k]) for r in rows] for k in rows[0]})
        if not protocol.aggregates:  # no global model exists: the client's own model stands in for it
            metrics.update(experiment.evaluate(method, experiment.scenario.val, "val"))
            metrics.update(experiment.evaluate(method, experiment.scenario.test, "test"))
        metrics["num-examples"] = len(experiment.client_images(partition_id))
        return Message(RecordDict({"metrics": MetricRecord(metrics), CLIENT_META: meta(partition_id)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        partition_id = int(context.node_config["partition-id"])
        return Message(RecordDict({CLIENT_META: meta(partition_id)}), reply_to=msg)

    return app
