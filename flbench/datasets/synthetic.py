"""The offline synthetic suite: compositional classes (attribute × object) rendered in several domains.

Two families with different objects and attributes make cross-dataset transfer meaningful; class names are
compositional ("red star", "striped arrow") so a text encoder can name classes it never saw captioned; domains
(photo / sketch / cartoon / noisy) give feature shift for multi- and cross-domain scenarios. The tiny CLIP is
pretrained on a separate split ("pretrain") without the noisy domain and without a held-out quarter of the
attribute×object combinations, so zero-shot accuracy is above chance but far from perfect.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing as mp
import signal
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm.auto import tqdm

from flbench.datasets.base import DatasetBundle, TensorImageSet
from flbench.datasets.render import COLOURS, PATTERNS, RENDER_VERSION, RenderSpec, render_many
from flbench.io import atomic_write, cache_dir
from flbench.errors import ConfigError, DataFileError

log = logging.getLogger(__name__)

DOMAINS = ("photo", "sketch", "cartoon", "noisy")
PRETRAIN_DOMAINS = ("photo", "sketch", "cartoon")
SPLITS = {"train": 1, "val": 2, "test": 3, "pretrain": 4}
DOMAIN_PHRASE = {"photo": "photo", "sketch": "sketch", "cartoon": "cartoon", "noisy": "noisy photo"}


def domain_template(domain: str) -> str:
    """The suite's prompt template for one domain: "a <domain phrase> of a {}."."""
    return f"a {DOMAIN_PHRASE[domain]} of a {{}}."


@dataclass(frozen=True)
class Family:
    """A dataset family: every attribute × object combination is a class."""

    name: str
    index: int
    attributes: tuple[str, ...]
    objects: tuple[str, ...]
    attribute_is_colour: bool

    @cached_property
    def label_order(self) -> np.ndarray:
        """Canonical combination index for each label. A fixed shuffle, so the first half (the base classes of
        base→novel) mixes all attributes and objects instead of being "the first four colours"."""
        return np.random.default_rng(1000 + self.index).permutation(len(self.attributes) * len(self.objects))

    @property
    def num_classes(self) -> int:
        return len(self.attributes) * len(self.objects)

    def combination(self, label: int) -> tuple[int, int]:
        canonical = int(self.label_order[label])
        return canonical // len(self.objects), canonical % len(self.objects)

    def classname(self, label: int) -> str:
        a, o = self.combination(label)
        return f"{self.attributes[a]} {self.objects[o]}"

    @property
    def classnames(self) -> list[str]:
        return [self.classname(label) for label in range(self.num_classes)]

    def held_out_of_pretraining(self, label: int) -> bool:
        """A quarter of the combinations is never captioned in pretraining (compositional generalisation)."""
        a, o = self.combination(label)
        return (a + o) % 4 == 0

    def spec(self, label: int, domain: str, seed: tuple[int, ...], image_size: int) -> RenderSpec:
        a, o = self.combination(label)
        colour = self.attributes[a] if self.attribute_is_colour else None
        pattern = "plain" if self.attribute_is_colour else self.attributes[a]
        return (seed, self.objects[o], colour, pattern, domain, image_size)


FAMILIES: dict[str, Family] = {
    "shapes": Family("shapes", 0, tuple(COLOURS),
                     ("circle", "square", "triangle", "star", "cross", "ring", "heart", "moon"), True),
    "patterns": Family("patterns", 1, PATTERNS,
                       ("arrow", "diamond", "hexagon", "bolt", "chevron", "hourglass", "drop", "tee"), False),
}


def _render_parallel(specs: list[RenderSpec], workers: int, desc: str = "rendering") -> np.ndarray:
    """Render in forked processes (they only touch numpy and PIL, so forking next to torch is safe), with a
    progress bar: at 224 px a suite takes minutes. The bar shows on a terminal only (tqdm's default), so sweep
    workers writing to log files stay quiet."""
    chunk = 64 if specs and specs[0][-1] >= 128 else 512  # spec[-1]: the image size
    chunks = [specs[i:i + chunk] for i in range(0, len(specs), chunk)]
    if not chunks:
        return np.zeros((0, 1, 1, 3), np.uint8)
    bar = tqdm(total=len(specs), desc=desc, unit="img", mininterval=1.0, disable=None)
    parts = []
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(chunks) > 1:
            pool = stack.enter_context(mp.get_context("fork").Pool(workers, initializer=_default_signals))
            rendered = pool.imap(render_many, chunks)
        else:
            pool, rendered = None, map(render_many, chunks)
        for part in rendered:
            parts.append(part)
            bar.update(len(part))
        if pool is not None:  # workers leave on their own; terminate() is left for errors and interrupts
            pool.close()
            pool.join()
    bar.close()
    return np.concatenate(parts)


