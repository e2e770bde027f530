import numpy as np
import pytest

from flbench.datasets.partition import client_domains, dirichlet_split, few_shot, partition
from flbench.errors import ConfigError

LABELS = np.repeat(np.arange(10), 20)  # 10 classes × 20 images
DOMAINS = np.tile(np.arange(4), 50)


def test_few_shot_takes_k_per_class_and_is_seeded():
    a = few_shot(LABELS, 3, np.random.default_rng(0))
    b = few_shot(LABELS, 3, np.random.default_rng(0))
    c = few_shot(LABELS, 3, np.random.default_rng(1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(LABELS[a]), np.full(10, 3))


@pytest.mark.parametrize("name,options", [("iid", {}), ("dirichlet", {"alpha": 0.3, "min_samples": 2}),
                                          ("domain", {"alpha": None}), ("domain", {"alpha": 1.0})])
def test_partitions_are_disjoint_deterministic_and_cover_the_pool(name, options):
    shards = partition(name, LABELS, DOMAINS, num_clients=8, shots=4, seed=3, options=options)
    again = partition(name, LABELS, DOMAINS, num_clients=8, shots=4, seed=3, options=options)
    assert len(shards) == 8 and all(np.array_equal(x, y) for x, y in zip(shards, again))
    union = np.concatenate(shards)
    assert len(union) == len(np.unique(union)), "a sample was given to two clients"
    expected = 10 * 4 * (4 if name == "domain" else 1)  # k per class, per domain for the domain partition
    assert len(union) == expected
    assert min(len(s) for s in shards) >= 1


def test_domain_partition_gives_each_client_one_domain():
    shards = partition("domain", LABELS, DOMAINS, num_clients=6, shots=4, seed=0)
    owners = client_domains(6, 4)
    for shard, owner in zip(shards, owners):
        assert set(DOMAINS[shard]) == {owner}


def test_dirichlet_respects_min_samples_and_fails_clearly_when_impossible():
    rng = np.random.default_rng(0)
    pool = few_shot(LABELS, 4, rng)
    shards = dirichlet_split(pool, LABELS, 5, alpha=0.1, min_samples=4, rng=rng)
    assert min(len(s) for s in shards) >= 4
    with pytest.raises(ConfigError, match="partition.min_samples"):
        dirichlet_split(pool, LABELS, 5, alpha=0.01, min_samples=8, rng=np.random.default_rng(0), max_retries=3)
    with pytest.raises(ConfigError, match="num_clients"):
        partition("iid", LABELS, DOMAINS, num_clients=500, shots=2, seed=0)
    with pytest.raises(ConfigError, match="partition.alpha"):
        partition("dirichlet", LABELS, DOMAINS, num_clients=2, shots=2, seed=0, options={"alpha": 0})


def test_smaller_alpha_means_more_label_skew():
    def skew(alpha):
        shards = partition("dirichlet", LABELS, DOMAINS, num_clients=5, shots=20, seed=0,
                           options={"alpha": alpha, "min_samples": 1})
        return np.mean([np.bincount(LABELS[s], minlength=10).max() / len(s) for s in shards])
    assert skew(0.05) > skew(100.0)
