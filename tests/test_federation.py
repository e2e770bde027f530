"""End-to-end runs on the small synthetic config: both backends, the record, skip/force, FedAvg arithmetic."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flbench.results.record import load_record
from flbench.run import run
from helpers import compose_config


def test_fedavg_aggregate_is_the_example_weighted_mean():
    """Flower's FedAvg aggregation (what protocol=fedavg uses) gives Σ n_i w_i / Σ n_i."""
    states = [{"ctx": torch.full((2, 3), float(v))} for v in (1.0, 4.0, 10.0)]
    counts = [10, 30, 60]
    expected = (10 * 1.0 + 30 * 4.0 + 60 * 10.0) / 100
    replies = [RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
               for s, n in zip(states, counts)]
    flower = aggregate_arrayrecords(replies, "num-examples").to_torch_state_dict()["ctx"]
    assert torch.allclose(flower, torch.full((2, 3), expected))


def _metrics_only(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


@pytest.fixture(scope="module")
def inprocess_record(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    return run(compose_config(["logger.mode=offline"], results_dir=results)), results


def test_record_has_config_seed_rounds_and_named_metrics(inprocess_record):
    record, results = inprocess_record
    stored = load_record(results / "records" / f"{record['config_hash']}.json")
    assert stored is not None and stored["complete"] is True
    assert stored["config"]["algorithm"]["name"] == "coop" and stored["seed"] == 0
    assert stored["backbone"]["name"] == "tiny" and len(stored["backbone"]["weights_sha1"]) == 12
    assert stored["backbone"]["build_sha1"] == stored["backbone"]["weights_sha1"]  # dense: as built
    assert [row["round"] for row in stored["history"]] == [0, 1, 2]
    assert set(stored["metrics"]) == {"global", "domain/photo", "domain/noisy"}
    best_round = stored["metrics"]["global"]["best_val_round"]
    vals = [row["val/global"] for row in stored["history"]]
    assert best_round == int(np.argmax(vals)), "the reported round must be chosen on validation"
    assert stored["metrics"]["global"]["best_val"] == stored["history"][best_round]["test/global"]
    assert stored["metrics"]["global"]["last"] == stored["history"][-1]["test/global"]
    assert set(stored["zeroshot"]) == set(stored["metrics"])
    costs = stored["costs"]
    assert costs["trainable_params"] == 4 * 128 and costs["bytes_up_per_client"] == 4 * 128 * 4
    assert costs["bytes_per_round"] == 2 * 4 * 128 * 4 * 4  # up + down, 4 clients
    assert len(stored["partition"]["client_sizes"]) == 4
    assert stored["environment"]["packages"]["flwr"] == "1.42.0"
    assert (results / "wandb").exists(), "the offline W&B run should be written locally"


def test_training_changes_the_prompt_and_lowers_the_loss(inprocess_record):
    record, _ = inprocess_record
    losses = [row["train/loss"] for row in record["history"][1:]]
    assert losses[-1] < losses[0]


def test_existing_record_is_skipped_and_force_reruns(inprocess_record):
    record, results = inprocess_record
    again = run(compose_config(["logger.mode=offline"], results_dir=results))
    assert again.get("skipped") is True and again["config_hash"] == record["config_hash"]
    forced = run(compose_config(["logger.mode=disabled", "force=true"], results_dir=results))
    assert not forced.get("skipped") and _metrics_only(forced["history"]) == _metrics_only(record["history"])


def test_corrupt_record_is_not_trusted(tmp_path):
    path = tmp_path / "records" / "x.json"
    path.parent.mkdir()
    path.write_text('{"complete": true, "metrics": {')  # what a killed non-atomic writer would leave
    assert load_record(path) is None
    path.write_text(json.dumps({"metrics": {}}))  # parseable but never marked complete
    assert load_record(path) is None


@pytest.mark.slow
def test_ray_backend_gives_the_same_metrics_as_inprocess(inprocess_record, tmp_path):
    record, _ = inprocess_record
    # Ray workers run `client_cpus` intra-op threads; CPU kernels may sum in thread-sized chunks (an AVX-512 Xeon gave
    # other last bits at 1 and 2 threads), so the workers run as many threads as this process.
    threads = f"backend.client_cpus={torch.get_num_threads()}"
    ray_record = run(compose_config(["backend=ray", "backend.num_cpus=2", threads, "logger.mode=disabled"],
                                    results_dir=tmp_path))
    assert _metrics_only(ray_record["history"]) == _metrics_only(record["history"])
