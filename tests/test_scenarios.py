"""Scenarios: which splits each one evaluates (on a small hand-made bundle), and end to end on the small synthetic
config, that each produces exactly its named metrics, selected on validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flbench.datasets.base import DatasetBundle, TensorImageSet
from flbench.errors import ConfigError
from flbench.metrics import harmonic_mean
from flbench.run import run
from flbench.scenarios import build_scenario, matched_indices, summarise_clients
from flbench.validation import validate
from helpers import compose_config

CLASSES = [f"class{i}" for i in range(6)]
DOMAINS = ["photo", "sketch", "noisy"]


def _split(per_cell: int) -> TensorImageSet:
    labels = np.repeat(np.arange(6), 3 * per_cell)
    domains = np.tile(np.repeat(np.arange(3), per_cell), 6)
    return TensorImageSet(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels, domains)


@pytest.fixture(scope="module")
def bundle() -> DatasetBundle:
    return DatasetBundle("toy", CLASSES, DOMAINS, train=_split(4), val=_split(2), test=_split(5))


def test_xdomain_trains_on_sources_and_tests_the_target(bundle):
    data = build_scenario("xdomain", bundle, {"target": "sketch"})
    assert set(data.train.domains) == {0, 2}, "the target domain must never be trained on"
    assert set(data.test["target"].images.domains) == {1}, "target accuracy must be measured on the target domain"
    assert set(data.test["source"].images.domains) == {0, 2} and set(data.val["source"].images.domains) == {0, 2}
    assert data.selection == "val/source" and "target" not in data.val, "the target must not select the round"
    assert data.reported == ["source", "target"]
    two = build_scenario("xdomain", bundle, {"target": ["sketch", "noisy"]})
    assert set(two.train.domains) == {0} and set(two.test["target/noisy"].images.domains) == {2}
    assert build_scenario("xdomain", bundle).test["target"].images.domains.tolist() == [2] * 30  # default: last
    with pytest.raises(ConfigError, match="scenario.target"):
        build_scenario("xdomain", bundle, {"target": "cartoon"})
    with pytest.raises(ConfigError, match="scenario.target"):
        build_scenario("xdomain", bundle, {"target": DOMAINS})


@pytest.mark.parametrize("name,reported,selection", [
    ("global", ["global", "domain/photo", "domain/sketch", "domain/noisy"], "val/global"),
    ("few-shot", ["global", "domain/photo", "domain/sketch", "domain/noisy"], "val/global"),
    ("base2novel", ["base", "novel", "hm"], "val/base"),
    ("personal", ["personal", "personal_mean"], "val/personal"),
    ("dual", ["global", "personal", "personal_mean", "hm"], "val/hm"),
    ("multidomain", ["domain/photo", "domain/sketch", "domain/noisy", "mean"], "val/mean"),
    ("unseen-clients", ["unseen", "unseen_finetuned"], "val/unseen"),
])
def test_each_scenario_names_its_metrics_and_selects_on_validation(bundle, name, reported, selection):
    data = build_scenario(name, bundle)
    assert data.reported == reported and data.selection.startswith("val/")
    assert data.selection == selection
    assert set(data.val) <= set(data.test), "every validation split pairs with a test split of the same name"


def test_derived_metrics_apply_to_validation_and_test(bundle):
    dual = build_scenario("dual", bundle)
    row = dual.complete({"val/global": 40.0, "val/personal": 60.0, "test/global": 30.0, "test/personal": 90.0})
    assert row["val/hm"] == pytest.approx(harmonic_mean(40, 60)) and row["test/hm"] == pytest.approx(45.0)
    multi = build_scenario("multidomain", bundle).complete({"val/domain/photo": 10.0, "val/domain/sketch": 20.0,
                                                            "val/domain/noisy": 60.0})
    assert multi["val/mean"] == pytest.approx(30.0) and "test/mean" not in multi
    b2n = build_scenario("base2novel", bundle).complete({"val/base": 50.0, "test/base": 50.0, "test/novel": 25.0})
    assert "val/hm" not in b2n and b2n["test/hm"] == pytest.approx(harmonic_mean(50, 25))


def test_personal_split_keeps_the_shards_class_and_domain_proportions(bundle):
    shard = np.array([0, 1, 2, 3, 4, 5, 12, 13, 20])  # class 0 photo ×4, class 0 sketch ×2... by construction
    labels, domains = bundle.train.labels[shard], bundle.train.domains[shard]
    idx = matched_indices(labels, domains, bundle.test, np.random.default_rng(0))
    assert len(np.unique(idx)) == len(idx)
    got = {(c, d): n for (c, d), n in zip(*np.unique(np.stack([bundle.test.labels[idx], bundle.test.domains[idx]], 1),
                                                      axis=0, return_counts=True))}
    want = {(c, d): n for (c, d), n in zip(*np.unique(np.stack([labels, domains], 1), axis=0, return_counts=True))}
    assert set(got) == set(want)
    ratio = 5 / max(want.values())  # the fullest cell takes all 5 test images of its (class, domain)
    assert all(got[cell] == max(1, round(n * ratio)) for cell, n in want.items())
    again = matched_indices(labels, domains, bundle.test, np.random.default_rng(0))
    assert np.array_equal(idx, again)


def test_personal_summary_weights_by_samples_and_by_clients():
    rows = [{"client": 1, "val_correct": 1, "val_n": 2, "test_correct": 9, "test_n": 10},
            {"client": 0, "val_correct": 2, "val_n": 2, "test_correct": 1, "test_n": 2}]
    out = summarise_clients(rows, "personal")
    assert out["test/personal"] == pytest.approx(100 * 10 / 12)
    assert out["test/personal_mean"] == pytest.approx(100 * (0.9 + 0.5) / 2)
    assert out["val/personal"] == pytest.approx(75.0) and out["test/personal/client/0"] == pytest.approx(50.0)


def test_validation_names_the_scenario_keys():
    cases = [(["scenario=xdomain", "scenario.target=cartoon"], "scenario.target"),
             (["scenario=multidomain", "partition=dirichlet"], "partition.name"),
             (["scenario=unseen-clients", "scenario.fraction=1.5"], "scenario.fraction"),
             (["scenario=base2novel", "algorithm.class_specific=true"], "algorithm.class_specific"),
             (["protocol=scaffold", "protocol.control_update=sometimes"], "protocol.control_update"),
             (["protocol.failure_prob=1.0"], "protocol.failure_prob"),
             (["protocol.fraction=1.5"], "protocol.fraction"),
             (["partition=pathological", "partition.classes_per_client=0"], "partition.classes_per_client")]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(compose_config(overrides))


# --- end to end on the small synthetic config (one round each) -----------------------------------------------------
def _run(tmp_path, *overrides):
    return run(compose_config(["num_rounds=1", *overrides], results_dir=tmp_path))


def _assert_selected_on_validation(record):
    history, selection = record["history"], record["selection"]
    best = int(np.argmax([row[selection] for row in history]))
    for name, values in record["metrics"].items():
        assert values["best_val_round"] == history[best]["round"]
        assert values["best_val"] == history[best][f"test/{name}"] and values["last"] == history[-1][f"test/{name}"]


@pytest.mark.parametrize("overrides,expected", [
    (["scenario=base2novel"], {"base", "novel", "hm"}),
    (["scenario=dual", "protocol=local"], {"global", "personal", "personal_mean", "hm"}),
    (["scenario=multidomain"], {"domain/photo", "domain/noisy", "mean"}),
    (["scenario=xdataset"], {"source", "target/synthetic-patterns", "target_mean"}),
    (["scenario=unseen-clients", "scenario.fraction=0.25"], {"unseen", "unseen_finetuned"}),
])
def test_scenario_runs_produce_exactly_their_named_metrics(tmp_path, overrides, expected):
    record = _run(tmp_path, *overrides)
    assert set(record["metrics"]) == expected
    _assert_selected_on_validation(record)
    assert set(record["zeroshot"]) >= expected - {"unseen_finetuned"}
    if "scenario=base2novel" in overrides:
        assert record["metrics"]["hm"]["last"] == pytest.approx(
            harmonic_mean(record["metrics"]["base"]["last"], record["metrics"]["novel"]["last"]))
    if "protocol=local" in overrides:  # every client's own model is evaluated, every round, by the client
        last = record["history"][-1]
        assert sum(k.startswith("test/personal/client/") for k in last) == 4
        assert record["costs"]["bytes_per_round"] == 0


def test_xdomain_run_reports_the_target_domain_accuracy(tmp_path):
    """Round 0 is the CoOp prompt at its "a photo of a" initialisation, i.e. zero-shot CLIP: its reported target
    accuracy must be zero-shot accuracy on the held-out domain's test images, computed here independently, and
    not the source domain's (which differs, so a run evaluating the source would fail)."""
    from flbench.engine import evaluate_accuracy
    from flbench.experiment import get_experiment

    cfg = compose_config(["num_rounds=1", "scenario=xdomain", "scenario.target=noisy"], results_dir=tmp_path)
    record = run(cfg)
    experiment = get_experiment(cfg)
    assert set(experiment.scenario.train.domains) == {0}, "only the photo domain may be trained on"
    test = experiment.bundle.test
    zeroshot = experiment.new_method("zeroshot")

    def accuracy_on(domain: int) -> float:
        idx = np.flatnonzero(test.domains == domain)
        return evaluate_accuracy(zeroshot, test.subset(idx), test.labels[idx], 512)

    target, source = accuracy_on(1), accuracy_on(0)
    assert target != source, "the domains must differ for this test to tell them apart"
    assert record["history"][0]["test/target"] == pytest.approx(target)
    assert record["history"][0]["test/source"] == pytest.approx(source)
    assert record["zeroshot"]["target"] == pytest.approx(target)
