"""Client partitions: pure, seeded functions from labels (and domains) to one index array per client.

FLIP's semantics are the default: k shots per class are drawn once for the *whole federation*, then each class is
split over clients by Dirichlet(α). Impossible requests fail with a message naming the config key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flbench.errors import ConfigError

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONS: dict[str, Partitioner] = {}


def register(name: str) -> Callable[[Partitioner], Partitioner]:
    def wrap(fn: Partitioner) -> Partitioner:
        PARTITIONS[name] = fn
        return fn
    return wrap


def few_shot(labels: np.ndarray, shots: int, rng: np.random.Generator, pool: np.ndarray | None = None) -> np.ndarray:
    """k indices per class from `pool` (default: all), fewer where a class has fewer; sorted for stable order."""
    if shots < 1:
        raise ConfigError(f"shots={shots} must be at least 1")
    pool = np.arange(len(labels)) if pool is None else pool
    chosen = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        chosen.append(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def iid_split(indices: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    if num_clients > len(indices):
        raise ConfigError(f"num_clients={num_clients} exceeds the {len(indices)} samples to split; "
                         "lower num_clients or raise shots")
    return [np.sort(part) for part in np.array_split(rng.permutation(indices), num_clients)]


def dirichlet_split(indices: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float, min_samples: int,
                    rng: np.random.Generator, max_retries: int = 200) -> list[np.ndarray]:
    """Split each class over clients with proportions ~ Dir(α); redraw until every client has `min_samples`."""
    if alpha <= 0:
        raise ConfigError(f"partition.alpha={alpha} must be > 0")
    if num_clients * min_samples > len(indices):
        raise ConfigError(f"num_clients={num_clients} × partition.min_samples={min_samples} exceeds the "
                         f"{len(indices)} samples to split; lower either or raise shots")
    for _ in range(max_retries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels[indices]):
            members = rng.permutation(indices[labels[indices] == c])
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(members)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"could not give every client partition.min_samples={min_samples} samples in {max_retries} "
                     f"Dirichlet draws with partition.alpha={alpha}; raise alpha or shots, or lower min_samples")


def _split(indices: np.ndarray, labels: np.ndarray, num_clients: int, alpha: float | None, min_samples: int,
           rng: np.random.Generator) -> list[np.ndarray]:
    if alpha is None:
        return iid_split(indices, num_clients, rng)
    return dirichlet_split(indices, labels, num_clients, alpha, min_samples, rng)


@register("iid")
def iid(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
        **_: Any) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return iid_split(few_shot(labels, shots, rng), num_clients, rng)


@register("dirichlet")
def dirichlet(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int, alpha: float = 0.5,
              min_samples: int = 2, **_: Any) -> list[np.ndarray]:
    """FLIP: federation-wide k-shot pool, each class split by Dir(α)."""
    rng = np.random.default_rng(seed)
    return dirichlet_split(few_shot(labels, shots, rng), labels, num_clients, alpha, min_samples, rng)


def client_domains(num_clients: int, num_domains: int) -> np.ndarray:
    """Round-robin domain of each client, so every domain has clients whenever num_clients ≥ num_domains."""
    return np.arange(num_clients) % num_domains


@register("domain")
def domain(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
           alpha: float | None = None, min_samples: int = 2, **_: Any) -> list[np.ndarray]:
    """Feature shift: each client holds one rendering domain; k shots per class *per domain*, split over that
    domain's clients (iid, or Dirichlet label skew when `alpha` is set)."""
    domain_ids = np.unique(domains)
    if num_clients < len(domain_ids):
        raise ConfigError(f"num_clients={num_clients} is below the {len(domain_ids)} domains of partition=domain; "
                         "raise num_clients or select fewer dataset.domains")
    rng = np.random.default_rng(seed)
    owner = client_domains(num_clients, len(domain_ids))
    parts: list[np.ndarray] = [np.zeros(0, np.int64)] * num_clients
    for d_pos, d in enumerate(domain_ids):
        pool = few_shot(labels, shots, rng, pool=np.flatnonzero(domains == d))
        clients = np.flatnonzero(owner == d_pos)
        for client, part in zip(clients, _split(pool, labels, len(clients), alpha, min_samples, rng)):
            parts[client] = part
    return parts


def partition(name: str, labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
              options: Mapping[str, Any] | None = None) -> list[np.ndarray]:
    if name not in PARTITIONS:
        raise ConfigError(f"partition.name={name!r} is unknown; choose one of {sorted(PARTITIONS)}")
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be at least 1")
    return PARTITIONS[name](labels, domains, num_clients=num_clients, shots=shots, seed=seed, **dict(options or {}))
