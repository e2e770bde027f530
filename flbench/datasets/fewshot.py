"""Few-shot subsets of real datasets: a pure function of (k, seed), cached on disk as CoOp does.

CoOp draws k training images per class (and min(k, 4) validation images per class) once per seed and stores them in
`<dataset dir>/split_fewshot/shot_{k}-seed_{seed}.pkl`, so every method sees the same images. flbench writes the same
information next to it as JSON (`shot_{k}-seed_{seed}.json`: relative paths, labels, domains) — portable, readable by
anything, and never executed on load. When the data root is read-only the file goes to the flbench cache instead.

The federation partition (datasets/partition.py) then draws `shots` per class from a bundle whose train split already
*is* this k-shot subset, so it takes all of it: the cached subset is exactly the pool the clients share.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flbench.errors import ConfigError
from flbench.io import atomic_write_json, cache_dir

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Split:
    """A list of images as the split files name them: paths relative to the dataset's image folder."""

    paths: list[str]
    labels: np.ndarray
    domains: np.ndarray

    @classmethod
    def of(cls, paths: list[str], labels: list[int] | np.ndarray, domains: list[int] | np.ndarray | None = None
           ) -> "Split":
        labels = np.asarray(labels, dtype=np.int64)
        return cls(list(paths), labels, np.zeros(len(labels), np.int64) if domains is None else
                   np.asarray(domains, dtype=np.int64))

    def take(self, indices: np.ndarray) -> "Split":
        return Split([self.paths[i] for i in indices], self.labels[indices], self.domains[indices])

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self) -> list[list]:
        return [[p, int(y), int(d)] for p, y, d in zip(self.paths, self.labels, self.domains)]

    @classmethod
    def from_rows(cls, rows: list[list]) -> "Split":
        return cls.of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _check_shots(train: Split, shots: int, per_domain: bool) -> None:
    """A class with fewer than k images gives all of them (CoOp's rule; real datasets have a few small classes), but
    a k no class reaches would clamp every class: the key would not say what ran."""
    groups = train.labels * (int(train.domains.max()) + 1) + train.domains if per_domain and len(train) else train.labels
    largest = int(np.bincount(groups).max()) if len(train) else 0
    if shots > largest:
        raise ConfigError(f"shots={shots} but no class{' and domain' if per_domain else ''} has more than {largest} "
                          f"training images; set shots ≤ {largest}")


def select_per_group(split: Split, per_group: int | None, rng: np.random.Generator, per_domain: bool,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of `per_group` images per class (per class *and* domain if `per_domain`), in file order; a group with
    fewer images gives all of them (as CoOp does without repetition). None: every image."""
    allowed = np.ones(len(split), bool)
    if exclude is not None and len(exclude):
        allowed[exclude] = False
    if per_group is None:
        return np.flatnonzero(allowed)
    groups = split.labels * (int(split.domains.max()) + 1 if len(split) else 1) + split.domains if per_domain \
        else split.labels
    chosen = []
    for group in np.unique(groups):
        members = np.flatnonzero((groups == group) & allowed)
        if len(members):
            chosen.append(rng.choice(members, size=min(per_group, len(members)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def cache_paths(dataset: str, dataset_dir: Path, shots: int, seed: int, val_shots: int | None,
                fewshot_dir: str | None, tag: str = "") -> list[Path]:
    """Where the subset is looked for, in order: `fewshot_dir` (if set), else the data root (CoOp's place), then the
    flbench cache (used when the root is read-only)."""
    name = (f"shot_{shots}-seed_{seed}" + ("" if val_shots == 4 else f"-val_{val_shots}") +
            (f"-{tag}" if tag else "") + ".json")
    if fewshot_dir:
        return [Path(fewshot_dir).expanduser() / dataset / name]
    root_id = hashlib.sha1(str(dataset_dir.resolve()).encode()).hexdigest()[:10]
    return [dataset_dir / "split_fewshot" / name, cache_dir() / "fewshot" / f"{dataset}-{root_id}" / name]


def _read(path: Path, num_classes: int) -> tuple[Split, Split] | None:
    try:
        payload = json.loads(path.read_text())
        train, val = Split.from_rows(payload["train"]), Split.from_rows(payload["val"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        log.warning("ignoring unreadable few-shot file %s (%s); drawing the subset again", path, error)
        return None
    if payload.get("format") != FORMAT or any(len(s) and (s.labels.min() < 0 or s.labels.max() >= num_classes)
                                              for s in (train, val)):
        log.warning("ignoring few-shot file %s (other format or class count); drawing the subset again", path)
        return None
    return train, val


def fewshot_splits(dataset: str, dataset_dir: Path, full: Callable[[], tuple[Split, Split | None]], num_classes: int,
                   shots: int | None, seed: int, val_shots: int | None = 4, per_domain: bool = False,
                   fewshot_dir: str | None = None, tag: str = "") -> tuple[Split, Split]:
    """The (train, val) splits a run uses.

    With `shots`: k training images per class (per class and domain if `per_domain`) and min(k, val_shots)
    validation images per class, drawn with `seed` and cached; `full()` (which may list a large folder) is only
    called on a cache miss. A dataset without a validation split (`full()` returns None for it: ImageNet, whose val
    is the test set, DomainNet, CIFAR) gets its validation images from the training images not drawn for training,
    so no test image ever selects a round. Without `shots`: the whole training split (minus such carved-out
    validation images) and `val_shots` validation images per class.
    """
    if shots is not None and int(shots) < 1:
        raise ConfigError(f"dataset.shots={shots} must be at least 1 (null: the full training split)")
    if val_shots is not None and int(val_shots) < 1:
        raise ConfigError(f"dataset.val_shots={val_shots} must be at least 1 (null: the full validation split)")
    if shots is None:
        train, val = full()
        rng = np.random.default_rng(seed)
        if val is None:
            carved = select_per_group(train, val_shots or 4, rng, per_domain)
            return train.take(np.setdiff1d(np.arange(len(train)), carved)), train.take(carved)
        return train, val.take(select_per_group(val, val_shots, rng, per_domain))

    shots = int(shots)
    locations = cache_paths(dataset, dataset_dir, shots, seed, val_shots, fewshot_dir, tag)
    for path in locations:
        if path.is_file():
            cached = _read(path, num_classes)
            if cached is not None:
                log.info("few-shot subset of %s: %s", dataset, path)
                return cached
    train, val = full()
    rng = np.random.default_rng(seed)
    _check_shots(train, shots, per_domain)
    chosen = select_per_group(train, shots, rng, per_domain)
    per_val = min(shots, val_shots) if val_shots else None
    if val is None:
        val = train.take(select_per_group(train, per_val or 4, rng, per_domain, exclude=chosen))
    else:
        val = val.take(select_per_group(val, per_val, rng, per_domain))
    train = train.take(chosen)
    payload = {"format": FORMAT, "dataset": dataset, "shots": shots, "seed": seed, "val_shots": val_shots,
               "per_domain": per_domain, "train": train.rows(), "val": val.rows()}
    for path in locations:
        try:
            atomic_write_json(path, payload)
            log.info("few-shot subset of %s (%d-shot, seed %d) cached at %s", dataset, shots, seed, path)
            break
        except OSError as error:
            log.warning("cannot write %s (%s); trying the next cache location", path, error)
    return train, val
