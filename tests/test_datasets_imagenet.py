"""ImageNet and its test-only variants on fabricated roots in CoOp's layout."""

from __future__ import annotations

import numpy as np
import pytest

from fake_roots import make_imagenet_root, make_variant_root, wnids
from flbench.datasets import load_dataset
from flbench.errors import ConfigError
from flbench.scenarios import evaluated_test


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path / "cache"))


def test_imagenet_fewshot_pool_val_carved_from_train_and_val_folder_as_test(tmp_path, cache):
    root = make_imagenet_root(tmp_path, num_classes=5, train=6, val=2)
    bundle = load_dataset({"name": "imagenet", "root": str(root), "shots": 2, "fewshot_seed": 0, "num_classes": 5,
                           "workers": 1}, image_size=8)
    assert bundle.classnames == [f"imagenet class {c}" for c in range(5)]
    assert np.bincount(bundle.train.labels).tolist() == [2] * 5
    assert np.bincount(bundle.val.labels).tolist() == [2] * 5  # min(k, 4) per class, from unused training images
    assert not set(bundle.train.paths) & set(bundle.val.paths)
    assert all("/images/train/" in p for p in bundle.train.paths + bundle.val.paths)
    assert len(bundle.test) == 10 and all("/images/val/" in p for p in bundle.test.paths)
    assert [p.split("/")[-2] for p in bundle.test.paths] == [wnids(5)[y] for y in bundle.test.labels]
    assert (root / "imagenet" / "split_fewshot" / "shot_2-seed_0.json").is_file()


def test_imagenet_flat_val_folder_is_explained(tmp_path, cache):
    root = make_imagenet_root(tmp_path, num_classes=2, train=1, val=1)
    val = root / "imagenet" / "images" / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for folder in [p for p in val.iterdir() if p.is_dir()]:
        folder.rmdir()
    with pytest.raises(ConfigError, match="not sorted into class folders"):
        load_dataset({"name": "imagenet", "root": str(root), "num_classes": 2, "shots": 1}, image_size=8)


@pytest.mark.parametrize("variant", ["imagenet_v2", "imagenet_sketch"])
def test_full_variants_keep_imagenet_labels(tmp_path, cache, variant):
    make_imagenet_root(tmp_path, num_classes=5, train=1, val=1)  # provides imagenet/classnames.txt for V2
    root = make_variant_root(tmp_path, variant, num_classes=5)
    bundle = load_dataset({"name": variant, "root": str(root), "num_classes": 5, "workers": 1}, image_size=8)
    assert bundle.classnames == [f"imagenet class {c}" for c in range(5)] and bundle.test_classes is None
    assert sorted(set(bundle.test.labels.tolist())) == list(range(5)) and len(bundle.test) == 10
    assert len(bundle.train) == 0 and len(bundle.val) == 0


@pytest.mark.parametrize("variant", ["imagenet_a", "imagenet_r"])
def test_subset_variants_score_only_their_classes(tmp_path, cache, variant):
    make_imagenet_root(tmp_path, num_classes=6, train=1, val=1)
    root = make_variant_root(tmp_path, variant, num_classes=6, subset=[1, 4, 5])
    bundle = load_dataset({"name": variant, "root": str(root), "num_classes": 6, "subset_classes": 3, "workers": 1},
                          image_size=8)
    # labels and class names stay in ImageNet's label space; the subset says which logits exist
    assert len(bundle.classnames) == 6 and bundle.test_classes == [1, 4, 5]
    assert sorted(set(bundle.test.labels.tolist())) == [1, 4, 5]
    split = evaluated_test(bundle)  # what the cross-dataset scenario evaluates
    assert split.classnames == ["imagenet class 1", "imagenet class 4", "imagenet class 5"]
    assert split.labels.tolist() == [[1, 4, 5].index(y) for y in bundle.test.labels]
    assert [p.split("/")[-2] for p in bundle.test.paths] == [wnids(6)[y] for y in bundle.test.labels]


def test_variant_with_too_few_classes_or_foreign_folders(tmp_path, cache):
    make_imagenet_root(tmp_path, num_classes=4, train=1, val=1)
    root = make_variant_root(tmp_path, "imagenet_r", num_classes=4, subset=[0, 2])
    with pytest.raises(ConfigError, match=r"images of 2 classes, expected 200 \(dataset.subset_classes\)"):
        load_dataset({"name": "imagenet_r", "root": str(root), "num_classes": 4}, image_size=8)
    (root / "imagenet-rendition" / "imagenet-r" / "n99999999").mkdir()
    with pytest.raises(ConfigError, match="are not ImageNet classes"):
        load_dataset({"name": "imagenet_r", "root": str(root), "num_classes": 4, "subset_classes": 2}, image_size=8)


def test_variant_without_classnames_says_where_it_looked(tmp_path, cache):
    root = make_variant_root(tmp_path, "imagenet_a", num_classes=3, subset=[0])
    with pytest.raises(ConfigError, match="classnames.txt not found"):
        load_dataset({"name": "imagenet_a", "root": str(root), "num_classes": 3, "subset_classes": 1}, image_size=8)


def test_a_variant_cannot_be_the_training_dataset(tmp_path, cache):
    from flbench.experiment import Experiment
    from helpers import compose_config

    make_imagenet_root(tmp_path, num_classes=3, train=1, val=1)
    root = make_variant_root(tmp_path, "imagenet_sketch", num_classes=3)
    cfg = compose_config(["dataset=imagenet_sketch", f"dataset.root={root}", "dataset.num_classes=3",
                          "logger.mode=disabled"], small=False)
    with pytest.raises(ConfigError, match="imagenet_sketch has no training images .* test-only targets"):
        Experiment(cfg)
