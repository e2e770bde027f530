"""Real-data configs end to end: the real_* experiments compose and validate, and a federation runs on a fabricated
CoOp root through the same path as a user's data (images at the backbone's resolution, the few-shot pool shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fake_roots import make_coop_root
from flbench.errors import ConfigError
from flbench.validation import validate
from helpers import TEST_PRETRAIN, compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("real_*.yaml"))


def test_a_dataset_at_another_resolution_than_the_backbone_is_refused_before_any_work():
    vit = ["backbone=vit_b16", "backbone.pretrained=null"]
    with pytest.raises(ConfigError, match=r"dataset\.image_size=32 but the backbone takes 224-px images"):
        validate(compose_config(vit, small=False))  # the synthetic suite's 32 px
    validate(compose_config([*vit, "dataset.image_size=null"], small=False))  # null: the backbone's 224 px


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_real_experiments_compose_and_validate(experiment):
    cfg = compose_config([f"experiment={experiment}", "dataset.root=/data"], small=False)
    validate(cfg)
    assert cfg["backbone"]["arch"] == "ViT-B-16" and cfg["backbone"]["pretrained"] == "openai"
    assert cfg["dataset"]["root"] == "/data" and cfg["dataset"]["shots"] == cfg["shots"] == 16
    assert cfg["results_dir"] == f"results/{experiment}"
    if experiment == "real_imagenet_xdomain":
        targets = cfg["scenario"]["targets"]
        assert [t["name"] for t in targets] == ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
        assert all(t["root"] == "/data" for t in targets)


def test_federated_coop_runs_on_a_fabricated_coop_root(tmp_path):
    from flbench.experiment import get_experiment
    from flbench.run import run

    root = make_coop_root(tmp_path / "data", "oxford_pets", sizes={"train": 5, "val": 2, "test": 3})
    cfg = compose_config(["dataset=oxford_pets", f"dataset.root={root}", "dataset.num_classes=3", "shots=4",
                          "num_clients=2", "num_rounds=1", "partition=dirichlet", "partition.min_samples=1",
                          "logger.mode=disabled", f"+backbone.pretrain={TEST_PRETRAIN}", "eval.batch_size=64"],
                         results_dir=tmp_path / "results", small=False)
    record = run(cfg)
    experiment = get_experiment(cfg)
    assert experiment.bundle.test.image_size == experiment.backbone.image_size == 32
    assert sorted(np.concatenate(experiment.shards).tolist()) == list(range(12))  # the whole cached 4-shot pool
    assert (root / "oxford_pets" / "split_fewshot" / "shot_4-seed_0.json").is_file()
    assert 0.0 <= record["metrics"]["global"]["best_val"] <= 100.0 and 0.0 <= record["zeroshot"]["global"] <= 100.0
