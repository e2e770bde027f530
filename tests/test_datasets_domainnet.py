"""DomainNet (official lists, domains → ImageSet.domains) and CIFAR (torchvision's format) on fabricated roots."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fake_roots import class_colour, make_cifar_root, make_domainnet_root
from flbench.datasets import load_dataset
from flbench.datasets.partition import partition
from flbench.errors import ConfigError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path / "cache"))


def domainnet(root, **options):
    cfg = {"name": "domainnet", "root": str(root), "domains": ["clipart", "real", "sketch"], "shots": 2,
           "fewshot_seed": 0, "num_classes": 3, "workers": 1, **options}
    return load_dataset(cfg, image_size=8)


def test_domains_become_image_set_domains_with_per_domain_shots(tmp_path, cache):
    bundle = domainnet(make_domainnet_root(tmp_path))
    assert bundle.domain_names == ["clipart", "real", "sketch"]
    assert bundle.classnames == ["object0", "thing 1", "object2"]
    for split in (bundle.train, bundle.val):  # 2 per class and domain; val from the 2 training images left
        counts = np.zeros((3, 3), int)
        np.add.at(counts, (split.domains, split.labels), 1)
        assert (counts == 2).all()
    assert not set(bundle.train.paths) & set(bundle.val.paths)
    assert all(p.split("/")[-3] == bundle.domain_names[d] for p, d in zip(bundle.test.paths, bundle.test.domains))
    assert len(bundle.test) == 3 * 3 * 2
    # images really are the files of their class and domain (domains are drawn at different brightness)
    images = bundle.test.load(np.arange(len(bundle.test)))
    for x, y, d in zip(images, bundle.test.labels, bundle.test.domains):
        assert np.abs(x.mean(dim=(1, 2)).numpy() * 255 - class_colour(int(y), int(d))).max() < 12


def test_domain_partition_gives_each_client_one_domain(tmp_path, cache):
    bundle = domainnet(make_domainnet_root(tmp_path))
    shards = partition("domain", bundle.train.labels, bundle.train.domains, 3, 2, seed=0, options={"min_samples": 1})
    assert [sorted(set(bundle.train.domains[s].tolist())) for s in shards] == [[0], [1], [2]]
    assert sum(len(s) for s in shards) == len(bundle.train)  # the cached pool is exactly what clients share


def test_domain_and_class_selection_and_lists_at_top_level(tmp_path, cache):
    root = make_domainnet_root(tmp_path, in_splits_folder=False)
    bundle = domainnet(root, domains=["sketch", "clipart"], classes=["thing_1", "object2"])
    assert bundle.domain_names == ["sketch", "clipart"] and bundle.classnames == ["thing 1", "object2"]
    assert set(bundle.test.labels.tolist()) == {0, 1}
    assert all(("/domainnet/sketch/" in p) == (d == 0) for p, d in zip(bundle.test.paths, bundle.test.domains))
    fewshot = sorted(p.name for p in (root / "domainnet" / "split_fewshot").iterdir())
    assert len(fewshot) == 1 and "sketch+clipart" in fewshot[0]  # never shared with the full selection
    assert len(domainnet(root, classes=1).classnames) == 1


def test_domainnet_broken_roots(tmp_path, cache):
    root = make_domainnet_root(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.domains=\['photo'\] must be a non-empty subset"):
        domainnet(root, domains=["photo"])
    with pytest.raises(ConfigError, match="list painting_train.txt not found"):
        domainnet(root, domains=["painting"])
    with pytest.raises(ConfigError, match=r"name 3 classes, expected labels 0..344"):
        domainnet(root, num_classes=None)


def test_cifar_from_torchvision_format_with_carved_validation(tmp_path, cache, monkeypatch):
    from torchvision import datasets

    from torchvision.datasets import cifar

    # fabricated files in torchvision's format cannot match the real checksums
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    root = make_cifar_root(tmp_path, "cifar10", train_per_class=10, test_per_class=2)
    bundle = load_dataset({"name": "cifar10", "root": str(root), "shots": 2, "fewshot_seed": 0, "workers": 1},
                          image_size=16)
    assert bundle.classnames == ["airplane", "automobile", "bird"]
    assert np.bincount(bundle.train.labels).tolist() == [2, 2, 2]
    assert np.bincount(bundle.val.labels).tolist() == [2, 2, 2]
    assert len(bundle.test) == 6
    images = bundle.train.load(np.arange(6))
    assert images.shape == (6, 3, 16, 16)
    means = images.mean(dim=(2, 3)) * 255
    assert all(torch.allclose(m, torch.tensor(class_colour(int(y)), dtype=torch.float), atol=3)
               for m, y in zip(means, bundle.train.labels))


def test_cifar_missing_fails_fast_with_the_prepare_command(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"cifar-100-python/ not found .*python -m flbench.prepare cifar100"):
        load_dataset({"name": "cifar100", "root": str(tmp_path)}, image_size=16)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="cifar10"):  # offline: "cannot reach"; never a long hang
        load_dataset({"name": "cifar10", "root": str(tmp_path), "download": True}, image_size=16)
    assert time.perf_counter() - start < 5
