"""`flwr run` as a Flower user types it. The local simulation (`flwr run . --stream`, Flower's managed SuperLink):
clients from the simulated nodes, typed run-config keys, no SuperLink left behind. The deployment engine (one
SuperLink and two SuperNodes on loopback): the RunRecord equals the in-process run of the same config; a run that
asks for more clients than there are nodes stops at one SIGTERM instead of waiting. Every process a test started
(and every process those started) is stopped, also when the test fails. The settings' plumbing (num-clients from the
nodes or refused in one line, bounded waits, pyproject's keys and pins) is tested on a stand-in grid."""

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
import tomllib
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flbench.errors import ConfigError
from flbench.fl import deployment
from flbench.fl.backends import InProcessGrid
from flbench.fl.client_app import make_client_app
from flbench.fl.server_app import PartitionOrderedGrid
from helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# SMALL without num_clients / num_rounds: those come from the typed run-config keys
EXTRA = [o for o in SMALL if not o.startswith(("num_clients=", "num_rounds="))] + ["checkpoint.every=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:`port`: `flwr run` fails at once ("Connection to the SuperLink is
    unavailable") when it is started before the SuperLink it talks to has bound its port (seen on a busy CI box)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.time() > deadline:
                pytest.fail(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")
            time.sleep(0.2)


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
    _run_toml(tmp_path / "run.toml", results)
    (tmp_path / "wait.toml").write_text("num-clients = 3\nnode-wait-s = 600\n")

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
        _wait_for_port(link)
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
        stopped_in = _sigterm_a_run_waiting_for_a_third_node(tmp_path / "wait.toml", env, marker)
    finally:
        _stop_all(started, marker)
    assert not _alive(marker), "every process the test started must be stopped"
    assert stopped_in < 15, f"a ServerApp waiting for nodes took {stopped_in:.1f} s to stop after one SIGTERM"

    (path,) = (results / "records").glob("*.json")
    record = json.loads(path.read_text())
    assert record["complete"] and record["config"]["num_clients"] == 2, "num-clients=0: one client per SuperNode"
    assert [row["round"] for row in record["history"]] == [0, 1]
    assert len(record["partition"]["client_sizes"]) == 2 and record["history"][1]["clients"] == 2

    # the same apps in-process (same thread count as the deployed processes) give the same numbers
    from flbench.run import run
    from helpers import compose_config
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(compose_config(["num_clients=2", "num_rounds=1", "checkpoint.every=0"],
                                       results_dir=tmp_path / "reference"))
    finally:
        torch.set_num_threads(threads)
    assert reference["config_hash"] == record["config_hash"]
    strip = lambda history: [{k: v for k, v in row.items() if k != "time_s"} for row in history]  # noqa: E731
    assert strip(record["history"]) == strip(reference["history"])


def _run_toml(path: Path, results: Path, extra: tuple[str, ...] = (), **keys: object) -> None:
    """A run config of typed keys, as a Flower user writes one (`flwr run . --run-config run.toml`)."""
    lines = ["num-rounds = 1", f"results-dir = {json.dumps(str(results))}",
             f"overrides = {json.dumps(shlex.join([*EXTRA, *extra]))}"]
    lines += [f"{key.replace('_', '-')} = {json.dumps(value)}" for key, value in keys.items()]
    path.write_text("\n".join(lines) + "\n")


def _sigterm_a_run_waiting_for_a_third_node(run_toml: Path, env: dict, marker: str) -> float:
    """Start a run that asks for 3 clients with 2 SuperNodes up and 600 s to wait; SIGTERM its ServerApp process
    once it waits; return how long that process took to exit."""
    before = set(_processes_with(marker))
    subprocess.run([str(BIN / "flwr"), "run", str(ROOT), "flbench-test", "--run-config", str(run_toml)],
                   cwd=run_toml.parent, env=env, capture_output=True, text=True, timeout=120, check=True)
    deadline = time.time() + 120
    server = None
    while server is None and time.time() < deadline:
        server = next((pid for pid in _alive(marker) if pid not in before and
                       b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()), None)
        time.sleep(0.5)
    assert server is not None, "the ServerApp process never started"
    time.sleep(5)  # it imports, composes the config, then waits for the third node
    os.kill(server, signal.SIGTERM)
    sent = time.time()
    while server in _alive(marker) and time.time() - sent < 60:
        time.sleep(0.2)
    return time.time() - sent


@pytest.mark.slow
def test_flwr_run_dot_is_a_local_simulation_with_one_client_per_node_and_leaves_no_superlink(tmp_path):
    home, results = tmp_path / "flwr-home", tmp_path / "results"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "WANDB_MODE": "offline",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # the documented way to keep this environment
    marker = f"FLWR_HOME={home}"
    _run_toml(tmp_path / "run.toml", results, ("logger.mode=offline",), algorithm="coop")
    try:
        done = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config", str(tmp_path / "run.toml")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = list((results / "records").glob("*.json"))
        assert len(records) == 1, done.stdout[-3000:]
        deadline = time.time() + 30
        while _alive(marker) and time.time() < deadline:
            time.sleep(0.5)
        left = _alive(marker)
    finally:
        _stop_all([], marker)
    assert not left, f"`flwr run .` left processes running: {[Path(f'/proc/{p}/cmdline') for p in left]}"
    record = json.loads(records[0].read_text())
    assert record["config"]["num_clients"] == 2 and record["history"][-1]["clients"] == 2, \
        "Flower's default local simulation has 2 SuperNodes: 2 clients"
    assert record["config"]["algorithm"]["name"] == "coop" and record["config"]["num_rounds"] == 1
    assert "2 SuperNode(s) connected: num_clients=2" in done.stdout
    from wandb_files import offline_runs

    (wandb_run,) = offline_runs(results)  # W&B works from the ServerApp's thread too, live, in <results>/wandb/
    assert [row["_step"] for row in wandb_run["history"]] == [0, 1] and "method:coop" in wandb_run["tags"]


class NodesGrid:
    """A stand-in grid with a fixed list of nodes (what a simulation's grid reports)."""

    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self) -> list[int]:
        return list(range(100, 100 + self.count))


def test_num_clients_comes_from_the_nodes_or_a_mismatch_fails_at_once_naming_it(monkeypatch):
    config = {"overrides": shlex.join(EXTRA), "node-wait-s": 30}
    monkeypatch.setattr(deployment, "fixed_size", lambda grid: True)  # a simulation: nodes never come later
    cfg = deployment.resolve_federation(NodesGrid(3), config)
    assert cfg["num_clients"] == 3 and Path(cfg["results_dir"]).is_absolute()
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"num_clients=10 needs 10 SuperNode\(s\) but the simulation has 2.*"
                                          r"num-clients=2.*num-supernodes=10"):
        deployment.resolve_federation(NodesGrid(2), {**config, "num-clients": 10})
    assert time.monotonic() - started < 10, "a simulation's node count is final: no waiting for more"
    monkeypatch.setattr(deployment, "fixed_size", lambda grid: False)  # SuperNodes may still connect: wait, bounded
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"2 connected within 1 s \(node-wait-s\)"):
        deployment.resolve_federation(NodesGrid(2), {**config, "num-clients": 3, "node-wait-s": 1})
    assert time.monotonic() - started < 10
    with pytest.raises(ConfigError, match="no SuperNode connected within 1 s"):
        deployment.resolve_federation(NodesGrid(0), {**config, "node-wait-s": 1})
    with pytest.raises(ConfigError, match="num-clients"):
        deployment.requested_clients({"num-clients": -1})


