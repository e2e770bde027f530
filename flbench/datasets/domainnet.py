"""DomainNet: 345 classes in six domains, read from its official train/test lists.

Layout (as Dassl/DomainBed keep it): `dataset.root/domainnet/<domain>/<class>/<image>` and the official lists
`<domain>_train.txt` / `<domain>_test.txt` (lines "clipart/aircraft_carrier/clipart_001_000018.jpg 0") either in
`domainnet/splits/` or directly in `domainnet/`. Class names come from the folder names ("aircraft_carrier" →
"aircraft carrier"); domains are `ImageSet.domains` indices into `dataset.domains` (their order in the config).

Few-shot pools are k images per class *per domain* (the unit of partition=domain), cached like CoOp's; DomainNet has
no validation list, so validation images are carved per class and domain from the training images not drawn.
`dataset.classes` can restrict the benchmark to some classes (a count = the first N labels, or a list of names), as
several FL papers use a DomainNet subset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from flbench.datasets.base import DatasetBundle
from flbench.datasets.coop import prompt_name
from flbench.datasets.fewshot import Split
from flbench.datasets.files import RawDataset, build_bundle, check_root
from flbench.datasets.templates import templates_for
from flbench.errors import ConfigError

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
NUM_CLASSES = 345


def _list_file(directory: Path, domain: str, split: str) -> Path:
    for candidate in (directory / "splits" / f"{domain}_{split}.txt", directory / f"{domain}_{split}.txt"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"dataset domainnet: list {domain}_{split}.txt not found in {directory}/splits or {directory}; "
                      f"download DomainNet's official train/test lists (`python -m flbench.prepare domainnet`)")


def read_list(path: Path, names: dict[int, str]) -> tuple[list[str], list[int]]:
    """One official list → (relative paths, labels); records each label's class folder in `names`."""
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            impath, label_text = line.rsplit(maxsplit=1)
            label, folder = int(label_text), impath.split("/")[1]
        except (ValueError, IndexError) as error:
            raise ConfigError(f"dataset domainnet: {path}:{number} is not '<domain>/<class>/<file> <label>'") \
                from error
        if names.setdefault(label, folder) != folder:
            raise ConfigError(f"dataset domainnet: {path}:{number} gives label {label} to class {folder!r}, "
                              f"elsewhere {names[label]!r}; the lists are from different releases")
        paths.append(impath)
        labels.append(label)
    return paths, labels


def _select_classes(classes: Any, classnames: list[str]) -> list[int]:
    if classes is None:
        return list(range(len(classnames)))
    if isinstance(classes, int) and not isinstance(classes, bool):
        if not 1 <= classes <= len(classnames):
            raise ConfigError(f"dataset.classes={classes} must be between 1 and {len(classnames)}")
        return list(range(classes))
    unknown = [c for c in classes if prompt_name(str(c)) not in classnames]
    if unknown:
        raise ConfigError(f"dataset.classes has unknown DomainNet classes {unknown[:3]}")
    return [classnames.index(prompt_name(str(c))) for c in classes]


def read_domainnet(root: Any, domains: list[str] | tuple[str, ...] = DOMAINS, num_classes: int | None = None,
                   classes: Any = None) -> RawDataset:
    dataset = "domainnet"
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or not domains:
        raise ConfigError(f"dataset.domains={list(domains)} must be a non-empty subset of {list(DOMAINS)}")
    data_root, directory = check_root(dataset, root, "domainnet", "splits")
    names: dict[int, str] = {}
    lists: dict[str, tuple[list[str], list[int], list[int]]] = {}
    for split in ("train", "test"):
        paths, labels, doms = [], [], []
        for d, domain in enumerate(domains):
            p, y = read_list(_list_file(directory, domain, split), names)
            paths += p
            labels += y
            doms += [d] * len(y)
        lists[split] = (paths, labels, doms)
    expected = int(num_classes or NUM_CLASSES)
    if sorted(names) != list(range(expected)):
        raise ConfigError(f"dataset domainnet: the lists of domains {list(domains)} name {len(names)} classes, "
                          f"expected labels 0..{expected - 1} (dataset.num_classes); the lists are incomplete")
    all_names = [prompt_name(names[label]) for label in range(expected)]
    keep = _select_classes(classes, all_names)
    relabel = np.full(expected, -1)
    relabel[keep] = np.arange(len(keep))
    splits = {}
    for split, (paths, labels, doms) in lists.items():
        new = relabel[np.asarray(labels, np.int64)]
        idx = np.flatnonzero(new >= 0)
        splits[split] = Split.of([paths[i] for i in idx], new[idx], np.asarray(doms, np.int64)[idx])
    return RawDataset(dataset, data_root, directory, directory, [all_names[k] for k in keep],
                      full_train=lambda: (splits["train"], None), test=splits["test"], domain_names=list(domains),
                      per_domain=True)


def load_domainnet(root: Any = None, domains: list[str] | tuple[str, ...] = DOMAINS, shots: int | None = 16,
                   fewshot_seed: int = 0, val_shots: int | None = 4, image_size: int | None = None,
                   workers: int | None = None, num_classes: int | None = None, classes: Any = None,
                   fewshot_dir: str | None = None, augment: bool = True, **_: Any) -> DatasetBundle:
    raw = read_domainnet(root, tuple(domains), num_classes, classes)
    # a few-shot file must never be shared between different domain or class selections
    parts = [] if tuple(domains) == DOMAINS else ["+".join(domains)]
    if classes is not None:
        parts.append(f"c{classes}" if isinstance(classes, int) else
                     "c" + hashlib.sha1(repr(list(classes)).encode()).hexdigest()[:8])
    raw.cache_tag = "-".join(parts)
    return build_bundle(raw, shots, fewshot_seed, val_shots, image_size, workers, fewshot_dir,
                        templates_for("domainnet"), augment)
