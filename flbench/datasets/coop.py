"""The CoOp benchmark datasets, read from CoOp's on-disk layout so that an existing data root works unchanged.

Layout (CoOp's DATASETS.md): `dataset.root` holds one folder per dataset (`caltech-101/`, `oxford_pets/`, ...); each
holds its images and CoOp's split file `split_zhou_<Name>.json` = {"train"|"val"|"test": [[image path relative to
the image folder, label, class name], ...]}. FGVCAircraft uses its own `variants.txt` / `images_variant_<split>.txt`;
ImageNet lives in imagenet.py. Nothing is copied: images are read where they are.

Class names are taken from the split file with "_" turned into spaces (CoOp's prompt learner does the same), so
"american_bulldog" is prompted as "american bulldog".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flbench.datasets.base import DatasetBundle
from flbench.datasets.coop_splits import GENERATORS, split_provenance
from flbench.datasets.fewshot import Split
from flbench.datasets.files import RawDataset, build_bundle, check_root
from flbench.datasets.templates import templates_for
from flbench.errors import ConfigError


@dataclass(frozen=True)
class CoOpSpec:
    title: str          # the name used in papers
    directory: str      # folder under dataset.root (CoOp's DATASETS.md)
    images: str         # image folder under `directory` that split-file paths are relative to ("" = directory)
    split_file: str     # CoOp's split file, in `directory`
    num_classes: int
    drop: tuple[str, ...] = ()  # classes CoOp leaves out


SPECS: dict[str, CoOpSpec] = {
    "caltech101": CoOpSpec("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", 100,
                           drop=("BACKGROUND_Google", "Faces_easy")),
    "oxford_pets": CoOpSpec("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", 37),
    "stanford_cars": CoOpSpec("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", 196),
    "oxford_flowers": CoOpSpec("Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", 102),
    "food101": CoOpSpec("Food101", "food-101", "images", "split_zhou_Food101.json", 101),
    "fgvc_aircraft": CoOpSpec("FGVCAircraft", "fgvc_aircraft", "images", "variants.txt", 100),
    "sun397": CoOpSpec("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", 397),
    "dtd": CoOpSpec("DTD", "dtd", "images", "split_zhou_DescribableTextures.json", 47),
    "eurosat": CoOpSpec("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", 10),
    "ucf101": CoOpSpec("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", 101),
}


def prompt_name(classname: str) -> str:
    return classname.replace("_", " ").strip()


def _labelled(dataset: str, path: Path, entries: dict[str, list[tuple[str, int, str]]], drop: tuple[str, ...],
              num_classes: int) -> tuple[list[str], dict[str, Split]]:
    """Check labels against class names, drop CoOp's excluded classes, relabel contiguously, count classes."""
    names: dict[int, str] = {}
    for split, rows in entries.items():
        for impath, label, classname in rows:
            if names.setdefault(label, classname) != classname:
                raise ConfigError(f"dataset {dataset}: {path} gives label {label} two class names "
                                  f"({names[label]!r} and {classname!r}); the split file is corrupt")
    kept = [label for label in sorted(names) if names[label] not in drop]
    relabel = {old: new for new, old in enumerate(kept)}
    if num_classes and len(kept) != num_classes:  # 0: not known in advance (dataset=coop_layout)
        raise ConfigError(f"dataset {dataset}: {path} has {len(kept)} classes, expected {num_classes} "
                          f"(dataset.num_classes); the split file is incomplete or belongs to another dataset")
    splits = {}
    for split, rows in entries.items():
        rows = [r for r in rows if r[1] in relabel]
        splits[split] = Split.of([r[0] for r in rows], [relabel[r[1]] for r in rows])
    return [prompt_name(names[label]) for label in kept], splits


def read_split_file(dataset: str, path: Path, drop: tuple[str, ...], num_classes: int
                    ) -> tuple[list[str], dict[str, Split]]:
    """CoOp's split_zhou_*.json → class names (label order) and train/val/test lists."""
    if not path.is_file():
        generate = (f", or generate one from the images by CoOp's procedure: `python -m flbench.prepare {dataset} "
                    f"--root {path.parent.parent} --generate-split` (records then say the split was generated)"
                    if dataset in GENERATORS else "")
        raise ConfigError(f"dataset {dataset}: split file {path.name} not found in {path.parent}; download CoOp's "
                          f"split file into that folder (`python -m flbench.prepare {dataset}` prints the steps)"
                          f"{generate}")
    try:
        payload = json.loads(path.read_text())
        entries = {split: [(str(r[0]), int(r[1]), str(r[2])) for r in payload[split]]
                   for split in ("train", "val", "test")}
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise ConfigError(f"dataset {dataset}: cannot parse split file {path} ({type(error).__name__}: {error}); "
                          f"expected {{'train'|'val'|'test': [[image path, label, class name], ...]}}") from error
    return _labelled(dataset, path, entries, drop, num_classes)


