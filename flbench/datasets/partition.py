"""Client partitions: pure, seeded functions from labels (and domains) to one index array per client.

FLIP's semantics are the default: k shots per class are drawn once for the *whole federation*, then each class is
split over clients by Dirichlet(α). The others: iid, domain (feature shift, one or more domains per client),
pathological (#classes per client), class-disjoint (each client its own classes) and quantity-skew (unequal sizes).
Impossible requests fail with a message naming the config key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flbench.errors import ConfigError
from flbench.registry import Registry

Partitioner = Callable[..., list[np.ndarray]]
PARTITIONS: Registry[Partitioner] = Registry("partitions", "partition.name")
register = PARTITIONS.register


def few_shot(labels: np.ndarray, shots: int, rng: np.random.Generator, pool: np.ndarray | None = None) -> np.ndarray:
    """k indices per class from `pool` (default: all), fewer where a class has fewer; sorted for stable order."""
    if shots < 1:
        raise ConfigError(f"shots={shots} must be at least 1")
    pool = np.arange(len(labels)) if pool is None else pool
    largest = int(np.bincount(labels[pool]).max()) if len(pool) else 0
    if shots > largest:  # every class would be clamped: the key would not say what ran
        raise ConfigError(f"shots={shots} but no class has more than {largest} training images"
                          f"{' in a domain' if len(pool) < len(labels) else ''}; set shots ≤ {largest}")
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


def client_domains(num_clients: int, num_domains: int, domains_per_client: int = 1) -> list[list[int]]:
    """Domain positions each client holds: client i gets domains i, i+1, …, i+m−1 (mod D). Round-robin, so every
    domain has clients whenever num_clients ≥ num_domains, and with m = 1 client i holds domain i mod D."""
    return [[(i + j) % num_domains for j in range(domains_per_client)] for i in range(num_clients)]


@register("domain")
def domain(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
           alpha: float | None = None, min_samples: int = 2, domains_per_client: int = 1,
           **_: Any) -> list[np.ndarray]:
    """Feature shift: each client holds `domains_per_client` rendering domains; k shots per class *per domain*,
    each domain's pool split over the clients holding it (iid, or Dirichlet label skew when `alpha` is set)."""
    domain_ids = np.unique(domains)
    if not 1 <= domains_per_client <= len(domain_ids):
        raise ConfigError(f"partition.domains_per_client={domains_per_client} must be between 1 and the "
                          f"{len(domain_ids)} domains of the training pool")
    held = client_domains(num_clients, len(domain_ids), domains_per_client)
    holders = [[c for c in range(num_clients) if d_pos in held[c]] for d_pos in range(len(domain_ids))]
    if any(not h for h in holders):
        raise ConfigError(f"num_clients={num_clients} leaves some of the {len(domain_ids)} domains of partition=domain "
                          "without a client; raise num_clients or partition.domains_per_client, or select fewer "
                          "dataset.domains")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for d_pos, d in enumerate(domain_ids):
        pool = few_shot(labels, shots, rng, pool=np.flatnonzero(domains == d))
        clients = holders[d_pos]
        for client, part in zip(clients, _split(pool, labels, len(clients), alpha, min_samples, rng)):
            parts[client].append(part)
    return [np.sort(np.concatenate(p)) for p in parts]


def _check_nonempty(parts: list[np.ndarray], name: str, hint: str) -> list[np.ndarray]:
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"partition={name} leaves client {empty[0]} without samples; {hint}")
    return parts


