"""System heterogeneity end to end on the small synthetic config: sampling with Flower's minimum, stragglers and
injected failures under a personalised scenario; the same numbers on the Ray backend."""

import pytest
import torch

from flbench.run import run
from helpers import compose_config

HETEROGENEOUS = ["scenario=dual", "protocol.fraction=0.25", "protocol.min_clients=2", "protocol.failure_prob=0.4",
                 "protocol.stragglers=0.5", "num_rounds=3", "logger.mode=disabled"]


@pytest.fixture(scope="module")
def heterogeneous(tmp_path_factory):
    return run(compose_config(HETEROGENEOUS, results_dir=tmp_path_factory.mktemp("results")))


def test_failure_injected_run_completes_and_counts_failures(heterogeneous):
    rows = heterogeneous["history"][1:]
    assert [row["round"] for row in rows] == [1, 2, 3], "every round completes"
    assert all(row["sampled"] == 2 for row in rows), "int(0.25·4) = 1 < min_clients = 2: Flower samples 2"
    assert all(row["sampled"] == row["clients"] + row["failures"] for row in rows)
    totals = heterogeneous["participation"]
    assert totals["failures"] == sum(row["failures"] for row in rows) > 0
    assert totals["answered"] > 0 and totals["stragglers"] > 0
    # personal metrics come from every client, sampled or not, failed or not
    assert all(sum(k.startswith("test/personal/client/") for k in row) == 4 for row in rows)


@pytest.mark.slow
def test_ray_gives_the_same_heterogeneous_run(heterogeneous, tmp_path):
    threads = f"backend.client_cpus={torch.get_num_threads()}"  # as many as this process: test_federation.py says why
    ray = run(compose_config(HETEROGENEOUS + ["backend=ray", "backend.num_cpus=2", threads], results_dir=tmp_path))
    strip = [{k: v for k, v in row.items() if k != "time_s"} for row in heterogeneous["history"]]
    assert [{k: v for k, v in row.items() if k != "time_s"} for row in ray["history"]] == strip
