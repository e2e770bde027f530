"""`python -m flbench.prepare <dataset> --root DIR`: fetch what a maintained library can fetch, check the rest.

CIFAR-10/100 are downloaded through torchvision (with its progress bar). Every other dataset is checked where it is:
split file present and parseable, class count, images per split, missing files listed. If something is missing the
command prints one error line (stderr) plus the manual steps (stdout) and exits with status 2; a complete root exits
0. The same readers run inside every experiment, so a root this command accepts is a root the benchmark can use.

CoOp's split files (`split_zhou_<Name>.json`) are the usual missing piece: `--generate-split` writes one from the
raw layout by CoOp's own procedure (flbench/datasets/coop_splits.py) beside the data; it is marked as generated, and
every record of a run on it carries its SHA-256 (`data.split`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from flbench.datasets.coop_splits import DEFAULT_SPLIT_SEED, GENERATORS
from flbench.datasets.fewshot import Split
from flbench.datasets.files import RawDataset, missing_files
from flbench.errors import ConfigError

COOP = "linked from github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"

# The manual steps, per dataset (sources as their authors and CoOp's DATASETS.md publish them).
STEPS: dict[str, list[str]] = {
    "caltech101": ["mkdir -p $ROOT/caltech-101",
                   "download 101_ObjectCategories.tar.gz (Caltech 101, data.caltech.edu) and extract it into "
                   "$ROOT/caltech-101/ (giving 101_ObjectCategories/)",
                   f"put split_zhou_Caltech101.json in $ROOT/caltech-101/ ({COOP})"],
    "oxford_pets": ["mkdir -p $ROOT/oxford_pets",
                    "download images.tar.gz and annotations.tar.gz from www.robots.ox.ac.uk/~vgg/data/pets/ and "
                    "extract both into $ROOT/oxford_pets/",
                    f"put split_zhou_OxfordPets.json in $ROOT/oxford_pets/ ({COOP})"],
    "stanford_cars": ["mkdir -p $ROOT/stanford_cars",
                      "obtain Stanford Cars (cars_train/, cars_test/, devkit/, cars_test_annos_withlabels.mat; the "
                      "original site is offline, CoOp's DATASETS.md names a mirror) into $ROOT/stanford_cars/",
                      f"put split_zhou_StanfordCars.json in $ROOT/stanford_cars/ ({COOP})"],
    "oxford_flowers": ["mkdir -p $ROOT/oxford_flowers",
                       "download 102flowers.tgz and imagelabels.mat from www.robots.ox.ac.uk/~vgg/data/flowers/102/; "
                       "extract the images into $ROOT/oxford_flowers/ (giving jpg/)",
                       f"put cat_to_name.json and split_zhou_OxfordFlowers.json in $ROOT/oxford_flowers/ ({COOP})"],
    "food101": ["download food-101.tar.gz (data.vision.ee.ethz.ch/cvl/food-101.tar.gz) and extract it into $ROOT/ "
                "(giving $ROOT/food-101/images/)",
                f"put split_zhou_Food101.json in $ROOT/food-101/ ({COOP})"],
    "fgvc_aircraft": ["download fgvc-aircraft-2013b.tar.gz (www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/) and "
                      "extract it",
                      "move the contents of fgvc-aircraft-2013b/data/ to $ROOT/fgvc_aircraft/ (images/, variants.txt, "
                      "images_variant_{train,val,test}.txt); no split_zhou file is needed"],
    "sun397": ["mkdir -p $ROOT/sun397",
               "download SUN397.tar.gz (vision.princeton.edu/projects/2010/SUN/) and extract it into $ROOT/sun397/ "
               "(giving SUN397/)",
               f"put split_zhou_SUN397.json in $ROOT/sun397/ ({COOP})"],
    "dtd": ["download dtd-r1.0.1.tar.gz (www.robots.ox.ac.uk/~vgg/data/dtd/) and extract it into $ROOT/ (giving "
            "$ROOT/dtd/images/)",
            f"put split_zhou_DescribableTextures.json in $ROOT/dtd/ ({COOP})"],
    "eurosat": ["mkdir -p $ROOT/eurosat",
                "download EuroSAT.zip (the RGB version, github.com/phelber/EuroSAT) and extract it into "
                "$ROOT/eurosat/ (giving 2750/)",
                f"put split_zhou_EuroSAT.json in $ROOT/eurosat/ ({COOP})"],
    "ucf101": ["mkdir -p $ROOT/ucf101",
               "download UCF-101-midframes.zip (the middle frame of every UCF101 video, linked from CoOp's "
               "DATASETS.md) and extract it into $ROOT/ucf101/ (giving UCF-101-midframes/)",
               f"put split_zhou_UCF101.json in $ROOT/ucf101/ ({COOP})"],
    "imagenet": ["mkdir -p $ROOT/imagenet/images",
                 "download ILSVRC2012 train and val from image-net.org (account needed); extract (or symlink) them as "
                 "$ROOT/imagenet/images/train/<wnid>/ and $ROOT/imagenet/images/val/<wnid>/ (val images sorted "
                 "into class folders)",
                 f"put classnames.txt in $ROOT/imagenet/ ({COOP})"],
    "imagenet_v2": ["download imagenetv2-matched-frequency.tar.gz (the ImageNetV2 release, e.g. on the Hugging Face "
                    "hub) and extract it into $ROOT/imagenetv2/ (giving imagenetv2-matched-frequency-format-val/)",
                    "copy $ROOT/imagenet/classnames.txt to $ROOT/imagenetv2/ (optional: it is found there too)"],
    "imagenet_sketch": ["download ImageNet-Sketch (github.com/HaohanWang/ImageNet-Sketch) and extract it into "
                        "$ROOT/imagenet-sketch/ (giving images/<wnid>/)",
                        "copy $ROOT/imagenet/classnames.txt to $ROOT/imagenet-sketch/ (optional)"],
    "imagenet_a": ["mkdir -p $ROOT/imagenet-adversarial",
                   "download imagenet-a.tar (github.com/hendrycks/natural-adv-examples) and extract it into "
                   "$ROOT/imagenet-adversarial/ (giving imagenet-a/<wnid>/)",
                   "copy $ROOT/imagenet/classnames.txt to $ROOT/imagenet-adversarial/ (optional)"],
    "imagenet_r": ["mkdir -p $ROOT/imagenet-rendition",
                   "download imagenet-r.tar (github.com/hendrycks/imagenet-r) and extract it into "
                   "$ROOT/imagenet-rendition/ (giving imagenet-r/<wnid>/)",
                   "copy $ROOT/imagenet/classnames.txt to $ROOT/imagenet-rendition/ (optional)"],
    "domainnet": ["mkdir -p $ROOT/domainnet/splits",
                  "download the six domain archives (clipart, infograph, painting, quickdraw, real, sketch) from "
                  "ai.bu.edu/M3SDA/ and extract each into $ROOT/domainnet/ (giving domainnet/<domain>/<class>/)",
                  "download the official lists <domain>_train.txt and <domain>_test.txt from the same page into "
                  "$ROOT/domainnet/splits/"],
    "cifar10": ["python -m flbench.prepare cifar10 --root $ROOT --download   (torchvision, 163 MB)"],
    "cifar100": ["python -m flbench.prepare cifar100 --root $ROOT --download   (torchvision, 161 MB)"],
}


def read_raw(dataset: str, root: str, num_classes: int | None) -> tuple[RawDataset, bool]:
    """(what is on disk, whether its lists come from listing folders — then no file can be missing)."""
    from flbench.datasets import coop, domainnet, imagenet

    if dataset in coop.SPECS:
        return coop.read_coop(dataset, root, num_classes), False
    if dataset == "imagenet":
        return imagenet.read_imagenet(root, num_classes), True
    if dataset in imagenet.VARIANTS:
        return imagenet.read_variant(dataset, root), True
    if dataset == "domainnet":
        return domainnet.read_domainnet(root, domainnet.DOMAINS, num_classes), False
    raise ConfigError(f"{dataset!r} is not a real dataset flbench.prepare knows; choose one of {sorted(STEPS)}")


def check(dataset: str, root: str, num_classes: int | None = None, show: int = 10) -> bool:
    """Print classes, images per split and missing files; True when the root is complete."""
    if dataset in ("cifar10", "cifar100"):
        from flbench.datasets.cifar import read_cifar

        classnames, sets = read_cifar(dataset, root)
        print(f"{dataset}: {len(classnames)} classes; train {len(sets['train'])}, test {len(sets['test'])} images; "
              f"complete (torchvision checked the files)")
        return True
    if dataset == "imagenet":
        print("listing ImageNet's training folders (1.28 M files; may take a minute) ...", flush=True)
    raw, listed = read_raw(dataset, root, num_classes)
    train, val = raw.full_train()
    splits: dict[str, Split | None] = {"train": train, "val": val, "test": raw.test}
    complete = True
    print(f"{dataset}: {len(raw.classnames)} classes in {raw.dataset_dir}")
    split = raw.provenance.get("split")
    if split:
        origin = (f"GENERATED by {split['generated']['by']} (split seed {split['generated']['split_seed']}), not "
                  "CoOp's published split" if split["generated"] else "as supplied")
        print(f"  split file {split['file']}: {origin}; sha256 {split['sha256'][:16]}…")
    for name, split in splits.items():
        if split is None:
            print(f"  {name:5s}  (none on disk: carved from unused training images at run time)")
            continue
        paths = [str(raw.image_dir / p) for p in split.paths]
        missing = [] if listed else missing_files(paths)
        complete &= not missing
        per_domain = ""
        if len(raw.domain_names) > 1:
            per_domain = " (" + ", ".join(f"{d} {int((split.domains == i).sum())}"
                                          for i, d in enumerate(raw.domain_names)) + ")"
        print(f"  {name:5s}  {len(split):8d} images{per_domain}" + (f", {len(missing)} MISSING" if missing else ""))
        for path in missing[:show]:
            print(f"           missing: {os.path.relpath(path, raw.dataset_dir)}")
        if len(missing) > show:
            print(f"           ... and {len(missing) - show} more")
    fewshot = sorted((raw.dataset_dir / "split_fewshot").glob("*.json")) if (raw.dataset_dir /
                                                                              "split_fewshot").is_dir() else []
    if fewshot:
        print(f"  few-shot subsets cached: {', '.join(p.stem for p in fewshot)}")
    print("complete" if complete else "INCOMPLETE: the files listed above are missing")
    return complete


def print_steps(dataset: str, root: str) -> None:
    print(f"How to obtain {dataset} (ROOT={root}):")
    for number, step in enumerate(STEPS.get(dataset, []), 1):
        print(f"  {number}. {step.replace('$ROOT', root)}")
    if dataset in GENERATORS:
        print(f"  no split file (its link is dead)? generate one from the images by CoOp's procedure: "
              f"python -m flbench.prepare {dataset} --root {root} --generate-split")
    print(f"then check again: python -m flbench.prepare {dataset} --root {root}")


def generate(dataset: str, root: str, split_seed: int) -> None:
    """Write the dataset's missing CoOp split file beside its images (an existing file is kept as it is)."""
    from flbench.datasets.coop import SPECS
    from flbench.datasets.coop_splits import generate_split
    from flbench.datasets.files import check_root

    if dataset not in GENERATORS:
        raise ConfigError(f"--generate-split: {dataset} has no CoOp split file to generate; choose one of "
                          f"{sorted(GENERATORS)}")
    spec = SPECS[dataset]
    _, directory = check_root(dataset, root, spec.directory, spec.split_file)
    split_file = directory / spec.split_file
    if split_file.exists():
        print(f"{split_file} exists: it is used as it is (delete it to generate another)")
        return
    path, sha256 = generate_split(dataset, directory, directory / spec.images if spec.images else directory,
                                  split_file, split_seed)
    print(f"generated {path} by CoOp's procedure ({GENERATORS[dataset][1]}, split seed {split_seed}); sha256 "
          f"{sha256[:16]}…; not CoOp's published split: every record of a run on it says so")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flbench.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", help="dataset name as in conf/dataset/ (e.g. caltech101)")
    parser.add_argument("--root", default=os.environ.get("FLBENCH_DATA"),
                        help="folder holding the dataset folders (CoOp's $DATA); default $FLBENCH_DATA")
    parser.add_argument("--download", action="store_true", help="download where torchvision can (CIFAR-10/100)")
    parser.add_argument("--generate-split", action="store_true",
                        help="write a missing split_zhou_*.json from the images by CoOp's procedure")
    parser.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED,
                        help=f"seed of --generate-split's shuffles (default {DEFAULT_SPLIT_SEED})")
    parser.add_argument("--num-classes", type=int, default=None, help="expected class count (default: the real one)")
    parser.add_argument("--steps", action="store_true", help="only print the manual steps")
    parser.add_argument("--list", action="store_true", help="list the datasets this command knows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.list or not args.dataset:
        print("datasets: " + ", ".join(sorted(STEPS)))
        return 0 if args.list else 2
    if args.dataset not in STEPS:
        print(f"flbench.prepare: error: unknown dataset {args.dataset!r}; choose one of {sorted(STEPS)}",
              file=sys.stderr)
        return 2
    root = str(Path(args.root).expanduser()) if args.root else None
    if args.steps or root is None:
        if root is None:
            print("flbench.prepare: error: --root is not set (nor FLBENCH_DATA)", file=sys.stderr)
        print_steps(args.dataset, root or "DIR")
        return 0 if args.steps else 2
    try:
        if args.download:
            if args.dataset in ("cifar10", "cifar100"):
                from flbench.datasets.cifar import download_cifar

                download_cifar(args.dataset, root)
            else:
                print(f"{args.dataset} cannot be downloaded automatically (licence terms or no maintained "
                      f"downloader); checking what is there")
        if args.generate_split:
            generate(args.dataset, root, args.split_seed)
        complete = check(args.dataset, root, args.num_classes)
    except ConfigError as error:
        print(f"flbench.prepare: error: {error}", file=sys.stderr)
        print_steps(args.dataset, root)
        return 2
    if not complete:
        print_steps(args.dataset, root)
    return 0 if complete else 2


if __name__ == "__main__":
    sys.exit(main())
