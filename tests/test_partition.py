"""Partitions: sizes, coverage, determinism and each partition's defining statistic."""

import numpy as np
import pytest

from flbench.datasets.partition import client_domains, dirichlet_split, few_shot, partition
from flbench.errors import ConfigError

LABELS = np.repeat(np.arange(10), 20)  # 10 classes × 20 images
DOMAINS = np.tile(np.arange(4), 50)
ALL = [("iid", {}), ("dirichlet", {"alpha": 0.3, "min_samples": 2}), ("domain", {"alpha": None}),
       ("domain", {"alpha": 1.0}), ("domain", {"domains_per_client": 2}), ("pathological", {"classes_per_client": 3}),
       ("class-disjoint", {}), ("quantity-skew", {"beta": 0.5, "min_samples": 2})]


def test_few_shot_takes_k_per_class_and_is_seeded():
    a = few_shot(LABELS, 3, np.random.default_rng(0))
    b = few_shot(LABELS, 3, np.random.default_rng(0))
    c = few_shot(LABELS, 3, np.random.default_rng(1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.bincount(LABELS[a]), np.full(10, 3))


@pytest.mark.parametrize("name,options", ALL)
def test_partitions_are_disjoint_deterministic_and_cover_the_pool(name, options):
    shards = partition(name, LABELS, DOMAINS, num_clients=8, shots=4, seed=3, options=options)
    again = partition(name, LABELS, DOMAINS, num_clients=8, shots=4, seed=3, options=options)
    other = partition(name, LABELS, DOMAINS, num_clients=8, shots=4, seed=4, options=options)
    assert len(shards) == 8 and all(np.array_equal(x, y) for x, y in zip(shards, again))
    assert any(not np.array_equal(x, y) for x, y in zip(shards, other)), "the seed must matter"
    union = np.concatenate(shards)
    assert len(union) == len(np.unique(union)), "a sample was given to two clients"
    expected = 10 * 4 * (4 if name == "domain" else 1)  # k per class, per domain for the domain partition
    assert len(union) == expected
    assert min(len(s) for s in shards) >= 1


def test_domain_partition_gives_each_client_its_domains():
    shards = partition("domain", LABELS, DOMAINS, num_clients=6, shots=4, seed=0)
    for shard, held in zip(shards, client_domains(6, 4)):
        assert set(DOMAINS[shard]) == set(held) and len(held) == 1
    shards = partition("domain", LABELS, DOMAINS, num_clients=6, shots=4, seed=0, options={"domains_per_client": 3})
    for i, shard in enumerate(shards):
        assert set(DOMAINS[shard]) == {i % 4, (i + 1) % 4, (i + 2) % 4}
    with pytest.raises(ConfigError, match="partition.domains_per_client"):
        partition("domain", LABELS, DOMAINS, num_clients=6, shots=4, seed=0, options={"domains_per_client": 5})
    with pytest.raises(ConfigError, match="num_clients"):
        partition("domain", LABELS, DOMAINS, num_clients=2, shots=4, seed=0)
    # two clients × two domains each cover all four domains
    assert len(partition("domain", LABELS, DOMAINS, num_clients=3, shots=4, seed=0,
                         options={"domains_per_client": 2})) == 3


def test_pathological_gives_each_client_exactly_k_classes():
    for k in (1, 2, 3):
        shards = partition("pathological", LABELS, DOMAINS, num_clients=10, shots=6, seed=1,
                           options={"classes_per_client": k})
        assert all(len(np.unique(LABELS[s])) == k for s in shards)
    # 10 clients × 2 classes over 10 classes: every class is held by exactly two clients
    shards = partition("pathological", LABELS, DOMAINS, num_clients=10, shots=6, seed=1,
                       options={"classes_per_client": 2})
    holders = np.bincount(np.concatenate([np.unique(LABELS[s]) for s in shards]), minlength=10)
    assert np.array_equal(holders, np.full(10, 2))
    with pytest.raises(ConfigError, match="partition.classes_per_client"):
        partition("pathological", LABELS, DOMAINS, num_clients=4, shots=2, seed=0, options={"classes_per_client": 11})
    with pytest.raises(ConfigError, match="without samples"):  # 1 shot per class cannot feed 2 holders per class
        partition("pathological", LABELS, DOMAINS, num_clients=20, shots=1, seed=0, options={"classes_per_client": 1})


def test_class_disjoint_clients_share_no_class():
    shards = partition("class-disjoint", LABELS, DOMAINS, num_clients=3, shots=4, seed=0)
    sets = [set(LABELS[s].tolist()) for s in shards]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert set().union(*sets) == set(range(10)) and sorted(len(s) for s in sets) == [3, 3, 4]
    shards = partition("class-disjoint", LABELS, DOMAINS, num_clients=3, shots=4, seed=0,
                       options={"classes_per_client": 2})
    assert [len(set(LABELS[s].tolist())) for s in shards] == [2, 2, 2]
    assert all(np.array_equal(np.bincount(LABELS[s])[np.unique(LABELS[s])], [4, 4]) for s in shards)
    with pytest.raises(ConfigError, match="num_clients"):
        partition("class-disjoint", LABELS, DOMAINS, num_clients=11, shots=4, seed=0)
    with pytest.raises(ConfigError, match="partition.classes_per_client"):
        partition("class-disjoint", LABELS, DOMAINS, num_clients=3, shots=4, seed=0, options={"classes_per_client": 4})


def test_quantity_skew_changes_sizes_not_labels():
    def sizes(beta):
        shards = partition("quantity-skew", LABELS, DOMAINS, num_clients=5, shots=20, seed=0,
                           options={"beta": beta, "min_samples": 3})
        assert min(len(s) for s in shards) >= 3 and sum(len(s) for s in shards) == 200
        return np.array([len(s) for s in shards])
    assert sizes(0.1).std() > sizes(100.0).std()
    assert sizes(100.0).max() - sizes(100.0).min() < 20
    with pytest.raises(ConfigError, match="partition.beta"):
        partition("quantity-skew", LABELS, DOMAINS, num_clients=2, shots=2, seed=0, options={"beta": 0})


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


def test_partition_plot_writes_a_png(tmp_path):
    from flbench.datasets.partition_plot import plot_partition

    shards = partition("pathological", LABELS, DOMAINS, num_clients=4, shots=4, seed=0, options={"classes_per_client": 2})
    stats = {"class_histograms": [np.bincount(LABELS[s], minlength=10).tolist() for s in shards],
             "domain_histograms": [np.bincount(DOMAINS[s], minlength=4).tolist() for s in shards]}
    path = plot_partition(stats, tmp_path / "partition.png", domain_names=["a", "b", "c", "d"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
