"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates that correct client drift. Flower has none.

The server keeps the model x and a server control variate c; client i keeps its own c_i (zero at first) in its
Flower Context.state. Each round:

  client:  y ← x;  K local steps  y ← y − η_l (g_i(y) − c_i + c)        (the gradient hook below adds c − c_i)
           c_i⁺ = ∇f_i(x)                         option I ("gradient": one extra pass over the shard at x)
                = c_i − c + (x − y)/(K η_l)        option II ("difference": free, exact only for plain SGD)
           sends y and Δc_i = c_i⁺ − c_i; stores c_i⁺
  server:  x ← x + η_g (ȳ − x)                    (ȳ: FedAvg's example-weighted mean of the replies)
           c ← c + |S|/N · mean_i Δc_i            (so c stays the mean of all N clients' c_i)

Option I is the default because flbench's default local optimiser is AdamW, whose steps are not η_l·gradient, so
option II's difference would not estimate the gradient; with `train.optimizer=sgd` and momentum 0 both are exact.
Only the shared parameters are corrected; client-local ones are the client's own business. The correction acts on
one client's trainable tensors, so in a cohort (flbench.engine.train_cohort) each client gets its own c − c_i.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flbench.engine import GradientHook, LocalResult, mean_gradient
from flbench.errors import ConfigError
from flbench.fl.protocols import ClientRound, ClientSide, Protocol, option, register

SERVER_C = "scaffold.c"  # server → client: the server control variate c
DELTA_C = "scaffold.delta_c"  # client → server: Δc_i
CLIENT_C = "flbench.scaffold"  # the client's c_i in its Context.state
UPDATES = ("gradient", "difference")


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class Scaffold(FedAvg):
    """FedAvg's sampling and weighted mean of the replies, plus the server control variate and server step."""

    def __init__(self, *, num_clients: int, server_lr: float = 1.0, control_update: str = "gradient",
                 **common: Any) -> None:
        super().__init__(**common)
        self.num_clients = num_clients
        self.server_lr = server_lr
        self.control_update = control_update
        self.control: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.current = _numpy(arrays)
        config["scaffold-update"] = self.control_update  # the client follows the server's option, as with FedProx's μ
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = ArrayRecord({k: Array(v.copy()) for k, v in self.control.items()})
        for message in messages:  # FedAvg builds every message on one shared RecordDict; setting it once per
            message.content[SERVER_C] = control  # message is harmless and does not rely on that
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = []
        for reply in replies:  # take Δc out first: FedAvg expects exactly one ArrayRecord per reply
            if not reply.has_error() and DELTA_C in reply.content:
                deltas.append(_numpy(reply.content[DELTA_C]))
                del reply.content[DELTA_C]
        averaged, metrics = super().aggregate_train(server_round, replies)
        if averaged is None or self.current is None or self.control is None:
            return averaged, metrics
        mean_y = _numpy(averaged)
        new_x = {k: (x + self.server_lr * (mean_y[k] - x)).astype(x.dtype) for k, x in self.current.items()}
        if deltas:
            share = len(deltas) / self.num_clients
            self.control = {k: (c + share * np.mean([d[k] for d in deltas], axis=0)).astype(c.dtype)
                            for k, c in self.control.items()}
        return ArrayRecord({k: Array(v) for k, v in new_x.items()}), metrics


class ScaffoldClient(ClientSide):
    def hooks(self, rnd: ClientRound) -> tuple[GradientHook, ...]:
        server_c = rnd.content[SERVER_C].to_torch_state_dict()
        client_c = (rnd.state[CLIENT_C].to_torch_state_dict() if CLIENT_C in rnd.state
                    else {k: torch.zeros_like(v) for k, v in server_c.items()})
        rnd.scratch.update(server_c=server_c, client_c=client_c)
        if rnd.config.get("scaffold-update", "gradient") == "gradient":
            gradient = mean_gradient(rnd.method, rnd.images, int(rnd.train_cfg["batch_size"]), rnd.cached)
            rnd.scratch["next_c"] = {k: gradient[k].detach().clone() for k in server_c}
        correction = {k: (server_c[k] - client_c[k]).to(rnd.method.device) for k in server_c}

        def corrected(params: Mapping[str, torch.Tensor]) -> None:  # this client's trainable tensors
            for name, param in params.items():
                if name in correction:
                    param.grad = correction[name].clone() if param.grad is None else param.grad.add_(correction[name])

        return (corrected,)

    def finish(self, rnd: ClientRound, result: LocalResult, reply: Any) -> None:
        server_c, client_c = rnd.scratch["server_c"], rnd.scratch["client_c"]
        next_c = rnd.scratch.get("next_c")
        if next_c is None:  # option II: the average corrected step, recovered from the distance travelled
            y = {k: v.cpu() for k, v in rnd.method.shared_state().items()}  # client state lives on the CPU
            scale = 1.0 / (max(result.steps, 1) * float(rnd.train_cfg["lr"]))
            next_c = {k: client_c[k] - server_c[k] + (rnd.global_state[k] - y[k]) * scale for k in server_c}
        rnd.state[CLIENT_C] = ArrayRecord({k: v.contiguous() for k, v in next_c.items()})
        reply[DELTA_C] = ArrayRecord({k: (next_c[k] - client_c[k]).contiguous() for k in server_c})


def _strategy(cfg: Mapping[str, Any], common: dict[str, Any]) -> Scaffold:
    update = cfg.get("control_update", "gradient")
    if update not in UPDATES:
        raise ConfigError(f"protocol.control_update={update!r} is unknown; choose one of {UPDATES}")
    return Scaffold(num_clients=int(common["min_available_nodes"]), server_lr=option(cfg, "server_lr", 1.0),
                    control_update=update, **common)


register("scaffold", Protocol(_strategy, ScaffoldClient(), communication=2.0))
