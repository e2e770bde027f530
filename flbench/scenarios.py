"""Scenarios: which data trains, which data evaluates, under which class names, and what gets reported.

A scenario turns a `DatasetBundle` into a `ScenarioData`. Evaluation splits come in pairs — validation (used only to
select the reported round) and test (reported) — under the same metric names, so no number is ever test-selected.
Three kinds of evaluation exist:

- server-side splits (`val`/`test`): the aggregated model on shared test data (global, base/novel, domains, …);
- personal (`personal=True`): each client's own model — the shared state plus its local state, which only the
  client holds — on a personal split drawn to match its training shard's (class, domain) distribution; the
  clients evaluate themselves (ClientApp `@app.evaluate()`), over all clients, every round;
- held-out clients (`unseen_fraction > 0`): clients that never train, evaluated by the server with the global
  model before and after a local fine-tuning on their own shard.

The meaning of every scenario and metric is in docs/scenarios.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flbench.datasets.base import DatasetBundle, ImageSet
from flbench.errors import ConfigError
from flbench.registry import Registry
from flbench.metrics import harmonic_mean

PREFIXES = ("val/", "test/")


@dataclass
class EvalSplit:
    """Images evaluated under `classnames`; `labels` index into `classnames`."""

    images: ImageSet
    classnames: list[str]
    labels: np.ndarray


def _no_derived(metrics: Mapping[str, float]) -> dict[str, float]:
    return {}


@dataclass
class ScenarioData:
    name: str
    train: ImageSet  # the pool that partitions split over clients
    train_classnames: list[str]
    val: dict[str, EvalSplit]  # metric name → validation split (selection only)
    test: dict[str, EvalSplit]  # metric name → test split (reported)
    selection: str  # the validation metric that picks the reported round
    # Metrics computed from others (HM, means), applied to the val and the test metrics alike; returns only what
    # its inputs allow (val has no novel split, for instance).
    derived: Callable[[Mapping[str, float]], dict[str, float]] = field(default=_no_derived)
    personal: bool = False  # clients evaluate their own model on their personal splits
    unseen_fraction: float = 0.0  # share of clients held out of training (unseen-clients)
    finetune_epochs: int | None = None  # held-out clients' local fine-tuning (None: train.epochs)
    personal_pools: tuple[ImageSet, ImageSet] | None = None  # (val, test) images personal splits are drawn from

    @property
    def client_metrics(self) -> list[str]:
        return ["personal", "personal_mean"] if self.personal else []

    @property
    def heldout_metrics(self) -> list[str]:
        return ["unseen", "unseen_finetuned"] if self.unseen_fraction > 0 else []

    @property
    def reported(self) -> list[str]:
        names = list(self.test) + self.client_metrics + self.heldout_metrics
        return names + [k for k in self.derived({k: 0.0 for k in names}) if k not in names]

    def complete(self, row: Mapping[str, float]) -> dict[str, float]:
        """`row` plus the derived metrics of its val and test parts."""
        out = dict(row)
        for prefix in PREFIXES:
            part = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
            out.update({f"{prefix}{k}": v for k, v in self.derived(part).items()})
        return out


SCENARIOS: Registry[Callable[..., ScenarioData]] = Registry("scenarios", "scenario.name")
register = SCENARIOS.register


# --- building blocks ---------------------------------------------------------------------------------------------
def whole(images: ImageSet, classnames: list[str]) -> EvalSplit:
    return EvalSplit(images, classnames, images.labels)


def class_subset(images: ImageSet, classnames: list[str], keep: list[int]) -> EvalSplit:
    """The images of classes `keep`, relabelled 0..len(keep)-1 and named accordingly."""
    lookup = np.full(len(classnames), -1)
    lookup[keep] = np.arange(len(keep))
    idx = np.flatnonzero(np.isin(images.labels, keep))
    subset = images.subset(idx)
    return EvalSplit(subset, [classnames[k] for k in keep], lookup[subset.labels])


def domain_subset(images: ImageSet, classnames: list[str], domain_ids: Sequence[int]) -> EvalSplit:
    return whole(images.subset(np.flatnonzero(np.isin(images.domains, list(domain_ids)))), classnames)


def matched_indices(labels: np.ndarray, domains: np.ndarray, pool: ImageSet, rng: np.random.Generator) -> np.ndarray:
    """Indices into `pool` with the (class, domain) proportions of a client's shard (`labels`, `domains`).

    Every cell (class, domain) of the shard gets round(count·r) pool images, at least one, where r is the largest
    ratio every cell can afford, so proportions are kept as exactly as the pool allows and no image repeats.
    Cells the pool lacks are skipped. Different clients may share test images: each split is a sample of that
    client's own distribution, not a slice of a common one.
    """
    cells, counts = np.unique(np.stack([labels, domains], axis=1), axis=0, return_counts=True)
    members = [np.flatnonzero((pool.labels == c) & (pool.domains == d)) for c, d in cells]
    usable = [(m, n) for m, n in zip(members, counts) if len(m)]
    if not usable:
        return np.zeros(0, np.int64)
    ratio = min(len(m) / n for m, n in usable)
    chosen = [rng.choice(m, size=min(len(m), max(1, int(round(n * ratio)))), replace=False) for m, n in usable]
    return np.sort(np.concatenate(chosen))


def personal_split(shard: ImageSet, pool: ImageSet, classnames: list[str], rng: np.random.Generator) -> EvalSplit:
    return whole(pool.subset(matched_indices(shard.labels, shard.domains, pool, rng)), classnames)


def summarise_clients(per_client: Sequence[Mapping[str, float]], name: str) -> dict[str, float]:
    """Sample-weighted and client-mean accuracy over clients' results ({client, val_correct, val_n, test_correct,
    test_n}), plus each client's test accuracy under test/<name>/client/<id>."""
    out: dict[str, float] = {}
    rows = sorted(per_client, key=lambda r: r["client"])
    for split in ("val", "test"):
        n = np.array([r[f"{split}_n"] for r in rows], dtype=float)
        correct = np.array([r[f"{split}_correct"] for r in rows], dtype=float)
        if n.sum() == 0:
            continue
        out[f"{split}/{name}"] = float(100.0 * correct.sum() / n.sum())
        out[f"{split}/{name}_mean"] = float(np.mean(100.0 * correct[n > 0] / n[n > 0]))
    for r in rows:
        if r["test_n"]:
            out[f"test/{name}/client/{int(r['client'])}"] = float(100.0 * r["test_correct"] / r["test_n"])
    return out


