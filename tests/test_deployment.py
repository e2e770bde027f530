"""Flower's deployment engine: one SuperLink and two SuperNodes on loopback (insecure), `flwr run` of the app in
pyproject.toml for a two-round experiment; the RunRecord equals the in-process run of the same config, and every
process the test started (and every process those started) is stopped, also when the test fails."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flbench.fl.backends import InProcessGrid
from flbench.fl.client_app import make_client_app
from flbench.fl.server_app import PartitionOrderedGrid
from helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERRIDES = [*SMALL, "num_clients=2", "num_rounds=2", "checkpoint.every=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries `marker` (our private FLWR_HOME): the SuperLink, SuperNodes, and the
    SuperExec / ServerApp / ClientApp processes they spawn, detached or not."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_all(started: list[subprocess.Popen], marker: str) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _processes_with(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        for proc in started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        while time.time() < deadline and _alive(marker):
            time.sleep(0.2)
        if not _alive(marker):
            return


def _alive(marker: str) -> list[int]:
    """Processes with our marker that are not zombies (a zombie has exited and only awaits its parent)."""
    alive = []
    for pid in _processes_with(marker):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            continue
    return alive


class LateGrid(InProcessGrid):
    """Nodes that connect late, as Ray actors on an existing cluster or SuperNodes started after `flwr run` do."""

    def __init__(self, *args, late_calls: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.late_calls = late_calls

    def get_node_ids(self):
        self.calls += 1
        return [] if self.calls <= self.late_calls else super().get_node_ids()


def test_server_waits_for_late_nodes_before_asking_their_partitions():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID  # as Flower's runtimes
    app = make_client_app({"seed": 0, "protocol": {"name": "fedavg"}, "train": {}})
    ordered = PartitionOrderedGrid(LateGrid(app, 3), min_nodes=3, timeout_s=30)
    assert len(list(ordered.get_node_ids())) == 3, "a node that connected late must still be sampled"
    with pytest.raises(RuntimeError, match="only 0 of 3 clients connected"):
        PartitionOrderedGrid(LateGrid(app, 3, late_calls=10**6), min_nodes=3, timeout_s=1)


@pytest.mark.slow
def test_flwr_run_on_a_superlink_and_two_supernodes_writes_the_same_record_as_inprocess(tmp_path):
    home, results, logs = tmp_path / "flwr-home", tmp_path / "results", tmp_path / "logs"
    home.mkdir(), logs.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "WANDB_MODE": "disabled"}
    marker = f"FLWR_HOME={home}"
    link = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "flbench-test"\n\n[superlink.flbench-test]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    overrides = shlex.join([*OVERRIDES, f"results_dir={results}"])
    (tmp_path / "run.toml").write_text(f"overrides = {json.dumps(overrides)}\n")

    started: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "w")
        started.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True))
        out.close()

    try:
        start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
              "--port", str(link))
        for i in range(2):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2")
        launched = subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "flbench-test", "--run-config",
                                   str(tmp_path / "run.toml")], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=120)
        assert launched.returncode == 0, launched.stdout + launched.stderr
        deadline = time.time() + 400
        while not list((results / "records").glob("*.json")):
            dead = [p.args[0] for p in started if p.poll() is not None]
            if dead or time.time() > deadline:
                tails = {f.name: f.read_text()[-1500:] for f in logs.iterdir()}
                pytest.fail(f"no record (exited: {dead}); logs: {tails}")
            time.sleep(1)
    finally:
        _stop_all(started, marker)
    assert not _alive(marker), "every process the test started must be stopped"

    (path,) = (results / "records").glob("*.json")
    record = json.loads(path.read_text())
    assert record["complete"] and record["config"]["num_clients"] == 2
    assert [row["round"] for row in record["history"]] == [0, 1, 2]
    assert len(record["partition"]["client_sizes"]) == 2 and record["history"][1]["clients"] == 2

    # the same apps in-process (same thread count as the deployed processes) give the same numbers
    from flbench.run import run
    from helpers import compose_config
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(compose_config(["num_clients=2", "num_rounds=2", "checkpoint.every=0"],
                                       results_dir=tmp_path / "reference"))
    finally:
        torch.set_num_threads(threads)
    assert reference["config_hash"] == record["config_hash"]
    strip = lambda history: [{k: v for k, v in row.items() if k != "time_s"} for row in history]  # noqa: E731
    assert strip(record["history"]) == strip(reference["history"])
