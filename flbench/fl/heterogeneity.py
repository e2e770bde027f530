"""System heterogeneity, injected the same way on every backend: stragglers and client failures.

Client sampling (protocol.fraction) is Flower's own. Stragglers and failures are decided per (seed, round,
client) from a derived seed, never from shared random state, so the inprocess and ray backends — which run clients
in different orders and processes — make the same decisions and report the same metrics.

- A straggler (probability `protocol.stragglers` per sampled client and round) completes only
  `protocol.straggler_work` of its local steps (at least one), as in FedProx's systems-heterogeneity experiments.
- A failing client (probability `protocol.failure_prob`) answers with an error instead of an update; the round
  completes with the clients that answered (a round where none did keeps the model), and the server counts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flbench.experiment import derive_seed

FAILURE_STREAM, STRAGGLER_STREAM = 6, 7
INJECTED_FAILURE_CODE = 3001  # Error code of an injected failure (Flower's own codes are small integers)


def _uniform(seed: int, server_round: int, partition_id: int, stream: int) -> float:
    return float(np.random.default_rng(derive_seed(seed, server_round, partition_id, stream)).random())


def fails(cfg: Mapping[str, Any], server_round: int, partition_id: int) -> bool:
    probability = float(cfg["protocol"].get("failure_prob") or 0.0)
    return probability > 0 and _uniform(int(cfg["seed"]), server_round, partition_id, FAILURE_STREAM) < probability


def straggler_steps(cfg: Mapping[str, Any], server_round: int, partition_id: int, num_examples: int) -> int | None:
    """The step budget of a straggler this round, or None for a client that completes its local epochs."""
    fraction = float(cfg["protocol"].get("stragglers") or 0.0)
    if fraction <= 0 or _uniform(int(cfg["seed"]), server_round, partition_id, STRAGGLER_STREAM) >= fraction:
        return None
    full = int(cfg["train"].get("epochs", 1)) * math.ceil(num_examples / int(cfg["train"]["batch_size"]))
    return max(1, int(full * float(cfg["protocol"].get("straggler_work", 0.5))))