# --- scenarios ---------------------------------------------------------------------------------------------------
def _per_domain(bundle: DatasetBundle, split: ImageSet) -> dict[str, EvalSplit]:
    return {f"domain/{d}": domain_subset(split, bundle.classnames, [i]) for i, d in enumerate(bundle.domain_names)}


@register("global")
def global_(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """The aggregated model on the full test split; per-domain accuracy as well when there are several domains."""
    test = {"global": whole(bundle.test, bundle.classnames)}
    if len(bundle.domain_names) > 1:
        test.update(_per_domain(bundle, bundle.test))
    return ScenarioData("global", bundle.train, bundle.classnames, val={"global": whole(bundle.val, bundle.classnames)},
                        test=test, selection="val/global")


@register("few-shot")
def few_shot(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """Global evaluation, meant to be swept over `shots` (conf/experiment/few-shot.yaml): accuracy per k comes from
    one record per k, each with its shots in the config."""
    data = global_(bundle)
    data.name = "few-shot"
    return data


@register("base2novel")
def base2novel(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """Train on base classes (first ⌈C/2⌉ labels); test base and novel separately, each under its own names."""
    C = bundle.num_classes
    if C < 2:
        raise ConfigError(f"scenario=base2novel needs at least 2 classes (a base and a novel half); dataset "
                          f"{bundle.name} has {C}")
    base, novel = list(range((C + 1) // 2)), list(range((C + 1) // 2, C))
    train_idx = np.flatnonzero(np.isin(bundle.train.labels, base))
    return ScenarioData(
        "base2novel", bundle.train.subset(train_idx), [bundle.classnames[i] for i in base],
        val={"base": class_subset(bundle.val, bundle.classnames, base)},
        test={"base": class_subset(bundle.test, bundle.classnames, base),
              "novel": class_subset(bundle.test, bundle.classnames, novel)},
        selection="val/base",
        derived=lambda m: {"hm": harmonic_mean(m["base"], m["novel"])} if {"base", "novel"} <= m.keys() else {})


@register("personal")
def personal(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """Each client's own model on its personal split; reported sample-weighted and client-mean over all clients."""
    return ScenarioData("personal", bundle.train, bundle.classnames, val={}, test={}, selection="val/personal",
                        personal=True, personal_pools=(bundle.val, bundle.test))


@register("dual")
def dual(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """Global and personal at once, and their harmonic mean (the round is selected on the validation HM)."""
    return ScenarioData(
        "dual", bundle.train, bundle.classnames, val={"global": whole(bundle.val, bundle.classnames)},
        test={"global": whole(bundle.test, bundle.classnames)}, selection="val/hm", personal=True,
        personal_pools=(bundle.val, bundle.test),
        derived=lambda m: ({"hm": harmonic_mean(m["global"], m["personal"])}
                           if {"global", "personal"} <= m.keys() else {}))


def _domain_mean(m: Mapping[str, float]) -> dict[str, float]:
    values = [v for k, v in m.items() if k.startswith("domain/") and "/client/" not in k]
    return {"mean": float(np.mean(values))} if values else {}


@register("multidomain")
def multidomain(bundle: DatasetBundle, **_: Any) -> ScenarioData:
    """Clients hold domains (partition=domain); the aggregate is tested per domain, and on their mean."""
    return ScenarioData("multidomain", bundle.train, bundle.classnames, val=_per_domain(bundle, bundle.val),
                        test=_per_domain(bundle, bundle.test), selection="val/mean", derived=_domain_mean)


def _target_domains(bundle: DatasetBundle, target: Sequence[str] | str | None) -> list[int]:
    targets = [target] if isinstance(target, str) else list(target or bundle.domain_names[-1:])
    unknown = [d for d in targets if d not in bundle.domain_names]
    if unknown:
        raise ConfigError(f"scenario.target={unknown} is not among dataset.domains {bundle.domain_names}")
    if len(set(targets)) >= len(bundle.domain_names):
        raise ConfigError("scenario.target leaves no source domain to train on; hold out fewer domains")
    return [bundle.domain_names.index(d) for d in targets]


@register("xdomain")
def xdomain(bundle: DatasetBundle, target: Sequence[str] | str | None = None, **_: Any) -> ScenarioData:
    """Leave-domain-out: train on the source domains only, test on the held-out target domain(s). The round is
    selected on source validation data, never on the target (training-domain validation, as in DomainBed)."""
    targets = _target_domains(bundle, target)
    sources = [i for i in range(len(bundle.domain_names)) if i not in targets]
    train = bundle.train.subset(np.flatnonzero(np.isin(bundle.train.domains, sources)))
    test = {"source": domain_subset(bundle.test, bundle.classnames, sources),
            "target": domain_subset(bundle.test, bundle.classnames, targets)}
    if len(targets) > 1:
        test.update({f"target/{bundle.domain_names[t]}": domain_subset(bundle.test, bundle.classnames, [t])
                     for t in targets})
    return ScenarioData("xdomain", train, bundle.classnames,
                        val={"source": domain_subset(bundle.val, bundle.classnames, sources)}, test=test,
                        selection="val/source")


def _target_config(source_cfg: Mapping[str, Any], target: Mapping[str, Any], image_size: int | None
                   ) -> dict[str, Any]:
    """A target's dataset config: overrides of the source's (same family loader), or a config of its own when it
    names another loader (its own keys only); images at the source's resolution unless it says otherwise."""
    own = dict(target)
    merged = own if own.get("name", source_cfg.get("name")) != source_cfg.get("name") else {**source_cfg, **own}
    if merged.get("image_size") is None and image_size is not None:
        merged["image_size"] = image_size
    return merged


def evaluated_test(bundle: DatasetBundle) -> EvalSplit:
    """A bundle's test split under the classes it covers: all of them, or `test_classes` (ImageNet-A/-R cover 200
    of ImageNet's 1000, and their logits must be restricted to those)."""
    if bundle.test_classes:
        return class_subset(bundle.test, bundle.classnames, list(bundle.test_classes))
    return whole(bundle.test, bundle.classnames)


@register("xdataset")
def xdataset(bundle: DatasetBundle, targets: Sequence[Mapping[str, Any]] = (), dataset_cfg: Mapping[str, Any] | None = None,
             **_: Any) -> ScenarioData:
    """Train on the configured dataset (source); test zero-shot transfer of the learned prompt to each target
    dataset under its own class names. `targets` are dataset configs, as overrides of the source's
    (e.g. [{family: patterns}]) or, with another `name`, complete ones."""
    from flbench.datasets import load_dataset  # here, not at import: scenarios must not import every family

    if not targets:
        raise ConfigError("scenario.targets is empty; list target datasets as dataset overrides, "
                          "e.g. scenario.targets=[{family: patterns}]")
    image_size = int(bundle.test.load(np.zeros(1, np.int64)).shape[-1]) if len(bundle.test) else None
    test = {"source": whole(bundle.test, bundle.classnames)}
    for target in targets:
        other = load_dataset(_target_config(dict(dataset_cfg or {}), target, image_size))
        key = f"target/{other.name}"
        if key in test or other.name == bundle.name:
            raise ConfigError(f"scenario.targets names {other.name!r} twice or as the source; give distinct datasets")
        test[key] = evaluated_test(other)
    return ScenarioData(
        "xdataset", bundle.train, bundle.classnames, val={"source": whole(bundle.val, bundle.classnames)}, test=test,
        selection="val/source",
        derived=lambda m: ({"target_mean": float(np.mean([v for k, v in m.items() if k.startswith("target/")]))}
                           if any(k.startswith("target/") for k in m) else {}))


@register("unseen-clients")
def unseen_clients(bundle: DatasetBundle, fraction: float = 0.2, finetune_epochs: int | None = None,
                   **_: Any) -> ScenarioData:
    """A fraction of the clients never trains; the global model is tested on their personal splits before and
    after a local fine-tuning on their own shard (selected on those clients' validation splits)."""
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"scenario.fraction={fraction} must be in (0, 1): the share of clients held out")
    return ScenarioData("unseen-clients", bundle.train, bundle.classnames, val={}, test={}, selection="val/unseen",
                        unseen_fraction=float(fraction), finetune_epochs=finetune_epochs,
                        personal_pools=(bundle.val, bundle.test))


def build_scenario(name: str, bundle: DatasetBundle, options: Mapping[str, Any] | None = None,
                   dataset_cfg: Mapping[str, Any] | None = None) -> ScenarioData:
    return SCENARIOS.get(name)(bundle, dataset_cfg=dataset_cfg, **dict(options or {}))
