"""The front door: `python -m flbench` as a subprocess, on the small config, and its error path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flbench", *args, f"results_dir={tmp_path / 'results'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_runs_and_writes_one_record(tmp_path):
    done = _cli(SMALL, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round   2/2" in done.stdout and "zero-shot" in done.stdout and "trainable parameters: 512" in done.stdout
    records = list((tmp_path / "results" / "records").glob("*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["config"]["num_rounds"] == 2 and record["complete"] is True


def test_bad_config_exits_nonzero_with_one_line_and_writes_nothing(tmp_path):
    done = _cli([*SMALL, "partition=dirichlet", "partition.alpha=0"], tmp_path)
    assert done.returncode == 2, done.stderr[-1500:]
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("flbench: error:") and "partition.alpha" in message[0], message
    assert not (tmp_path / "results").exists(), "partition.alpha=0 wrote results"


def test_bad_values_are_refused_before_any_write(tmp_path):
    """The same path in-process (a CLI start-up per value costs ~7 s): run() refuses before writing anything."""
    from flbench.errors import ConfigError
    from flbench.run import run
    from helpers import compose_config

    for override, key in (("shots=0", "shots"), ("algorithm.class_token_position=left", "class_token_position"),
                          ("num_clients=100000", "num_clients")):
        with pytest.raises(ConfigError, match=key) as refused:
            run(compose_config(["partition=dirichlet", override], results_dir=tmp_path / "results"))
        assert "\n" not in str(refused.value), (override, str(refused.value))
        assert not (tmp_path / "results").exists(), f"{override} wrote results"


def test_cfg_job_prints_the_resolved_config(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flbench", "--cfg", "job"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "algorithm:" in done.stdout and "name: coop" in done.stdout
