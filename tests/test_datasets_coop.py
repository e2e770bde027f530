"""CoOp-layout datasets on fabricated roots (real split-file format, generated JPEGs), through the real loaders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fake_roots import SPLIT_SIZES, class_colour, make_coop_root
from flbench.datasets import load_dataset
from flbench.datasets.coop import SPECS
from flbench.datasets.files import crop_box, eval_transform, train_transform
from flbench.errors import ConfigError
from flbench.scenarios import build_scenario

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path / "cache"))


def load(root: Path, dataset: str, **options):
    cfg = {"name": dataset, "root": str(root), "shots": 2, "fewshot_seed": 0, "num_classes": 3, "workers": 1,
           **options}
    return load_dataset(cfg, image_size=12)


def nearest_class(image: torch.Tensor, num_classes: int, domain: int = 0) -> int:
    mean = image.mean(dim=(1, 2)).numpy() * 255
    return int(np.argmin([np.abs(mean - np.asarray(class_colour(c, domain))).sum() for c in range(num_classes)]))


@pytest.mark.parametrize("dataset", sorted(SPECS))
def test_each_coop_dataset_loads_from_its_real_layout(tmp_path, cache, dataset):
    root = make_coop_root(tmp_path, dataset)
    bundle = load(root, dataset)
    assert bundle.num_classes == 3 and bundle.name == dataset
    if dataset == "caltech101":  # CoOp's dropped classes are gone and the rest relabelled from 0
        assert bundle.classnames == ["caltech101 class 0", "caltech101 class 1", "caltech101 class 2"]
    elif dataset != "fgvc_aircraft":  # underscores become spaces, as CoOp prompts them
        assert bundle.classnames == [f"{dataset.replace('_', ' ')} class {c}" for c in range(3)]
    else:
        assert bundle.classnames == ["Boeing 707", "A1-100", "Boeing 727"]
    # k-shot pool (2 of 5 per class), min(k, 4) validation images per class, the full test split
    assert len(bundle.train) == 2 * 3 and np.bincount(bundle.train.labels).tolist() == [2, 2, 2]
    assert len(bundle.val) == 2 * 3 and len(bundle.test) == SPLIT_SIZES["test"] * 3
    assert bundle.templates[0].count("{}") == 1
    images = bundle.test.load(np.arange(len(bundle.test)))
    assert images.shape == (9, 3, 12, 12) and 0 <= images.min() and images.max() <= 1
    # every image is the file its label names (class colours survive the whole path)
    assert [nearest_class(x, 3) for x in images] == bundle.test.labels.tolist()


def test_templates_are_coops_per_dataset_prompts(tmp_path, cache):
    bundle = load(make_coop_root(tmp_path, "oxford_pets"), "oxford_pets")
    assert bundle.templates[0] == "a photo of a {}, a type of pet."
    assert load(make_coop_root(tmp_path, "dtd"), "dtd").templates[0] == "{} texture."


def test_fewshot_subset_is_cached_per_k_and_seed_and_reused(tmp_path, cache):
    root = make_coop_root(tmp_path, "oxford_pets")
    first = load(root, "oxford_pets", shots=2, fewshot_seed=1)
    cached = root / "oxford_pets" / "split_fewshot" / "shot_2-seed_1.json"
    assert cached.is_file()
    assert load(root, "oxford_pets", shots=2, fewshot_seed=1).train.paths == first.train.paths
    other_seed = load(root, "oxford_pets", shots=2, fewshot_seed=2)
    assert (root / "oxford_pets" / "split_fewshot" / "shot_2-seed_2.json").is_file()
    assert other_seed.train.paths != first.train.paths  # 10 possible 2-of-5 draws per class, 3 classes
    assert len(load(root, "oxford_pets", shots=4, fewshot_seed=1).train) == 12
    # the cached file *is* the subset: edit it and the loader follows it
    payload = json.loads(cached.read_text())
    payload["train"] = payload["train"][:1]
    cached.write_text(json.dumps(payload))
    assert len(load(root, "oxford_pets", shots=2, fewshot_seed=1).train) == 1


def test_partition_takes_the_whole_fewshot_pool(tmp_path, cache):
    from flbench.datasets.partition import partition

    bundle = load(make_coop_root(tmp_path, "eurosat"), "eurosat", shots=2)
    shards = partition("dirichlet", bundle.train.labels, bundle.train.domains, 2, 2, seed=0,
                       options={"alpha": 1.0, "min_samples": 1})
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(bundle.train)))


def test_full_training_split_when_shots_is_null(tmp_path, cache):
    bundle = load(make_coop_root(tmp_path, "food101"), "food101", shots=None)
    assert len(bundle.train) == SPLIT_SIZES["train"] * 3 and len(bundle.val) == SPLIT_SIZES["val"] * 3


def test_base2novel_splits_fabricated_classes(tmp_path, cache):
    root = make_coop_root(tmp_path, "ucf101", num_classes=4)
    bundle = load(root, "ucf101", num_classes=4)
    scenario = build_scenario("base2novel", bundle)
    assert scenario.train_classnames == ["ucf101 class 0", "ucf101 class 1"]
    assert set(scenario.train.labels.tolist()) == {0, 1}
    novel = scenario.test["novel"]
    assert novel.classnames == ["ucf101 class 2", "ucf101 class 3"] and set(novel.labels.tolist()) == {0, 1}
    # relabelled novel images are still the images of classes 2 and 3
    assert [nearest_class(x, 4) for x in novel.images.load(np.arange(len(novel.images)))] == \
        (novel.labels + 2).tolist()


def test_eval_transform_is_clips_resize_and_center_crop():
    import torchvision.transforms as T

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16),
                           T.PILToTensor()])(image)
    assert torch.equal(eval_transform(image, 16), reference)


def test_train_augmentation_crops_flips_and_is_seeded():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    a = train_transform(image, 16, np.random.default_rng(3))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, train_transform(image, 16, np.random.default_rng(3)))
    assert not torch.equal(a, train_transform(image, 16, np.random.default_rng(4)))
    boxes = [crop_box(50, 30, np.random.default_rng(s)) for s in range(200)]
    areas = [h * w / (50 * 30) for _, _, h, w in boxes]
    assert min(areas) < 0.3 and max(areas) > 0.7  # scale (0.08, 1)
    assert all(0 <= t and 0 <= left and t + h <= 30 and left + w <= 50 for t, left, h, w in boxes)


def test_batch_loading_is_reproducible_and_thread_count_does_not_matter(tmp_path, cache):
    root = make_coop_root(tmp_path, "dtd")
    rng = np.random.default_rng(0)
    for path in (root / "dtd" / "images").rglob("*.jpg"):  # textured images, so crops and flips show
        Image.fromarray(rng.integers(0, 255, (14, 20, 3), dtype=np.uint8)).save(path)
    one, four = load(root, "dtd", workers=1), load(root, "dtd", workers=4)
    idx = np.arange(len(one.train))
    assert torch.equal(one.test.load(np.arange(9)), four.test.load(np.arange(9)))
    torch.manual_seed(0)
    a = one.train.load(idx, train=True)
    torch.manual_seed(0)
    b = four.train.load(idx, train=True)
    assert torch.equal(a, b) and not torch.equal(a, one.train.load(idx, train=True))
    plain = load(root, "dtd", augment=False).train  # train.augment=false: training batches as at evaluation
    assert torch.equal(plain.load(idx, train=True), one.train.load(idx))


# --- broken roots: one line naming the dataset, the path and what is missing ------------------------------------------

def test_missing_split_file(tmp_path, cache):
    root = make_coop_root(tmp_path, "dtd")
    (root / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(ConfigError, match=r"dataset dtd: split file split_zhou_DescribableTextures.json not found in "
                                          + str(root / "dtd")):
        load(root, "dtd")


def test_unparseable_split_file(tmp_path, cache):
    root = make_coop_root(tmp_path, "dtd")
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": [["a.jpg", 0]]}')
    with pytest.raises(ConfigError, match="cannot parse split file"):
        load(root, "dtd")


def test_missing_images_are_counted_and_named(tmp_path, cache):
    root = make_coop_root(tmp_path, "sun397")
    (root / "sun397" / "SUN397" / "sun397_class_1" / "test_2.jpg").unlink()
    with pytest.raises(ConfigError, match=r"dataset sun397: 1 of 9 test images are missing in .*sun397 "
                                          r"\(e.g. SUN397/sun397_class_1/test_2.jpg\)"):
        load(root, "sun397")


def test_wrong_class_count(tmp_path, cache):
    root = make_coop_root(tmp_path, "caltech101")
    with pytest.raises(ConfigError, match=r"has 3 classes, expected 100 \(dataset.num_classes\)"):
        load(root, "caltech101", num_classes=None)


def test_root_not_set_or_wrong(tmp_path, cache):
    with pytest.raises(ConfigError, match="dataset.root is not set"):
        load_dataset({"name": "dtd", "root": None})
    with pytest.raises(ConfigError, match=r"folder dtd/ not found in dataset.root="):
        load(tmp_path, "dtd")


def test_root_may_point_at_the_dataset_folder_itself(tmp_path, cache):
    root = make_coop_root(tmp_path, "eurosat")
    assert len(load(root / "eurosat", "eurosat").test) == 9


def test_cli_with_a_broken_root_prints_one_line_and_writes_nothing(tmp_path):
    root = make_coop_root(tmp_path / "data", "oxford_flowers")
    (root / "oxford_flowers" / "jpg" / "oxford_flowers_class_0" / "train_0.jpg").unlink()
    results = tmp_path / "results"
    env = {**os.environ, "FLBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # shots=5 = images per class: the pool is the whole training split, so the missing image is needed (more shots
    # than a class has are refused before the data is read)
    proc = subprocess.run([sys.executable, "-m", "flbench", "dataset=oxford_flowers", f"dataset.root={root}",
                           "dataset.num_classes=3", "shots=5", f"results_dir={results}", "logger.mode=disabled"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flbench: error: dataset oxford_flowers: 1 of 15 train images")
    assert "oxford_flowers_class_0/train_0.jpg" in lines[0]
    assert not any(p.is_file() for p in results.rglob("*")) if results.exists() else True


def test_prepare_counts_images_and_lists_missing_files(tmp_path, cache, capsys):
    from flbench.prepare import main

    root = make_coop_root(tmp_path, "oxford_pets")
    assert main(["oxford_pets", "--root", str(root), "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "train        15 images" in out and "test          9 images" in out
    assert out.strip().endswith("complete")
    (root / "oxford_pets" / "images" / "oxford_pets_class_2" / "val_1.jpg").unlink()
    assert main(["oxford_pets", "--root", str(root), "--num-classes", "3"]) == 2
    out = capsys.readouterr().out
    assert "val           6 images, 1 MISSING" in out and "missing: images/oxford_pets_class_2/val_1.jpg" in out
    assert "How to obtain oxford_pets" in out and "split_zhou_OxfordPets.json" in out


def test_prepare_on_a_wrong_root_prints_one_error_line_and_the_steps(tmp_path, capsys):
    from flbench.prepare import main

    assert main(["fgvc_aircraft", "--root", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "dataset fgvc_aircraft: folder fgvc_aircraft/ not found" in captured.err
    assert "fgvc-aircraft-2013b" in captured.out