def _default_signals() -> None:
    """A forked worker inherits the CLI's SIGINT/SIGTERM handlers (cli.stop_on_signals), which raise in the worker:
    on Pool.terminate() that exception ran the worker's exit handlers on locks copied mid-use from the parent, and
    the worker hung (seen: a cold `python -m flbench` waiting forever on it). Workers die on SIGTERM and leave
    Ctrl-C to the parent, which stops the pool."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def render_split(family: Family, domains: tuple[str, ...], split: str, per_class: int, suite_seed: int,
                 image_size: int, labels: list[int] | None = None, workers: int = 2,
                 cache: bool = True) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images [N,3,H,W] uint8, labels, domain indices (into `domains`) for one split, cached on disk.

    Each image's seed is (suite seed, family, domain, split, label, i), so a split is the same whatever else is
    generated and the pretraining split never shares an image with the benchmark splits.
    """
    labels = list(range(family.num_classes)) if labels is None else labels
    key = hashlib.sha1(repr((RENDER_VERSION, family.name, domains, split, per_class, suite_seed, image_size, labels)).encode())
    path = cache_dir() / "synthetic" / f"{family.name}-{split}-{key.hexdigest()[:16]}.npz"
    if cache and path.exists():
        try:  # allow_pickle stays False: an array of objects is refused, never unpickled
            with np.load(path, allow_pickle=False) as stored:
                return torch.from_numpy(stored["images"]), stored["labels"], stored["domains"]
        except (ValueError, OSError, KeyError, EOFError) as error:
            raise DataFileError(f"synthetic image cache {path} is unreadable ({type(error).__name__}: "
                                f"{str(error).splitlines()[0][:100]}); delete it and it is rendered again") from error
    specs, label_list, domain_list = [], [], []
    for d, domain in enumerate(domains):
        for label in labels:
            for i in range(per_class):
                seed = (suite_seed, family.index, DOMAINS.index(domain), SPLITS[split], label, i)
                specs.append(family.spec(label, domain, seed, image_size))
                label_list.append(label)
                domain_list.append(d)
    log.info("rendering %d %s/%s images (first time only; cached in %s)", len(specs), family.name, split,
             path.parent)
    images = np.ascontiguousarray(_render_parallel(specs, workers, f"rendering {family.name}/{split}")
                                  .transpose(0, 3, 1, 2))
    label_arr, domain_arr = np.asarray(label_list, np.int64), np.asarray(domain_list, np.int64)
    if cache:
        atomic_write(path, lambda f: np.savez(f, images=images, labels=label_arr, domains=domain_arr))
    return torch.from_numpy(images), label_arr, domain_arr


def load_synthetic(family: str = "shapes", domains: tuple[str, ...] | list[str] = DOMAINS, image_size: int = 32,
                   train_per_class: int = 16, val_per_class: int = 4, test_per_class: int = 10, seed: int = 0,
                   workers: int = 2, **_: object) -> DatasetBundle:
    """The benchmark dataset of one family over the given rendering domains."""
    if family not in FAMILIES:
        raise ConfigError(f"dataset.family={family!r} is unknown; choose one of {sorted(FAMILIES)}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ConfigError(f"dataset.domains has unknown domains {unknown}; choose from {list(DOMAINS)}")
    fam, domains = FAMILIES[family], tuple(domains)
    splits = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
        images, labels, doms = render_split(fam, domains, split, per_class, seed, image_size, workers=workers)
        splits[split] = TensorImageSet(images, labels, doms)
    templates = [domain_template(d) for d in domains]
    return DatasetBundle(name=f"synthetic-{family}", classnames=fam.classnames, domain_names=list(domains),
                         templates=["a photo of a {}."] + [t for t in templates if t != "a photo of a {}."],
                         **splits)


# Caption templates for pretraining. None is the benchmark's "a photo of a {}.": like web alt-text, the captions a
# CLIP learns from never match the hand-crafted template exactly, which is the gap prompt learning exists to close.
CAPTIONS = {
    "photo": ("a picture of the {}.", "an image showing a {}.", "a shaded {}.", "{}", "the {} in a photograph."),
    "sketch": ("a sketch of a {}.", "a drawing of the {}.", "an outline of a {}.", "a {} sketch.", "{}"),
    "cartoon": ("a cartoon of a {}.", "a flat {}.", "an illustration of a {}.", "a {} cartoon.", "{}"),
}


def pretraining_corpus(num_images: int, suite_seed: int = 0, image_size: int = 32,
                       workers: int = 2) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Images and (class name, domain) pairs for contrastive pretraining: both families, seen combinations only,
    pretraining domains only. Captions are drawn from CAPTIONS at training time."""
    pairs = [(fam, label, domain) for fam in FAMILIES.values() for label in range(fam.num_classes)
             if not fam.held_out_of_pretraining(label) for domain in PRETRAIN_DOMAINS]
    per_pair = max(1, -(-num_images // len(pairs)))
    all_images, meta = [], []
    for fam in FAMILIES.values():
        labels = [label for label in range(fam.num_classes) if not fam.held_out_of_pretraining(label)]
        images, label_arr, dom_arr = render_split(fam, PRETRAIN_DOMAINS, "pretrain", per_pair, suite_seed,
                                                  image_size, labels=labels, workers=workers)
        all_images.append(images)
        meta += [(fam.classname(int(lbl)), PRETRAIN_DOMAINS[int(d)]) for lbl, d in zip(label_arr, dom_arr)]
    return torch.cat(all_images), meta
