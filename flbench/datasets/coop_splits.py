"""A missing `split_zhou_<Name>.json`, generated from what is on disk by CoOp's own procedure.

CoOp's split files are linked from its DATASETS.md, and those links go dead. CoOp itself writes the file when it is
absent (the `else` branch of each dataset's constructor in its `datasets/*.py`); this module does the same:

- folder layout (Caltech101, DTD, EuroSAT, Food101): one folder per class, sorted; per class the images are
  shuffled and cut into round(50 %) train, round(20 %) val and the rest test (`read_and_split_data`); Caltech101
  leaves out BACKGROUND_Google and Faces_easy and renames four classes, EuroSAT renames all ten (CoOp's names);
- official train(+val)/test lists (OxfordPets, SUN397, UCF101, StanfordCars): the list's test images are the test
  split, and per class a shuffled round(20 %) of the trainval images becomes val (`split_trainval`);
- OxfordFlowers: labels from imagelabels.mat, names from cat_to_name.json, then 50/20/30 per class as above.

One deliberate difference: for folder layouts CoOp shuffled `os.listdir` order, which depends on the file system,
under whatever global random state its run had; here each class's images are sorted by name first, and every
shuffle draws from one `random.Random(split_seed)` class by class (lists keep their files' order, as in CoOp), so
the same files and seed always give the same split file. It is
therefore *a* split by CoOp's procedure, not CoOp's published split: the file says so (`"generated"`), and every
record of a run on it carries the file's SHA-256 and that block (`data.split` in the record).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flbench.errors import ConfigError
from flbench.io import atomic_write

Row = tuple[str, int, str]  # (image path relative to the image folder, label, class name)
P_TRAIN, P_VAL = 0.5, 0.2  # read_and_split_data's defaults
P_VAL_OF_TRAINVAL = 0.2  # split_trainval's default
DEFAULT_SPLIT_SEED = 1  # CoOp's scripts run seeds 1, 2, 3; its files were written during such a run
PROCEDURE_VERSION = 1

CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")
CALTECH_NAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_NAMES = {"AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation":
                 "Herbaceous Vegetation Land", "Highway": "Highway or Road", "Industrial": "Industrial Buildings",
                 "Pasture": "Pasture Land", "PermanentCrop": "Permanent Crop Land", "Residential":
                 "Residential Buildings", "River": "River", "SeaLake": "Sea or Lake"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def _require(path: Path, dataset: str, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"dataset {dataset}: cannot generate a split without {path} ({what}); "
                          f"`python -m flbench.prepare {dataset} --steps` says where it comes from")
    return path


def _cut(dataset: str, classname: str, count: int, p_train: float, p_val: float) -> tuple[int, int]:
    n_train, n_val = round(count * p_train), round(count * p_val)
    if min(n_train, n_val, count - n_train - n_val) <= 0:
        raise ConfigError(f"dataset {dataset}: class {classname!r} has {count} image(s), too few for a "
                          f"{p_train:.0%}/{p_val:.0%}/rest split (CoOp requires each part non-empty)")
    return n_train, n_val


def split_by_class(dataset: str, per_class: list[tuple[str, list[str]]], rng: random.Random
                   ) -> dict[str, list[Row]]:
    """CoOp's read_and_split_data on [(class name, image paths)] in label order: shuffle, 50 / 20 / rest."""
    splits: dict[str, list[Row]] = {"train": [], "val": [], "test": []}
    for label, (classname, images) in enumerate(per_class):
        images = sorted(images)
        rng.shuffle(images)
        n_train, n_val = _cut(dataset, classname, len(images), P_TRAIN, P_VAL)
        for name, part in (("train", images[:n_train]), ("val", images[n_train:n_train + n_val]),
                           ("test", images[n_train + n_val:])):
            splits[name] += [(path, label, classname) for path in part]
    return splits


