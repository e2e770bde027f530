"""Sweeps: a synthetic twin per table with seeds in its grid; a 4-job synthetic multirun writes four records and four
live W&B runs in one group (tags, zero-shot summary, rounds logged as they end, job counter, Hydra's launch line for
job 0), and running the same command again skips all four — and still logs them, as `skipped` runs in the group
(grid validity: test_sweep_grids.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import SMALL
from wandb_files import offline_runs

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "conf" / "experiment").glob("*.yaml"))


def _grid(path: Path) -> dict[str, list[str]]:
    params = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    return {key: [v.strip() for v in str(values).split(",")] for key, values in params.items()}


def test_there_is_a_synthetic_twin_for_every_table():
    names = {p.stem for p in EXPERIMENTS}
    for table in ("global", "base2novel", "personal", "fewshot", "multidomain", "xdomain", "xdataset", "protocols",
                  "efficiency"):
        assert f"synthetic_{table}" in names
    for path in EXPERIMENTS:
        assert path.read_text().startswith("# @package _global_"), path.name
        assert "seed" in _grid(path), f"{path.name}: seeds must be part of the grid"


def test_jobs_of_a_sweep_share_a_wandb_group():
    """The group given to wandb.init: logger.group if set, else the experiment's name in a multirun, else none."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from flbench.cli import CONF_DIR
    from flbench.results.wandb_logger import sweep_group

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="test"):
        cfg = compose(config_name="config", overrides=["experiment=synthetic_global"], return_hydra_config=True)
    def as_hydra(**changes):
        for node in (cfg, cfg.hydra, cfg.hydra.runtime, cfg.hydra.runtime.choices, cfg.hydra.sweep):
            OmegaConf.set_readonly(node, False)  # HydraConfig.set_config marks it read-only
            OmegaConf.set_struct(node, False)
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value, merge=False)
        HydraConfig.instance().set_config(cfg)

    try:
        as_hydra(**{"hydra.mode": RunMode.RUN})
        assert sweep_group({}) is None, "a single run has no group"
        as_hydra(**{"hydra.mode": RunMode.MULTIRUN})
        assert sweep_group({}) == "synthetic_global"
        assert sweep_group({"group": "mine"}) == "mine"
        as_hydra(**{"hydra.runtime.choices.experiment": None, "hydra.sweep.dir": "results/my-sweep"})
        assert sweep_group({}) == "my-sweep"
    finally:
        HydraConfig.instance().cfg = None


def _multirun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "flbench", "--multirun", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_four_job_sweep_writes_four_records_and_four_wandb_runs_and_rerun_skips_them(tmp_path):
    results = tmp_path / "results"
    args = ["experiment=synthetic_global", *SMALL, "logger.mode=offline", f"results_dir={results}",
            "algorithm=coop,zeroshot", "dataset.family=shapes", "seed=0,1"]
    first = _multirun(args, ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    records = sorted((results / "records").glob("*.json"))
    assert len(records) == 4
    seen = {(r["config"]["algorithm"]["name"], r["seed"]) for r in map(lambda p: json.loads(p.read_text()), records)}
    assert seen == {("coop", 0), ("coop", 1), ("zeroshot", 0), ("zeroshot", 1)}
    assert not (results / "wandb" / "wandb").exists(), "runs belong in <results_dir>/wandb/, not wandb/wandb/"
    runs = offline_runs(results)
    assert len(runs) == 4, "one W&B run per job"
    for run in runs:
        assert run["group"] == "synthetic_global" and run["job_type"] == "run"
        method = run["name"].split("-")[0]
        assert {f"method:{method}", "protocol:fedavg", "scenario:global", "dataset:synthetic",
                "backbone:tiny"} <= set(run["tags"])
        assert "zeroshot/global" in run["summary"] and "global/best_val" in run["summary"]
    coop = next(run for run in runs if run["name"].startswith("coop-"))
    assert [row["_step"] for row in coop["history"]] == [0, 1, 2]
    # live: rows were logged as their rounds ended, not all at once after training
    logged = coop["history"][-1]["_timestamp"] - coop["history"][0]["_timestamp"]
    trained = coop["history"][-1]["time_s"] - coop["history"][0]["time_s"]
    assert logged >= 0.5 * trained > 0, (logged, trained)
    for number in range(1, 5):
        assert f"job {number}/4: " in first.stdout, first.stdout[-3000:]
    assert "\t#0 : " in first.stdout and "Launching 4 jobs locally" in first.stdout, "Hydra's launch line for job 0"
    assert first.stdout.count("test accuracy (%)") == 4 and "wandb sync " in first.stdout
    assert "alembic" not in (first.stdout + first.stderr).lower()
    stamps = [p.stat().st_mtime_ns for p in records]

    again = _multirun(args, ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(skipped: record already existed)") == 4
    assert "round   1/2" not in again.stdout, "a skipped job must not train"
    assert [p.stat().st_mtime_ns for p in records] == stamps
    skipped = offline_runs(results)[4:]
    assert len(skipped) == 4 and all(r["job_type"] == "skipped" and r["group"] == "synthetic_global"
                                     for r in skipped), "skipped jobs still appear in the sweep's W&B group"
    replay = next(run for run in skipped if run["name"].startswith("coop-"))
    assert [row["_step"] for row in replay["history"]] == [0, 1, 2] and replay["summary"]["skipped"] is True
