"""What every dataset family hands to the rest of flbench: image sets with labels and domains, plus class names.

Images leave a dataset as float tensors in [0, 1] at the backbone's resolution; CLIP normalisation happens inside
the backbone, so train and test images are always normalised the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


class ImageSet:
    """An indexable set of labelled images. Subclasses implement `load`; labels/domains are plain arrays."""

    labels: np.ndarray
    domains: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: np.ndarray, train: bool = False) -> torch.Tensor:
        """Images at `indices` as float [n, 3, H, W] in [0, 1]; `train` enables the family's augmentation."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageSet":
        return SubsetImageSet(self, np.asarray(indices, dtype=np.int64))


class TensorImageSet(ImageSet):
    """Images held in memory as uint8 (4× smaller than float; converted per batch)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, domains: np.ndarray,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("TensorImageSet expects uint8 images shaped [N, 3, H, W]")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domains = np.asarray(domains, dtype=np.int64)
        self.augment = augment

    def load(self, indices: np.ndarray, train: bool = False) -> torch.Tensor:
        batch = self.images[torch.as_tensor(indices, dtype=torch.long)].float().div_(255.0)
        return self.augment(batch) if train and self.augment is not None else batch


class SubsetImageSet(ImageSet):
    """A view on another set; indices are kept so records can name exactly which images a client held."""

    def __init__(self, parent: ImageSet, indices: np.ndarray) -> None:
        self.parent = parent
        self.indices = indices
        self.labels = parent.labels[indices]
        self.domains = parent.domains[indices]

    def load(self, indices: np.ndarray, train: bool = False) -> torch.Tensor:
        return self.parent.load(self.indices[np.asarray(indices, dtype=np.int64)], train=train)


@dataclass
class DatasetBundle:
    """One benchmark dataset: splits, class names in label order, domain names, zero-shot templates."""

    name: str
    classnames: list[str]
    domain_names: list[str]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    # Labels the test split is scored over when it covers only some classes (ImageNet-A/-R: 200 of ImageNet's 1000,
    # labels kept in ImageNet order); scenarios pass it to `class_subset` so logits exist only for these. None: all.
    test_classes: list[int] | None = None
    # Where the data came from, for the record (e.g. a CoOp split file's SHA-256, and whether flbench generated it).
    provenance: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def iterate_batches(images: ImageSet, batch_size: int, shuffle: bool = False, train: bool = False,
                    generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) batches; shuffling uses `generator` so runs are reproducible across processes."""
    n = len(images)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    labels = torch.as_tensor(images.labels)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield images.load(idx, train=train), labels[idx]