def split_trainval(dataset: str, trainval: list[Row], test: list[Row], rng: random.Random) -> dict[str, list[Row]]:
    """CoOp's split_trainval: per label (in order of first appearance), a shuffled round(20 %) becomes val."""
    by_label: dict[int, list[int]] = {}
    for index, (_, label, _) in enumerate(trainval):
        by_label.setdefault(label, []).append(index)
    train, val = [], []
    for label, indices in by_label.items():
        n_val = round(len(indices) * P_VAL_OF_TRAINVAL)
        if n_val <= 0:
            raise ConfigError(f"dataset {dataset}: class {trainval[indices[0]][2]!r} has {len(indices)} trainval "
                              f"image(s), too few to hold out 20 % for validation")
        rng.shuffle(indices)  # list order comes from the official list file: the same on every machine
        val += [trainval[i] for i in indices[:n_val]]
        train += [trainval[i] for i in indices[n_val:]]
    return {"train": train, "val": val, "test": test}


def _folder_classes(image_dir: Path, ignored: tuple[str, ...] = (), renames: dict[str, str] | None = None
                    ) -> list[tuple[str, list[str]]]:
    classes = sorted(p.name for p in image_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [((renames or {}).get(c, c), [f"{c}/{f.name}" for f in (image_dir / c).iterdir()
                                        if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")])
            for c in classes if c not in ignored]


def _folder(ignored: tuple[str, ...] = (), renames: dict[str, str] | None = None) -> Callable[..., Any]:
    def generate(dataset: str, directory: Path, image_dir: Path, rng: random.Random) -> dict[str, list[Row]]:
        _require(image_dir, dataset, "the image folder, one sub-folder per class")
        return split_by_class(dataset, _folder_classes(image_dir, ignored, renames), rng)
    return generate


def _pets(dataset: str, directory: Path, image_dir: Path, rng: random.Random) -> dict[str, list[Row]]:
    def read(name: str) -> list[Row]:
        rows = []
        for line in _require(directory / "annotations" / name, dataset, "from annotations.tar.gz").read_text(
                ).splitlines():
            if line.strip() and not line.startswith("#"):
                image, label = line.split()[:2]
                rows.append((f"{image}.jpg", int(label) - 1, "_".join(image.split("_")[:-1]).lower()))
        return rows
    return split_trainval(dataset, read("trainval.txt"), read("test.txt"), rng)


def _flowers(dataset: str, directory: Path, image_dir: Path, rng: random.Random) -> dict[str, list[Row]]:
    from scipy.io import loadmat  # a MATLAB file: numbers only, nothing is executed

    labels = loadmat(_require(directory / "imagelabels.mat", dataset, "from the Flowers-102 page"))["labels"][0]
    names = json.loads(_require(directory / "cat_to_name.json", dataset, "CoOp's class names").read_text())
    by_label: dict[int, list[str]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(f"image_{index + 1:05d}.jpg")
    ordered = list(by_label)  # CoOp walks the labels in order of first appearance, shuffling each in turn
    splits = split_by_class(dataset, [(names[str(label)], by_label[label]) for label in ordered], rng)
    return {k: [(p, ordered[y] - 1, c) for p, y, c in rows] for k, rows in splits.items()}


def _sun397(dataset: str, directory: Path, image_dir: Path, rng: random.Random) -> dict[str, list[Row]]:
    classes = [line.strip()[1:] for line in _require(directory / "ClassName.txt", dataset, "SUN397's class list")
               .read_text().splitlines() if line.strip()]
    lookup = {c: i for i, c in enumerate(classes)}

    def read(name: str) -> list[Row]:
        rows = []
        for line in _require(directory / name, dataset, "SUN397's partition file").read_text().splitlines():
            if line.strip():
                image = line.strip()[1:]
                folder = image.rsplit("/", 1)[0]
                rows.append((image, lookup[folder], " ".join(folder.split("/")[1:][::-1])))
        return rows
    return split_trainval(dataset, read("Training_01.txt"), read("Testing_01.txt"), rng)


def _ucf101(dataset: str, directory: Path, image_dir: Path, rng: random.Random) -> dict[str, list[Row]]:
    lists = directory / "ucfTrainTestlist"
    lookup = {}
    for line in _require(lists / "classInd.txt", dataset, "UCF101's class index").read_text().splitlines():
        if line.strip():
            label, action = line.split()
            lookup[action] = int(label) - 1

    def read(name: str) -> list[Row]:
        rows = []
        for line in _require(lists / name, dataset, "UCF101's split list").read_text().splitlines():
            if line.strip():
                action, video = line.split()[0].split("/")
                renamed = "_".join(re.findall("[A-Z][^A-Z]*", action))
                rows.append((f"{renamed}/{video.replace('.avi', '.jpg')}", lookup[action], renamed))
        return rows
    return split_trainval(dataset, read("trainlist01.txt"), read("testlist01.txt"), rng)


def _cars(dataset: str, directory: Path, image_dir: Path, rng: random.Random) -> dict[str, list[Row]]:
    from scipy.io import loadmat

    meta = loadmat(_require(directory / "devkit" / "cars_meta.mat", dataset, "the devkit"))["class_names"][0]

    def read(folder: str, annotations: Path) -> list[Row]:
        rows = []
        for entry in loadmat(_require(annotations, dataset, "the annotations"))["annotations"][0]:
            label = int(entry["class"][0, 0]) - 1
            words = str(meta[label][0]).split(" ")
            rows.append((f"{folder}/{entry['fname'][0]}", label, " ".join([words[-1], *words[:-1]])))
        return rows
    return split_trainval(dataset, read("cars_train", directory / "devkit" / "cars_train_annos.mat"),
                          read("cars_test", directory / "cars_test_annos_withlabels.mat"), rng)


GENERATORS: dict[str, tuple[Callable[..., dict[str, list[Row]]], str]] = {
    "caltech101": (_folder(CALTECH_IGNORED, CALTECH_NAMES), "read_and_split_data 50/20/30 per class"),
    "dtd": (_folder(), "read_and_split_data 50/20/30 per class"),
    "eurosat": (_folder(renames=EUROSAT_NAMES), "read_and_split_data 50/20/30 per class"),
    "food101": (_folder(), "read_and_split_data 50/20/30 per class"),
    "oxford_pets": (_pets, "official trainval/test lists, split_trainval 20 % val per class"),
    "oxford_flowers": (_flowers, "imagelabels.mat, 50/20/30 per class"),
    "sun397": (_sun397, "Training_01/Testing_01, split_trainval 20 % val per class"),
    "ucf101": (_ucf101, "trainlist01/testlist01, split_trainval 20 % val per class"),
    "stanford_cars": (_cars, "devkit train/test annotations, split_trainval 20 % val per class"),
}


def generate_split(dataset: str, directory: Path, image_dir: Path, split_file: Path,
                   split_seed: int = DEFAULT_SPLIT_SEED, overwrite: bool = False) -> tuple[Path, str]:
    """Write `split_file` (CoOp's format plus a `generated` block); returns (path, SHA-256 of the file)."""
    if dataset not in GENERATORS:
        raise ConfigError(f"dataset {dataset} needs no generated split file (choose one of {sorted(GENERATORS)})")
    if split_file.exists() and not overwrite:
        raise ConfigError(f"dataset {dataset}: {split_file} exists; it is used as it is (delete it to generate "
                          f"another)")
    generate, procedure = GENERATORS[dataset]
    splits = generate(dataset, directory, image_dir, random.Random(split_seed))
    payload = {**{k: [list(r) for r in rows] for k, rows in splits.items()},
               "generated": {"by": "flbench.prepare", "procedure": f"CoOp {procedure}", "split_seed": split_seed,
                             "version": PROCEDURE_VERSION, "official": False}}
    text = json.dumps(payload)
    path = atomic_write(split_file, lambda f: f.write(text), mode="w")
    path.chmod(0o644)
    return path, hashlib.sha256(text.encode()).hexdigest()


def split_provenance(split_file: Path, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a record says about the split it ran on: file, SHA-256, and whether flbench generated it."""
    data = split_file.read_bytes()
    generated = (payload if payload is not None else json.loads(data)).get("generated")
    return {"file": split_file.name, "sha256": hashlib.sha256(data).hexdigest(),
            "generated": generated if isinstance(generated, dict) else None}
