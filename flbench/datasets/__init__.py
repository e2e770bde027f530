"""Dataset families, found by `dataset.name`. Each family module registers a loader returning a DatasetBundle."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flbench.datasets.base import DatasetBundle
from flbench.registry import Registry

Loader = Callable[..., DatasetBundle]

# name → "module:function"; imported lazily so a user without (say) torchvision datasets still runs the suite.
BUILTIN_LOADERS: dict[str, str] = {
    "synthetic": "flbench.datasets.synthetic:load_synthetic",
    # real datasets (docs/datasets.md): CoOp's layout and split files, ImageNet and its variants, DomainNet, CIFAR
    **{name: f"flbench.datasets.coop:load_{name}" for name in (
        "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397", "dtd",
        "eurosat", "ucf101")},
    **{name: f"flbench.datasets.imagenet:load_{name}" for name in (
        "imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")},
    "coop_layout": "flbench.datasets.coop:load_coop_layout",  # any CoOp-layout dataset from its config alone
    "domainnet": "flbench.datasets.domainnet:load_domainnet",
    "cifar10": "flbench.datasets.cifar:load_cifar10",
    "cifar100": "flbench.datasets.cifar:load_cifar100",
}


DATASETS: Registry[Loader] = Registry("datasets", "dataset.name", lazy=BUILTIN_LOADERS)


def load_dataset(cfg: Mapping[str, Any], image_size: int | None = None) -> DatasetBundle:
    """The bundle `cfg` names. `image_size` (the backbone's) fills `dataset.image_size` when that is unset (null)."""
    options = dict(cfg)
    name = options.pop("name", None)
    if options.get("image_size") is None and image_size is not None:
        options["image_size"] = int(image_size)
    return DATASETS.get(name)(**options)