def read_aircraft(dataset: str, directory: Path, num_classes: int) -> tuple[list[str], dict[str, Split]]:
    """FGVC-Aircraft's own files: variants.txt (one class per line) and images_variant_<split>.txt lines
    "<image id> <variant name>"; images are images/<image id>.jpg."""
    variants_file = directory / "variants.txt"
    if not variants_file.is_file():
        raise ConfigError(f"dataset {dataset}: variants.txt not found in {directory}; copy the contents of "
                          f"fgvc-aircraft-2013b/data/ into it")
    classnames = [line.strip() for line in variants_file.read_text().splitlines() if line.strip()]
    lookup = {name: label for label, name in enumerate(classnames)}
    entries = {}
    for split in ("train", "val", "test"):
        list_file = directory / f"images_variant_{split}.txt"
        if not list_file.is_file():
            raise ConfigError(f"dataset {dataset}: {list_file.name} not found in {directory}; copy the contents of "
                              f"fgvc-aircraft-2013b/data/ into it")
        rows = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in lookup:
                raise ConfigError(f"dataset {dataset}: {list_file}:{number} names variant {variant!r}, which is not "
                                  f"in variants.txt; the files are from different releases")
            rows.append((f"{image_id}.jpg", lookup[variant], variant))
        entries[split] = rows
    return _labelled(dataset, variants_file, entries, (), num_classes)


def read_coop(dataset: str, root: Any, num_classes: int | None = None, spec: CoOpSpec | None = None) -> RawDataset:
    """What is on disk for one CoOp dataset (no image is opened); `spec` describes a dataset outside SPECS."""
    spec = spec or SPECS[dataset]
    data_root, directory = check_root(dataset, root, spec.directory, spec.split_file)
    expected = int(num_classes or spec.num_classes)
    if dataset == "fgvc_aircraft":
        classnames, splits = read_aircraft(dataset, directory, expected)
    else:
        classnames, splits = read_split_file(dataset, directory / spec.split_file, spec.drop, expected)
    provenance = {"split": split_provenance(directory / spec.split_file)} if dataset != "fgvc_aircraft" else {}
    generated = (provenance.get("split") or {}).get("generated")
    # Few-shot subsets are cached per split: a generated split's never stand in for the official one's, or another's.
    tag = f"generated-{provenance['split']['sha256'][:12]}" if generated else ""
    return RawDataset(dataset, data_root, directory, directory / spec.images if spec.images else directory,
                      classnames, full_train=lambda: (splits["train"], splits["val"]), test=splits["test"],
                      domain_names=[dataset], cache_tag=tag, provenance=provenance)


def load_coop(dataset: str, root: Any = None, shots: int | None = 16, fewshot_seed: int = 0, val_shots: int | None = 4,
              image_size: int | None = None, workers: int | None = None, num_classes: int | None = None,
              fewshot_dir: str | None = None, augment: bool = True, **_: Any) -> DatasetBundle:
    """A CoOp dataset as a bundle whose train split is the cached k-shot subset (see fewshot.py)."""
    if dataset not in SPECS:
        raise ConfigError(f"dataset.name={dataset!r} is not a CoOp dataset; choose one of {sorted(SPECS)}")
    raw = read_coop(dataset, root, num_classes)
    return build_bundle(raw, shots, fewshot_seed, val_shots, image_size, workers, fewshot_dir, templates_for(dataset),
                        augment)


def load_coop_layout(directory: str, split_file: str, images: str = "", title: str | None = None,
                     templates: list[str] | None = None, classnames: list[str] | None = None, root: Any = None,
                     shots: int | None = 16, fewshot_seed: int = 0, val_shots: int | None = 4,
                     image_size: int | None = None, workers: int | None = None, num_classes: int | None = None,
                     fewshot_dir: str | None = None, augment: bool = True) -> DatasetBundle:
    """Any dataset in CoOp's layout, described by its config alone (conf/dataset/coop_layout.yaml): a folder under
    `root`, a split file in CoOp's format, the image folder its paths are relative to, prompt templates, and
    optionally the class names to prompt with (label order; default: the split file's). A 12th dataset needs no
    code: copy that YAML and fill it in."""
    title = title or directory
    raw = read_coop(title, root, num_classes, CoOpSpec(title, directory, images, split_file, int(num_classes or 0)))
    if classnames is not None:
        if len(classnames) != len(raw.classnames):
            raise ConfigError(f"dataset.classnames lists {len(classnames)} names but {raw.directory / split_file} has "
                              f"{len(raw.classnames)} classes")
        raw = dataclasses.replace(raw, classnames=[str(name) for name in classnames])
    return build_bundle(raw, shots, fewshot_seed, val_shots, image_size, workers, fewshot_dir,
                        list(templates or ["a photo of a {}."]), augment)


# One loader per dataset name (BUILTIN_LOADERS in flbench/datasets/__init__.py maps `dataset.name` to these).
def load_caltech101(**options: Any) -> DatasetBundle:
    return load_coop("caltech101", **options)


def load_oxford_pets(**options: Any) -> DatasetBundle:
    return load_coop("oxford_pets", **options)


def load_stanford_cars(**options: Any) -> DatasetBundle:
    return load_coop("stanford_cars", **options)


def load_oxford_flowers(**options: Any) -> DatasetBundle:
    return load_coop("oxford_flowers", **options)


def load_food101(**options: Any) -> DatasetBundle:
    return load_coop("food101", **options)


def load_fgvc_aircraft(**options: Any) -> DatasetBundle:
    return load_coop("fgvc_aircraft", **options)


def load_sun397(**options: Any) -> DatasetBundle:
    return load_coop("sun397", **options)


def load_dtd(**options: Any) -> DatasetBundle:
    return load_coop("dtd", **options)


def load_eurosat(**options: Any) -> DatasetBundle:
    return load_coop("eurosat", **options)


def load_ucf101(**options: Any) -> DatasetBundle:
    return load_coop("ucf101", **options)
