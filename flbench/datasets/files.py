"""Image sets decoded from disk (or from in-memory arrays) with CLIP's own preprocessing.

Evaluation follows CLIP: resize the shorter side to the backbone's image size (bicubic), center crop, RGB. Training
follows CoOp: random resized crop (scale 0.08–1, bicubic) and horizontal flip. Both return float images in [0, 1];
CLIP's mean/std normalisation happens inside `FrozenCLIP.encode_image`, so train and test images are always
normalised the same way (FLIP normalised only at test time).

Images of a batch are decoded by a small thread pool: PIL releases the GIL while decoding and resizing, and threads
need no process start-up per batch (engine code calls `load(indices, train)` once per batch). The random crop of each
image is drawn from a per-batch seed taken from torch's global generator in the calling thread, so augmentation is
reproducible under a fixed `torch.manual_seed` whatever the thread scheduling.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from flbench.datasets.base import DatasetBundle, ImageSet
from flbench.datasets.fewshot import Split, fewshot_splits
from flbench.errors import ConfigError

log = logging.getLogger(__name__)

CROP_SCALE = (0.08, 1.0)  # CoOp's random_resized_crop defaults (those of the Inception paper)
CROP_RATIO = (3 / 4, 4 / 3)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's test-time preprocessing without the normalisation: uint8 [3, size, size]."""
    image = TF.resize(image.convert("RGB"), size, interpolation=InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(TF.center_crop(image, [size, size]))


def crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = CROP_SCALE,
             ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering `scale` of the area at aspect `ratio` (log-uniform);
    after 10 failed draws, the largest central crop within `ratio` (the Inception-style rule CoOp uses)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: Image.Image, size: int, rng: np.random.Generator) -> torch.Tensor:
    """CoOp's training augmentation without the normalisation: random resized crop + flip, uint8 [3, size, size]."""
    image = image.convert("RGB")
    top, left, h, w = crop_box(image.width, image.height, rng)
    image = TF.resized_crop(image, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC)
    if rng.random() < 0.5:
        image = TF.hflip(image)
    return TF.pil_to_tensor(image)


class PILImageSet(ImageSet):
    """An image set whose images are PIL images opened one at a time; subclasses implement `open`."""

    def __init__(self, labels: Sequence[int] | np.ndarray, domains: Sequence[int] | np.ndarray | None,
                 image_size: int, workers: int | None = None, augment: bool = True) -> None:
        if not image_size or int(image_size) < 1:
            raise ConfigError(f"dataset.image_size={image_size!r} must be a positive integer (null: the backbone's)")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domains = np.zeros(len(self.labels), np.int64) if domains is None else np.asarray(domains, np.int64)
        self.image_size = int(image_size)
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.augment = bool(augment)  # False: training batches get the evaluation preprocessing (train.augment=false)
        self._pool: ThreadPoolExecutor | None = None

    def open(self, index: int) -> Image.Image:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"image {index}"

    def _one(self, index: int, seed: int | None) -> torch.Tensor:
        try:
            with self.open(index) as image:
                if seed is None:
                    return eval_transform(image, self.image_size)
                return train_transform(image, self.image_size, np.random.default_rng(seed))
        except (OSError, ValueError) as error:  # missing or unreadable file found mid-run: name it, no deep trace
            raise ConfigError(f"cannot read {self.describe(index)}: {error}") from error

    def load(self, indices: np.ndarray, train: bool = False) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        seeds: list[int | None] = [None] * len(indices)
        if train and self.augment:
            base = int(torch.randint(0, 2**62, (1,)).item())
            seeds = [base + i for i in range(len(indices))]
        if self.workers == 1 or len(indices) == 1:
            images = [self._one(int(i), s) for i, s in zip(indices, seeds)]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="flbench-decode")
            images = list(self._pool.map(self._one, [int(i) for i in indices], seeds))
        return torch.stack(images).float().div_(255.0)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pool"] = None  # thread pools do not pickle (Ray ships sets to other processes)
        return state


