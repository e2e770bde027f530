"""ImageNet (CoOp's layout) and its test-only variants ImageNet-V2, -Sketch, -A and -R.

ImageNet: `imagenet/images/train/<wnid>/*` and `imagenet/images/val/<wnid>/*` (the validation images sorted into
class folders) plus `imagenet/classnames.txt` ("<wnid> <class name>" per line). Labels follow sorted wnids, the
standard order. As in CoOp the validation set is the test set; flbench's validation images (round selection) come
from training images not drawn for the few-shot pool, so no test image ever selects a round.

Variants are evaluation targets: their bundle has empty train/val splits, ImageNet's 1000 class names in ImageNet
label order, and test labels in that same label space. ImageNet-A and -R cover 200 classes: `bundle.test_classes`
lists them, and scenarios score their test split over those classes only (`scenarios.class_subset`), i.e. logits
restricted to the 200 classes, as CoOp/CoCoOp evaluate them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flbench.datasets.base import DatasetBundle
from flbench.datasets.fewshot import Split
from flbench.datasets.files import RawDataset, build_bundle, check_root, default_workers
from flbench.datasets.templates import templates_for
from flbench.errors import ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class VariantSpec:
    title: str
    directory: str
    images: str
    folders: str            # "wnid": folders named by WordNet id; "index": folders "0".."999" (ImageNet-V2)
    subset: int | None      # classes present when only some are (A/R: 200); None: all of ImageNet's


VARIANTS: dict[str, VariantSpec] = {
    "imagenet_v2": VariantSpec("ImageNet-V2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "index", None),
    "imagenet_sketch": VariantSpec("ImageNet-Sketch", "imagenet-sketch", "images", "wnid", None),
    "imagenet_a": VariantSpec("ImageNet-A", "imagenet-adversarial", "imagenet-a", "wnid", 200),
    "imagenet_r": VariantSpec("ImageNet-R", "imagenet-rendition", "imagenet-r", "wnid", 200),
}


def read_classnames(dataset: str, candidates: list[Path], num_classes: int = 1000) -> tuple[list[str], list[str]]:
    """(wnids in label order, class names) from the first classnames.txt found among `candidates`."""
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"dataset {dataset}: classnames.txt not found (looked in "
                          f"{', '.join(str(p.parent) for p in candidates)}); download CoOp's classnames.txt there")
    pairs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            if not name:
                raise ConfigError(f"dataset {dataset}: {path}:{number} is not '<wnid> <class name>'")
            pairs[wnid] = name.strip()
    if len(pairs) != num_classes:
        raise ConfigError(f"dataset {dataset}: {path} lists {len(pairs)} classes, expected {num_classes} "
                          f"(dataset.num_classes)")
    wnids = sorted(pairs)
    return wnids, [pairs[w] for w in wnids]


def list_images(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def list_class_folders(dataset: str, base: Path, folders: list[str], labels: list[int], what: str,
                       require_all: bool = True, prefix: str = "") -> Split:
    """Images of each class folder `base/<folder>`, labelled by `labels` (listed in parallel: 1000 folders); paths
    are `prefix` + "<folder>/<file>"."""
    if not base.is_dir():
        raise ConfigError(f"dataset {dataset}: {what} folder {base} not found")
    missing = [f for f in folders if not (base / f).is_dir()]
    if missing and require_all:
        flat = any(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in os.listdir(base)[:50])
        hint = (" (the images are not sorted into class folders: sort the validation images into <wnid>/ folders, "
                "as CoOp expects)" if flat else "")
        raise ConfigError(f"dataset {dataset}: {len(missing)} of {len(folders)} class folders missing in {base} "
                          f"(e.g. {', '.join(missing[:3])}){hint}")
    present = [(f, y) for f, y in zip(folders, labels) if (base / f).is_dir()]
    with ThreadPoolExecutor(default_workers()) as pool:
        listings = list(pool.map(lambda f: list_images(base / f), [f for f, _ in present]))
    paths, out_labels = [], []
    for (folder, label), names in zip(present, listings):
        paths += [f"{prefix}{folder}/{n}" for n in names]
        out_labels += [label] * len(names)
    return Split.of(paths, out_labels)


def read_imagenet(root: Any, num_classes: int | None = None) -> RawDataset:
    dataset = "imagenet"
    data_root, directory = check_root(dataset, root, "imagenet", "classnames.txt")
    wnids, classnames = read_classnames(dataset, [directory / "classnames.txt"], int(num_classes or 1000))
    images = directory / "images"
    labels = list(range(len(wnids)))
    test = list_class_folders(dataset, images / "val", wnids, labels, "validation (used as test)", prefix="val/")
    train = lambda: (list_class_folders(dataset, images / "train", wnids, labels, "training",  # noqa: E731
                                        prefix="train/"), None)
    return RawDataset(dataset, data_root, directory, images, classnames, full_train=train, test=test,
                      domain_names=[dataset])


def load_imagenet(root: Any = None, shots: int | None = 16, fewshot_seed: int = 0, val_shots: int | None = 4,
                  image_size: int | None = None, workers: int | None = None, num_classes: int | None = None,
                  fewshot_dir: str | None = None, augment: bool = True, **_: Any) -> DatasetBundle:
    """ImageNet: k-shot training pool (cached; the 1.28 M-file listing happens only on a cache miss), val carved
    from the remaining training images, the official validation set as test."""
    raw = read_imagenet(root, num_classes)
    return build_bundle(raw, shots, fewshot_seed, val_shots, image_size, workers, fewshot_dir,
                        templates_for("imagenet"), augment)


def read_variant(variant: str, root: Any, num_classes: int | None = None, subset_classes: int | None = None
                 ) -> RawDataset:
    """A variant's test images, labelled in ImageNet's label space (`num_classes` = the classes of classnames.txt;
    `subset_classes` = the classes whose folders must be present: 200 for A/R)."""
    spec = VARIANTS[variant]
    data_root, directory = check_root(variant, root, spec.directory, spec.images)
    wnids, classnames = read_classnames(variant, [directory / "classnames.txt",
                                                  data_root / "imagenet" / "classnames.txt"], int(num_classes or 1000))
    base = directory / spec.images
    if not base.is_dir():
        raise ConfigError(f"dataset {variant}: image folder {spec.images}/ not found in {directory}")
    if spec.folders == "index":
        folders, labels = [str(i) for i in range(len(wnids))], list(range(len(wnids)))
    else:
        present = sorted(e.name for e in os.scandir(base) if e.is_dir())
        unknown = sorted(set(present) - set(wnids))
        if unknown:
            raise ConfigError(f"dataset {variant}: folders {unknown[:3]} in {base} are not ImageNet classes of "
                              f"classnames.txt; the root or classnames.txt is wrong")
        folders, labels = present, [wnids.index(f) for f in present]
    test = list_class_folders(variant, base, folders, labels, "image", require_all=spec.folders == "index")
    expected = int(subset_classes or spec.subset or len(wnids))
    found = sorted(set(test.labels.tolist()))
    if len(found) != expected:
        raise ConfigError(f"dataset {variant}: {base} has images of {len(found)} classes, expected {expected} "
                          f"(dataset.subset_classes); the root is incomplete")
    empty = lambda: (Split.of([], []), Split.of([], []))  # noqa: E731
    return RawDataset(variant, data_root, directory, base, classnames, full_train=empty, test=test,
                      domain_names=[variant], test_classes=found if expected < len(wnids) else None)


def load_imagenet_variant(variant: str, root: Any = None, image_size: int | None = None, workers: int | None = None,
                          num_classes: int | None = None, subset_classes: int | None = None, **_: Any
                          ) -> DatasetBundle:
    """A test-only ImageNet variant (see the module docstring); few-shot options do not apply."""
    raw = read_variant(variant, root, num_classes, subset_classes)
    return build_bundle(raw, None, 0, None, image_size, workers, None, templates_for(variant))


def load_imagenet_v2(**options: Any) -> DatasetBundle:
    return load_imagenet_variant("imagenet_v2", **options)


def load_imagenet_sketch(**options: Any) -> DatasetBundle:
    return load_imagenet_variant("imagenet_sketch", **options)


def load_imagenet_a(**options: Any) -> DatasetBundle:
    return load_imagenet_variant("imagenet_a", **options)


def load_imagenet_r(**options: Any) -> DatasetBundle:
    return load_imagenet_variant("imagenet_r", **options)
