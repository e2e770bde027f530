"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term μ/2·‖w − w_global‖² in each client's loss.

Flower's FedProx strategy only sends μ ("proximal-mu" in the train config); the client adds the term. Its gradient,
μ·(w − w_global), is added to the shared parameters' gradients after every backward pass — the same as adding the
term to the loss, without a second autograd graph. Client-local (personal) parameters have no anchor and get none.
The hook acts on one client's trainable tensors, so in a cohort (flbench.engine.train_cohort) each client is pulled
toward the anchor it received.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.serverapp.strategy import FedProx

from flbench.engine import GradientHook
from flbench.fl.protocols import ClientRound, ClientSide, Protocol, option, register


class ProximalClient(ClientSide):
    def hooks(self, rnd: ClientRound) -> tuple[GradientHook, ...]:
        mu = float(rnd.config.get("proximal-mu", 0.0))
        if mu == 0.0:
            return ()
        anchors = {k: v.detach().to(rnd.method.device, copy=True) for k, v in rnd.global_state.items()}

        def proximal(params: Mapping[str, torch.Tensor]) -> None:  # one client's trainable tensors
            for name, param in params.items():
                if name in anchors:
                    pull = mu * (param.detach() - anchors[name])
                    param.grad = pull if param.grad is None else param.grad.add_(pull)

        return (proximal,)


register("fedprox", Protocol(lambda cfg, common: FedProx(**common, proximal_mu=option(cfg, "mu", 0.01)),
                             ProximalClient()))