class FileImageSet(PILImageSet):
    """Images named by path (absolute, or relative to nothing: callers pass full paths). No copying of files."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | np.ndarray,
                 domains: Sequence[int] | np.ndarray | None = None, image_size: int = 224,
                 workers: int | None = None, augment: bool = True) -> None:
        super().__init__(labels, domains, image_size, workers, augment)
        if len(paths) != len(self.labels):
            raise ValueError("FileImageSet needs one label per path")
        self.paths = [str(p) for p in paths]

    def open(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])

    def describe(self, index: int) -> str:
        return self.paths[index]


class ArrayImageSet(PILImageSet):
    """Images held in memory as uint8 [N, H, W, 3] (CIFAR), preprocessed exactly like files."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray,
                 domains: Sequence[int] | np.ndarray | None = None, image_size: int = 224,
                 workers: int | None = None, augment: bool = True) -> None:
        super().__init__(labels, domains, image_size, workers, augment)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError("ArrayImageSet expects uint8 images shaped [N, H, W, 3]")
        self.images = images

    def open(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


def missing_files(paths: Sequence[str], workers: int | None = None) -> list[str]:
    """The paths that are not regular files (checked in parallel: network file systems make stat slow)."""
    if len(paths) < 2000:
        return [p for p in paths if not os.path.isfile(p)]
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        present = list(pool.map(os.path.isfile, paths, chunksize=512))
    return [p for p, ok in zip(paths, present) if not ok]


def require_files(dataset: str, dataset_dir: Path, paths: Sequence[str], what: str) -> None:
    """Raise one ConfigError line naming the dataset, its folder and the first missing files."""
    missing = missing_files(paths)
    if missing:
        shown = ", ".join(os.path.relpath(p, dataset_dir) for p in missing[:3])
        raise ConfigError(f"dataset {dataset}: {len(missing)} of {len(paths)} {what} images are missing in "
                          f"{dataset_dir} (e.g. {shown}); the root is incomplete: `python -m flbench.prepare "
                          f"{dataset} --root {dataset_dir.parent}` lists what is there and what is missing")


# --- from a dataset's lists of files to a DatasetBundle (shared by every real-data family) ---------------------------

@dataclass
class RawDataset:
    """What a family's reader finds on disk before any subsetting: class names, the test list and a (lazy, since
    ImageNet's training list means listing 1.28 M files) reader for the train/val lists. Paths are relative to
    `image_dir`."""

    name: str
    root: Path              # dataset.root, the folder that holds every dataset folder (CoOp's $DATA)
    dataset_dir: Path       # e.g. $DATA/caltech-101 (few-shot files go to its split_fewshot/)
    image_dir: Path         # split-file paths are relative to this folder
    classnames: list[str]
    full_train: Callable[[], tuple[Split, Split | None]]
    test: Split
    domain_names: list[str] = field(default_factory=lambda: ["default"])
    test_classes: list[int] | None = None
    per_domain: bool = False
    cache_tag: str = ""     # distinguishes few-shot files of different selections (DomainNet domains/classes)
    provenance: dict = field(default_factory=dict)  # e.g. {"split": {file, sha256, generated}}: into every record


def check_root(dataset: str, root: str | os.PathLike | None, directory: str, marker: str | None = None
               ) -> tuple[Path, Path]:
    """(data root, dataset folder). `root` may also point at the dataset folder itself (it then holds `marker`)."""
    if root is None or str(root) == "":
        raise ConfigError(f"dataset.root is not set for dataset {dataset}: pass dataset.root=DIR (the folder holding "
                          f"{directory}/ as in CoOp's DATASETS.md) or set FLBENCH_DATA")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ConfigError(f"dataset {dataset}: dataset.root={root_path} is not a folder; point it at the folder that "
                          f"holds {directory}/")
    if (root_path / directory).is_dir():
        return root_path, root_path / directory
    if root_path.name == directory or (marker and (root_path / marker).exists()):
        return root_path.parent, root_path
    raise ConfigError(f"dataset {dataset}: folder {directory}/ not found in dataset.root={root_path}; see "
                      f"`python -m flbench.prepare {dataset} --root {root_path}` for the expected layout")


def build_bundle(raw: RawDataset, shots: int | None, fewshot_seed: int, val_shots: int | None, image_size: int | None,
                 workers: int | None, fewshot_dir: str | None, templates: list[str], augment: bool = True
                 ) -> DatasetBundle:
    """Few-shot train/val (cached), every needed file checked up front, then lazily decoded image sets."""
    train, val = fewshot_splits(raw.name, raw.dataset_dir, raw.full_train, len(raw.classnames), shots,
                                int(fewshot_seed), val_shots, raw.per_domain, fewshot_dir, raw.cache_tag)
    size = int(image_size or 224)
    sets = {}
    for split_name, split in (("train", train), ("val", val), ("test", raw.test)):
        paths = [str(raw.image_dir / p) for p in split.paths]
        require_files(raw.name, raw.dataset_dir, paths, split_name)
        sets[split_name] = FileImageSet(paths, split.labels, split.domains, size, workers, augment)
    log.info("%s: %d classes, %d train / %d val / %d test images at %d px", raw.name, len(raw.classnames),
             len(train), len(val), len(raw.test), size)
    return DatasetBundle(name=raw.name, classnames=list(raw.classnames), domain_names=list(raw.domain_names),
                         templates=templates, test_classes=raw.test_classes, provenance=dict(raw.provenance), **sets)
