"""Resumable runs: a CLI run SIGKILLed after a checkpoint and started again with the same command ends with the
same history and final metrics as an uninterrupted run (SCAFFOLD with half the clients per round: server variate,
client variates and the client-sampling RNG all have to survive); checkpoint files are trusted only when whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flbench.errors import ConfigError, DataFileError
from flbench.fl.checkpoint import Checkpointer, strategy_state
from flbench.run import run
from helpers import SMALL, compose_config

ROOT = Path(__file__).resolve().parents[1]
RESUME = [*SMALL, "num_rounds=4", "checkpoint.every=2", "protocol=scaffold", "protocol.fraction=0.5"]


def _checkpointer(tmp_path: Path, every: int = 2) -> Checkpointer:
    cfg = {"results_dir": str(tmp_path), "checkpoint": {"every": every}, "seed": 0}
    return Checkpointer.from_config(cfg)


def test_checkpoint_config():
    assert Checkpointer.from_config({"results_dir": "r", "checkpoint": {"every": 0}}) is None
    with pytest.raises(ConfigError, match="checkpoint.every"):
        Checkpointer.from_config({"results_dir": "r", "checkpoint": {"every": -1}})


def test_client_state_restores_the_newest_file_before_the_round_and_prunes_safely(tmp_path):
    ckpt = _checkpointer(tmp_path, every=2)
    for rnd in (1, 3, 4, 5, 6):
        ckpt.save_client(0, rnd, RecordDict({"v": ArrayRecord({"x": torch.full((2,), float(rnd))})}))
    kept = sorted(int(p.stem.split("_")[1]) for p in (ckpt.root / "clients" / "0").glob("round_*.pt"))
    # at round 6 with checkpoints every 2 rounds, a resume starts after round 4 at the earliest: 4, 5, 6 and
    # the newest older file (3) may be needed; 1 may not
    assert kept == [3, 4, 5, 6]
    state = RecordDict()
    assert ckpt.restore_client(0, 5, state) and state["v"].to_torch_state_dict()["x"][0] == 4.0
    fresh = RecordDict()
    assert not ckpt.restore_client(0, 3, fresh) and not len(fresh), "only files from before the round count"
    own = RecordDict({"v": ConfigRecord({"mine": 1})})
    assert not ckpt.restore_client(0, 6, own) and own["v"]["mine"] == 1, "a live state is never replaced"


def test_a_checkpoint_of_other_backbone_weights_is_refused_naming_both(tmp_path):
    """The config hash is the same on every machine, the tiny CLIP built from it is not (README: another CPU type
    builds other weights), so a resume elsewhere must not continue one model's run on another's weights."""
    cfg = {"results_dir": str(tmp_path), "checkpoint": {"every": 1}, "seed": 0}
    made = Checkpointer.from_config(cfg, "44e8696e1f82")
    round_log = SimpleNamespace(rounds=[], aggregates=[], started=0.0)
    made.save_server(1, {"x": torch.zeros(2)}, round_log, SimpleNamespace())
    assert Checkpointer.from_config(cfg, "44e8696e1f82").load_server()["weights"] == "44e8696e1f82"
    with pytest.raises(DataFileError, match=f"{made.server_path} was made with backbone weights 44e8696e1f82, "
                                            f"this process has fbf83dd9f714.*delete {made.root}"):
        Checkpointer.from_config(cfg, "fbf83dd9f714").load_server()


def test_an_unreadable_server_checkpoint_is_an_error_naming_it(tmp_path):
    ckpt = _checkpointer(tmp_path)
    ckpt.server_path.parent.mkdir(parents=True)
    ckpt.server_path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataFileError, match=f"checkpoint {ckpt.server_path} .*delete {ckpt.root}"):
        ckpt.load_server()
    assert not list(ckpt.root.glob(".*.tmp")), "atomic writes leave no temp files behind"


def test_strategy_state_keeps_data_not_behaviour():
    class Strategy:
        def __init__(self):
            self.m_t = {"w": [1.0]}
            self.eta = 0.1
            self.aggregate_train = lambda *a: None  # instrumented hooks are behaviour
    assert strategy_state(Strategy()) == {"m_t": {"w": [1.0]}, "eta": 0.1}


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "flbench", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _history(results: Path) -> tuple[list[dict], dict]:
    (path,) = (results / "records").glob("*.json")
    record = json.loads(path.read_text())
    return [{k: v for k, v in row.items() if k != "time_s"} for row in record["history"]], record["metrics"]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_final_metrics(tmp_path):
    results = tmp_path / "resumed"
    args = _cli([*RESUME, f"results_dir={results}"])
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "checkpoint: round 2 saved" in line:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert not list((results / "records").glob("*.json")), "the killed run must not have finished"
    assert list((results / "checkpoints").glob("*/clients/*/round_*.pt")), "clients checkpoint their state"

    again = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint: resuming after round" in again.stdout
    assert "round   1/4" not in again.stdout, "rounds before the checkpoint are not trained again"
    resumed_history, resumed_metrics = _history(results)
    # the uninterrupted run, in this process with the subprocesses' single thread (same float reductions)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(compose_config([*RESUME[len(SMALL):], "checkpoint.every=0"], results_dir=tmp_path / "ref"))
    finally:
        torch.set_num_threads(threads)
    assert resumed_history == [{k: v for k, v in row.items() if k != "time_s"} for row in reference["history"]]
    assert resumed_metrics == reference["metrics"]
    assert not list((results / "checkpoints").glob("*")), "checkpoints are removed once the record exists"