@register("pathological")
def pathological(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
                 classes_per_client: int = 2, **_: Any) -> list[np.ndarray]:
    """Label skew by class count (McMahan et al. 2017's "pathological non-IID"): each client holds exactly
    `classes_per_client` classes. Classes are dealt out in consecutive blocks of a seeded class permutation
    (wrapping around), so every class is held by about num_clients·k/C clients; each class's k-shot pool is split
    evenly among its holders."""
    rng = np.random.default_rng(seed)
    pool = few_shot(labels, shots, rng)
    classes = np.unique(labels[pool])
    if not 1 <= classes_per_client <= len(classes):
        raise ConfigError(f"partition.classes_per_client={classes_per_client} must be between 1 and the "
                          f"{len(classes)} classes of the training pool")
    order = rng.permutation(classes)
    held = [[int(order[(i * classes_per_client + j) % len(classes)]) for j in range(classes_per_client)]
            for i in range(num_clients)]
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [i for i in range(num_clients) if int(c) in held[i]]
        if not holders:
            continue  # fewer client slots than classes: this class is in no shard
        members = rng.permutation(pool[labels[pool] == c])
        for client, chunk in zip(holders, np.array_split(members, len(holders))):
            parts[client].extend(chunk.tolist())
    return _check_nonempty([np.sort(np.asarray(p, dtype=np.int64)) for p in parts], "pathological",
                           "raise shots or lower num_clients × partition.classes_per_client")


@register("class-disjoint")
def class_disjoint(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
                   classes_per_client: int | None = None, **_: Any) -> list[np.ndarray]:
    """Each client holds its own classes, shared with no other client (FedTPG's cross-class setting): a seeded
    class permutation cut into num_clients groups — all classes in near-equal groups by default, or exactly
    `classes_per_client` each (the remaining classes then belong to no client)."""
    rng = np.random.default_rng(seed)
    pool = few_shot(labels, shots, rng)
    classes = np.unique(labels[pool])
    if num_clients > len(classes):
        raise ConfigError(f"num_clients={num_clients} exceeds the {len(classes)} classes that partition=class-disjoint "
                          "gives out one group per client; lower num_clients")
    order = rng.permutation(classes)
    if classes_per_client is None:
        groups = np.array_split(order, num_clients)
    else:
        if classes_per_client < 1 or num_clients * classes_per_client > len(classes):
            raise ConfigError(f"partition.classes_per_client={classes_per_client} × num_clients={num_clients} must be "
                              f"between 1 and the {len(classes)} classes; lower either, or set it to null")
        groups = [order[i * classes_per_client:(i + 1) * classes_per_client] for i in range(num_clients)]
    return [np.sort(pool[np.isin(labels[pool], group)]) for group in groups]


@register("quantity-skew")
def quantity_skew(labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
                  beta: float = 0.5, min_samples: int = 2, **_: Any) -> list[np.ndarray]:
    """Quantity skew: shard sizes ∝ Dirichlet(β) on top of `min_samples` each, labels drawn uniformly (so only
    how much data a client has differs, not what kind). Smaller β means more unequal sizes."""
    if beta <= 0:
        raise ConfigError(f"partition.beta={beta} must be > 0")
    rng = np.random.default_rng(seed)
    pool = rng.permutation(few_shot(labels, shots, rng))
    if num_clients * min_samples > len(pool):
        raise ConfigError(f"num_clients={num_clients} × partition.min_samples={min_samples} exceeds the "
                          f"{len(pool)} samples to split; lower either or raise shots")
    spare = len(pool) - num_clients * min_samples
    share = rng.dirichlet(np.full(num_clients, beta)) * spare
    sizes = np.floor(share).astype(int)
    # Largest remainders get the leftover samples, so sizes sum exactly to the pool.
    sizes[np.argsort(-(share - sizes), kind="stable")[:spare - sizes.sum()]] += 1
    cuts = np.cumsum(sizes + min_samples)[:-1]
    return [np.sort(part) for part in np.split(pool, cuts)]


def partition(name: str, labels: np.ndarray, domains: np.ndarray, num_clients: int, shots: int, seed: int,
              options: Mapping[str, Any] | None = None) -> list[np.ndarray]:
    split = PARTITIONS.get(name)
    if num_clients < 1:
        raise ConfigError(f"num_clients={num_clients} must be at least 1")
    return split(labels, domains, num_clients=num_clients, shots=shots, seed=seed, **dict(options or {}))
