"""Flower's server-side strategies, used as they are: FedAvg and the adaptive server optimisers.

FedAvg (McMahan et al. 2017) averages the clients' shared states weighted by their number of examples. FedAdam,
FedYogi and FedAdagrad (Reddi et al., ICLR 2021) treat the averaged update Δ = mean(w_i) − w as a pseudo-gradient
for a server-side Adam / Yogi / Adagrad step of size `eta`; FedAvgM (Hsu et al. 2019) adds server momentum. Their
config keys are Flower's argument names; defaults in conf/protocol/ are sized for prompt vectors (token-embedding
scale ~0.01), not Flower's 0.1, which would move a prompt by its own norm in one round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi

from flbench.fl.protocols import Protocol, option, register


def _adaptive(cfg: Mapping[str, Any], beta_1: float, beta_2: float) -> dict[str, float]:
    return {"eta": option(cfg, "eta", 0.01), "eta_l": option(cfg, "eta_l", 0.01), "tau": option(cfg, "tau", 1e-3),
            "beta_1": option(cfg, "beta_1", beta_1), "beta_2": option(cfg, "beta_2", beta_2)}


register("fedavg", Protocol(lambda cfg, common: FedAvg(**common)))
register("fedadam", Protocol(lambda cfg, common: FedAdam(**common, **_adaptive(cfg, 0.9, 0.99))))
register("fedyogi", Protocol(lambda cfg, common: FedYogi(**common, **_adaptive(cfg, 0.9, 0.99))))
register("fedadagrad", Protocol(lambda cfg, common: FedAdagrad(
    **common, **{k: v for k, v in _adaptive(cfg, 0.0, 0.0).items() if k not in ("beta_1", "beta_2")})))
register("fedavgm", Protocol(lambda cfg, common: FedAvgM(
    **common, server_learning_rate=option(cfg, "server_lr", 1.0), server_momentum=option(cfg, "server_momentum", 0.9))))
