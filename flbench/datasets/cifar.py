"""CIFAR-10 and CIFAR-100 through torchvision (which downloads them, with a progress bar, where the network allows).

The 32-px images are held in memory as uint8 and go through the same CLIP preprocessing as files (upsampled to the
backbone's image size). There is no validation split: validation images are carved per class from the training
images not drawn for the few-shot pool, as for ImageNet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from flbench.backbones.weights import reachable
from flbench.datasets.base import DatasetBundle
from flbench.datasets.coop import prompt_name
from flbench.datasets.fewshot import Split, fewshot_splits
from flbench.datasets.files import ArrayImageSet
from flbench.datasets.templates import templates_for
from flbench.errors import ConfigError

log = logging.getLogger(__name__)

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
SIZES = {"cifar10": "163 MB", "cifar100": "161 MB"}


def _torchvision_class(dataset: str):
    from torchvision import datasets

    return datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100


def download_cifar(dataset: str, root: str | Path) -> None:
    """Download (torchvision shows a progress bar) or fail in seconds with the manual alternative."""
    cls = _torchvision_class(dataset)
    root = Path(root).expanduser()
    if (root / FOLDERS[dataset]).is_dir():
        return
    if not reachable(urlparse(cls.url).hostname or "", urlparse(cls.url).port or 443, timeout=3.0):
        raise ConfigError(f"dataset {dataset}: cannot reach {urlparse(cls.url).hostname} to download; fetch "
                          f"{cls.url} elsewhere and unpack it in {root} (giving {root / FOLDERS[dataset]})")
    root.mkdir(parents=True, exist_ok=True)
    cls(str(root), train=True, download=True)


def read_cifar(dataset: str, root: Any, download: bool = False) -> tuple[list[str], dict[str, Any]]:
    if root is None:
        raise ConfigError(f"dataset.root is not set for dataset {dataset}: pass dataset.root=DIR (torchvision keeps "
                          f"{FOLDERS[dataset]}/ in it) or set FLBENCH_DATA")
    root = Path(root).expanduser()
    if download:
        download_cifar(dataset, root)
    if not (root / FOLDERS[dataset]).is_dir():
        raise ConfigError(f"dataset {dataset}: {FOLDERS[dataset]}/ not found in dataset.root={root}; run "
                          f"`python -m flbench.prepare {dataset} --root {root}` (downloads {SIZES[dataset]}) or set "
                          f"dataset.download=true")
    cls = _torchvision_class(dataset)
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as error:  # torchvision's integrity check
        raise ConfigError(f"dataset {dataset}: {root / FOLDERS[dataset]} is incomplete or corrupt ({error}); "
                          f"delete it and run `python -m flbench.prepare {dataset} --root {root}`") from error
    return [prompt_name(c) for c in train.classes], {"train": train, "test": test}


def load_cifar(dataset: str, root: Any = None, shots: int | None = 16, fewshot_seed: int = 0,
               val_shots: int | None = 4, image_size: int | None = None, workers: int | None = None,
               download: bool = False, fewshot_dir: str | None = None, augment: bool = True, **_: Any
               ) -> DatasetBundle:
    classnames, sets = read_cifar(dataset, root, download)
    arrays = {name: (np.asarray(s.data, np.uint8), np.asarray(s.targets, np.int64)) for name, s in sets.items()}
    # few-shot selection works on indices into the training array ("paths" are the indices as strings)
    full = lambda: (Split.of([str(i) for i in range(len(arrays["train"][1]))], arrays["train"][1]), None)  # noqa
    directory = Path(root).expanduser() / FOLDERS[dataset]
    train, val = fewshot_splits(dataset, directory, full, len(classnames), shots, int(fewshot_seed), val_shots,
                                fewshot_dir=fewshot_dir)
    size = int(image_size or 224)
    images = arrays["train"][0]

    def from_train(split: Split) -> ArrayImageSet:
        idx = np.asarray([int(p) for p in split.paths], np.int64)
        return ArrayImageSet(images[idx], split.labels, None, size, workers, augment)

    return DatasetBundle(name=dataset, classnames=classnames, domain_names=[dataset], templates=templates_for(dataset),
                         train=from_train(train), val=from_train(val),
                         test=ArrayImageSet(arrays["test"][0], arrays["test"][1], None, size, workers))


def load_cifar10(**options: Any) -> DatasetBundle:
    return load_cifar("cifar10", **options)


def load_cifar100(**options: Any) -> DatasetBundle:
    return load_cifar("cifar100", **options)
