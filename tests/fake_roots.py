"""Fabricated data roots in the real on-disk layouts (CoOp, ImageNet and its variants, DomainNet, CIFAR).

Each image is a tiny non-square JPEG filled with its class's colour (and a domain's brightness), so a test can check
that a loaded image really is the file its label says, through the same loaders a user's real data goes through.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from flbench.datasets.coop import SPECS

IMAGE_SIZE = (20, 14)  # width, height: non-square, so resize + center crop is exercised
SPLIT_SIZES = {"train": 5, "val": 2, "test": 3}  # images per class


def class_colour(label: int, domain: int = 0) -> tuple[int, int, int]:
    """Well-separated colours: one primary-ish colour per class, darker for later domains."""
    palette = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (230, 30, 230), (30, 230, 230),
               (240, 140, 20), (120, 60, 200)]
    r, g, b = palette[label % len(palette)]
    scale = 1.0 - 0.3 * domain
    return int(r * scale), int(g * scale), int(b * scale)


def write_image(path: Path, label: int, domain: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", IMAGE_SIZE, class_colour(label, domain)).save(path, quality=95)


def raw_classnames(dataset: str, num_classes: int) -> list[str]:
    return [f"{dataset}_class_{c}" for c in range(num_classes)]


def make_coop_root(base: Path, dataset: str, num_classes: int = 3, sizes: dict[str, int] | None = None) -> Path:
    """`base/<CoOp folder>/` with images and CoOp's split file (or FGVCAircraft's variant files). Returns `base`.

    Caltech101's file also lists CoOp's two dropped classes (BACKGROUND_Google, Faces_easy) as labels 0 and 1, so
    the loader must drop them and relabel.
    """
    spec, sizes = SPECS[dataset], sizes or SPLIT_SIZES
    directory = base / spec.directory
    image_dir = directory / spec.images if spec.images else directory / "cars_data"
    names = raw_classnames(dataset, num_classes)
    if dataset == "caltech101":
        names = ["BACKGROUND_Google", "Faces_easy"] + names
    if dataset == "fgvc_aircraft":
        names = [f"A{c}-{c}00" if c % 2 else f"Boeing 7{c}7" for c in range(num_classes)]  # spaces occur in variants
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    splits: dict[str, list] = {}
    for split, per_class in sizes.items():
        rows = []
        for label, name in enumerate(names):
            for i in range(per_class):
                rel = f"{name.replace(' ', '_')}/{split}_{i}.jpg"
                if dataset == "fgvc_aircraft":
                    rel = f"{label:03d}{split[:2]}{i}.jpg"
                # colours follow the label the loader must give (Caltech101: after dropping two classes)
                write_image(image_dir / rel, label - 2 if dataset == "caltech101" else label)
                rows.append([rel if spec.images else f"cars_data/{rel}", label, name])
        splits[split] = rows
    if dataset == "fgvc_aircraft":
        for split, rows in splits.items():
            (directory / f"images_variant_{split}.txt").write_text(
                "".join(f"{rel[:-4]} {name}\n" for rel, _, name in rows))
    else:
        (directory / spec.split_file).write_text(json.dumps(splits))
    return base


def wnids(num_classes: int) -> list[str]:
    return [f"n{1000000 + 37 * c:08d}" for c in range(num_classes)]


def make_imagenet_root(base: Path, num_classes: int = 5, train: int = 6, val: int = 2) -> Path:
    directory = base / "imagenet"
    directory.mkdir(parents=True, exist_ok=True)
    ids = wnids(num_classes)
    (directory / "classnames.txt").write_text("".join(f"{w} imagenet class {c}\n" for c, w in enumerate(ids)))
    for label, wnid in enumerate(ids):
        for i in range(train):
            write_image(directory / "images" / "train" / wnid / f"{wnid}_{i}.JPEG", label)
        for i in range(val):
            write_image(directory / "images" / "val" / wnid / f"ILSVRC2012_val_{label}{i}.JPEG", label)
    return base


def make_variant_root(base: Path, variant: str, num_classes: int = 5, subset: list[int] | None = None,
                      per_class: int = 2) -> Path:
    """An ImageNet variant folder; `subset` = the ImageNet labels present (A/R), default all. Copies no
    classnames.txt (the loader falls back to imagenet/classnames.txt) except for -Sketch, as DATASETS.md does."""
    from flbench.datasets.imagenet import VARIANTS

    spec = VARIANTS[variant]
    ids = wnids(num_classes)
    labels = list(range(num_classes)) if subset is None else subset
    image_dir = base / spec.directory / spec.images
    for label in labels:
        folder = str(label) if spec.folders == "index" else ids[label]
        for i in range(per_class):
            write_image(image_dir / folder / f"{variant}_{i}.jpg", label, domain=1)
    if spec.folders == "wnid":
        (image_dir / "README.txt").write_text("not a class folder\n")
    if variant == "imagenet_sketch":
        (base / spec.directory / "classnames.txt").write_text(
            "".join(f"{w} imagenet class {c}\n" for c, w in enumerate(ids)))
    return base


def make_domainnet_root(base: Path, domains: tuple[str, ...] = ("clipart", "real", "sketch"), num_classes: int = 3,
                        train: int = 4, test: int = 2, in_splits_folder: bool = True) -> Path:
    directory = base / "domainnet"
    lists = directory / "splits" if in_splits_folder else directory
    lists.mkdir(parents=True, exist_ok=True)
    names = [f"thing_{c}" if c % 2 else f"object{c}" for c in range(num_classes)]
    for d, domain in enumerate(domains):
        for split, per_class in (("train", train), ("test", test)):
            lines = []
            for label, name in enumerate(names):
                for i in range(per_class):
                    rel = f"{domain}/{name}/{domain}_{split}_{label}_{i}.jpg"
                    write_image(directory / rel, label, domain=d)
                    lines.append(f"{rel} {label}\n")
            (lists / f"{domain}_{split}.txt").write_text("".join(lines))
    return base


def make_cifar_root(base: Path, dataset: str = "cifar10", train_per_class: int = 6, test_per_class: int = 2) -> Path:
    """torchvision's pickled CIFAR batches (integrity checksums will not match: tests patch the check)."""
    fine = dataset == "cifar100"
    folder = base / ("cifar-100-python" if fine else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    names = ["apple", "aquarium_fish", "bear"] if fine else ["airplane", "automobile", "bird"]
    key = "fine_labels" if fine else "labels"

    def batch(per_class: int) -> dict:
        labels = [c for c in range(len(names)) for _ in range(per_class)]
        images = np.stack([np.broadcast_to(np.asarray(class_colour(c), np.uint8), (32, 32, 3)) for c in labels])
        return {"data": images.transpose(0, 3, 1, 2).reshape(len(labels), -1), key: labels}

    files = (["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    for name in files:
        per = test_per_class if "test" in name else (train_per_class if fine else max(1, train_per_class // 5))
        with open(folder / name, "wb") as handle:
            pickle.dump(batch(per), handle)
    meta = {"fine_label_names": names} if fine else {"label_names": names}
    with open(folder / ("meta" if fine else "batches.meta"), "wb") as handle:
        pickle.dump(meta, handle)
    return base


def make_raw_coop_root(base: Path, dataset: str, num_classes: int = 3, per_class: int = 10) -> Path:
    """`base/<CoOp folder>/` as the dataset's authors ship it, without CoOp's split file: one folder per class
    (Caltech101 with CoOp's two ignored folders and a class CoOp renames; EuroSAT with its CamelCase names), the
    official trainval/test lists (OxfordPets), or imagelabels.mat + cat_to_name.json (OxfordFlowers)."""
    spec = SPECS[dataset]
    directory = base / spec.directory
    image_dir = directory / spec.images if spec.images else directory
    if dataset == "oxford_pets":
        lines = {"trainval.txt": [], "test.txt": []}
        for label in range(num_classes):
            breed = f"Breed_{'abc'[label % 3]}{label}"
            for i in range(per_class):
                name = f"{breed}_{i + 1}"
                write_image(image_dir / f"{name}.jpg", label)
                lines["test.txt" if i % 3 == 2 else "trainval.txt"].append(f"{name} {label + 1} 1 {i + 1}\n")
        (directory / "annotations").mkdir(parents=True, exist_ok=True)
        for file, rows in lines.items():
            (directory / "annotations" / file).write_text("".join(rows))
        return base
    if dataset == "oxford_flowers":
        from scipy.io import savemat

        labels = [1 + (i % num_classes) for i in range(num_classes * per_class)]  # interleaved, 1-based
        for index, label in enumerate(labels):
            write_image(image_dir / f"image_{index + 1:05d}.jpg", label - 1)
        savemat(directory / "imagelabels.mat", {"labels": np.asarray([labels], dtype=np.uint8)})
        (directory / "cat_to_name.json").write_text(json.dumps({str(c + 1): f"flower {c}" for c in range(num_classes)}))
        return base
    names = {"caltech101": ["BACKGROUND_Google", "Faces_easy", "Faces", "accordion", "airplanes"],
             "eurosat": ["AnnualCrop", "Forest", "SeaLake"]}.get(dataset, [f"{dataset}_class_{c}"
                                                                          for c in range(num_classes)])
    kept = [n for n in names if n not in ("BACKGROUND_Google", "Faces_easy")]
    for name in names:
        label = kept.index(name) if name in kept else 0
        for i in range(per_class):
            write_image(image_dir / name / f"{name.lower()}_{i:03d}.jpg", label)
    (image_dir / ".DS_Store").write_text("not a class")  # hidden entries are never classes
    return base
