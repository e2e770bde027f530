"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term μ/2·‖w − w_global‖² in each client's loss.

Flower's FedProx strategy only sends μ ("proximal-mu" in the train config); the client adds the term. Its gradient,
μ·(w − w_global), is added to the shared parameters' gradients after every backward pass — the same as adding the
term to the loss, without a second autograd graph. Client-local (personal) parameters have no anchor and get none.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from flbench.algorithms.base import PromptMethod
from flbench.engine import GradientHook
from flbench.fl.protocols import ClientRound, ClientSide, Protocol, option, register


class ProximalClient(ClientSide):
    def hooks(self, rnd: ClientRound) -> tuple[GradientHook, ...]:
        mu = float(rnd.config.get("proximal-mu", 0.0))
        if mu == 0.0:
            return ()
        anchors = {k: v.detach().to(rnd.method.device, copy=True) for k, v in rnd.global_state.items()}

        def proximal(method: PromptMethod) -> None:
            for name, param in method.named_parameters():
                if name in anchors and param.requires_grad:
                    pull = mu * (param.detach() - anchors[name])
                    param.grad = pull if param.grad is None else param.grad.add_(pull)

        return (proximal,)


register("fedprox", Protocol(lambda cfg, common: FedProx(**common, proximal_mu=option(cfg, "mu", 0.01)),
                             ProximalClient()))