def test_typed_run_config_keys_become_the_overrides_python_m_flbench_takes():
    keys = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert tuple(keys) == deployment.RUN_CONFIG_KEYS, "every key pyproject declares is read, and only those"
    assert deployment.run_overrides(keys) == [], "the defaults keep the experiment's and conf's values"
    typed = {**keys, "experiment": "synthetic_base2novel", "algorithm": "kgcoop", "num-rounds": 3, "seed": 0,
             "results-dir": "/abs/r", "overrides": "train.lr=0.001 'dataset.domains=[photo]'"}
    assert deployment.run_overrides(typed, num_clients=4) == [
        "experiment=synthetic_base2novel", "algorithm=kgcoop", "num_rounds=3", "seed=0", "results_dir=/abs/r",
        "train.lr=0.001", "dataset.domains=[photo]", "num_clients=4"]
    with pytest.raises(ConfigError, match="num-rounds"):
        deployment.run_overrides({**keys, "num-rounds": "3"})


def test_the_runtime_install_is_pinned_to_the_lock():
    """Flower's runtime install runs `uv sync` on pyproject.toml: [tool.uv] constraint-dependencies pin it."""
    pins = {line.split("==")[0].split("[")[0].lower(): line.split("==")[1] for line in
            (ROOT / "requirements.lock").read_text().splitlines() if "==" in line and not line.startswith("#")}
    constraints = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["constraint-dependencies"]
    pinned = dict(c.lower().split("==") for c in constraints)
    runtime = {name for name in pins if name not in ("pytest", "hydra-joblib-launcher", "hydra-submitit-launcher")}
    assert pinned == {name: pins[name] for name in runtime}
