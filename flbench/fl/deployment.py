"""Module-level Flower apps for `flwr run`: the same ServerApp and ClientApp under Flower's own runtime — the local
simulation `flwr run .` starts, or a real SuperLink with SuperNodes — configured by the typed keys of
pyproject.toml's `[tool.flwr.app.config]` (Flower's convention; override any with `--run-config "key=value"`).

    flwr run . --stream                                            # 2 simulated SuperNodes → 2 clients
    flwr run . --stream --run-config "algorithm='kgcoop' num-rounds=3"
    flwr run . --stream --federation-config "num-supernodes=10"    # 10 clients

Run-config keys (experiments/README.md, "flwr run"): `experiment` (as `+experiment=`), `algorithm`, `protocol`,
`dataset`, `scenario`, `backbone` (config-group choices; "" keeps the experiment's or conf's), `num-clients` (0: one
client per connected SuperNode), `num-rounds` and `seed` (-1 keeps conf's), `results-dir` ("" = conf's `results`,
resolved where the ServerApp runs), `overrides` (any further Hydra overrides), `node-wait-s` (how long the server
waits for SuperNodes before failing, naming `num-clients`), `stop-local-superlink` (stop the SuperLink `flwr run`
started for a local simulation once the run is over and nothing else runs on it).

Each SuperNode finds its shard from `partition-id` in its node config (a local simulation sets it). The ServerApp
writes the RunRecord (and W&B run) under `results-dir`, on the SuperLink's machine.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flbench.errors import ConfigError

log = logging.getLogger("flbench")

GROUP_KEYS = ("algorithm", "protocol", "dataset", "scenario", "backbone")
# key → (default meaning "keep conf's", config key); every key pyproject.toml declares is read here.
SCALAR_KEYS = {"num-rounds": ("num_rounds", -1), "seed": ("seed", -1)}
RUN_CONFIG_KEYS = ("experiment", *GROUP_KEYS, "num-clients", *SCALAR_KEYS, "results-dir", "overrides", "node-wait-s",
                   "stop-local-superlink")
SETTLE_S = 3.0  # SuperNodes register one by one: the count must hold this long before it is taken as final


def run_overrides(run_config: Mapping[str, Any], num_clients: int | None = None) -> list[str]:
    """Hydra overrides (as after `python -m flbench`) for a Flower run config; `num_clients` when it is known."""
    overrides = [f"experiment={run_config['experiment']}"] if run_config.get("experiment") else []
    overrides += [f"{group}={run_config[group]}" for group in GROUP_KEYS if run_config.get(group)]
    for key, (target, unset) in SCALAR_KEYS.items():
        value = run_config.get(key, unset)
        if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and value != unset):
            raise ConfigError(f"run config {key}={value!r} must be a non-negative integer ({unset}: conf's value)")
        if value != unset:
            overrides.append(f"{target}={value}")
    if run_config.get("results-dir"):
        overrides.append(f"results_dir={run_config['results-dir']}")
    overrides += shlex.split(str(run_config.get("overrides", "")))
    if num_clients is not None:
        overrides.append(f"num_clients={num_clients}")
    return overrides


def requested_clients(run_config: Mapping[str, Any]) -> int:
    value = run_config.get("num-clients", 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"run config num-clients={value!r} must be 0 (one client per SuperNode) or a positive "
                          "integer")
    return value


@lru_cache(maxsize=4)
def _compose(overrides: tuple[str, ...]) -> dict[str, Any]:
    from flbench.cli import compose

    return compose(list(overrides))


def compose_run(run_config: Mapping[str, Any], num_clients: int | None = None) -> dict[str, Any]:
    """The resolved experiment config `python -m flbench` would build from the same settings."""
    return _compose(tuple(run_overrides(run_config, num_clients)))


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


# --- ServerApp ------------------------------------------------------------------------------------------------
def fixed_size(grid: Grid) -> bool:
    """A simulation's grid: its nodes are all registered at the start, none joins later."""
    try:
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # pragma: no cover - another Flower layout: wait like a deployment
        return False
    return isinstance(getattr(grid, "grid", grid), InMemoryGrid)


def wait_for_nodes(grid: Grid, wanted: int | None, wait_s: float, settle_s: float = SETTLE_S) -> int:
    """The number of connected SuperNodes: `wanted` of them (waiting up to `wait_s` for late ones), or as many as
    are connected once the count has held for `settle_s` (`wanted` None, or a simulation, whose nodes never come
    later). Never waits longer than `wait_s`; gives up when the process is being shut down (Flower's signal
    handler ends the main thread)."""
    deadline = time.monotonic() + wait_s
    count, since, fixed = -1, time.monotonic(), fixed_size(grid)
    while True:
        now_count = len(list(grid.get_node_ids()))
        if now_count != count:
            count, since = now_count, time.monotonic()
        if wanted is not None and count >= wanted:
            return count
        if count > 0 and (wanted is None or fixed) and time.monotonic() - since >= (1.0 if fixed else settle_s):
            return count
        if time.monotonic() > deadline:
            return count
        if threading.current_thread() is not threading.main_thread() and not threading.main_thread().is_alive():
            raise RuntimeError("the run is being stopped")
        time.sleep(0.25)


def _nodes_error(num_clients: int, needed: int, connected: int, wait_s: float, simulation: bool) -> ConfigError:
    where = (f"the simulation has {connected}" if simulation else
             f"{connected} connected within {wait_s:.0f} s (node-wait-s)")
    return ConfigError(
        f"num_clients={num_clients} needs {needed} SuperNode(s) but {where}: pass --run-config \"num-clients={connected}\" (or num-clients=0: one client per "
        f"SuperNode), or give the federation {needed} nodes (local simulation: flwr run . --federation-config "
        f"\"num-supernodes={needed}\"; deployment: start {needed} SuperNodes with partition-id 0..{needed - 1})")


def resolve_federation(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment config for the nodes that are there: num_clients from them (num-clients=0) or checked against
    them, within node-wait-s seconds, before any training."""
    from flbench.validation import validate

    wait_s = float(run_config.get("node-wait-s", 30))
    requested = requested_clients(run_config)
    if requested == 0:
        if not nodes_are_clients(compose_run(run_config)):
            raise ConfigError("num-clients=0 (one client per SuperNode) does not apply when nodes are not clients "
                              "(protocol=centralized, scenario unseen-clients): set num-clients in the run config")
        connected = wait_for_nodes(grid, None, wait_s)
        if connected == 0:
            raise ConfigError(f"no SuperNode connected within {wait_s:.0f} s (node-wait-s): start SuperNodes, or "
                              f"raise node-wait-s")
        cfg = compose_run(run_config, connected)
        log.info("deployment: %d SuperNode(s) connected: num_clients=%d", connected, connected)
    else:
        cfg = compose_run(run_config, requested)
    # The ServerApp's working directory is the SuperLink's: a relative results_dir is resolved (and logged) here.
    cfg = {**cfg, "results_dir": str(Path(cfg["results_dir"]).expanduser().resolve())}
    validate(cfg)
    needed = _nodes_needed(cfg)
    connected = wait_for_nodes(grid, needed, wait_s)
    if connected != needed:
        raise _nodes_error(int(cfg["num_clients"]), needed, connected, wait_s, fixed_size(grid))
    return cfg


def nodes_are_clients(cfg: Mapping[str, Any]) -> bool:
    """One federation node per client: unless clients are held out (unseen-clients) or pooled (centralized)."""
    return cfg["protocol"]["name"] != "centralized" and not float(cfg["scenario"].get("fraction", 0) or 0) > 0


def _nodes_needed(cfg: Mapping[str, Any]) -> int:
    """Checked before any data is loaded where possible (the experiment, which says otherwise, loads it)."""
    from flbench.experiment import get_experiment

    return int(cfg["num_clients"]) if nodes_are_clients(cfg) else get_experiment(cfg).num_nodes


def _stop_federation_with_the_main_thread() -> None:
    """Under the simulation runtime the ServerApp runs in a thread: when Flower's SIGINT/SIGTERM handler ends the
    main thread, make the federation's waits give up (they poll FEDERATION_STOP) instead of keeping it alive."""
    from flbench.fl.backends import FEDERATION_STOP

    if threading.current_thread() is threading.main_thread():
        return
    FEDERATION_STOP.clear()

    def watch() -> None:
        threading.main_thread().join()
        FEDERATION_STOP.set()

    threading.Thread(target=watch, name="flbench-stop-watch", daemon=True).start()


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """run.run() with the federation driven through Flower's grid (local simulation or SuperLink)."""
    from flbench.fl.superlink_reaper import stop_managed_superlink_later
    from flbench.run import run

    _setup_logging()
    _warn_runtime_install()
    _stop_federation_with_the_main_thread()
    try:
        cfg = resolve_federation(grid, context.run_config)
        log.info("deployment: %s clients, records under %s", cfg["num_clients"], cfg["results_dir"])
        record = run(cfg, federate=lambda app, _client_app: app(grid, context))
        wandb_dir = record.get("wandb_dir")
        log.info("deployment: run %s %s; record in %s/records; W&B: %s", record["name"],
                 "skipped (its record exists)" if record.get("skipped") else "finished", cfg["results_dir"],
                 f"{wandb_dir} (upload: wandb sync {wandb_dir})" if wandb_dir else "off")
    except ConfigError as error:
        log.error("flbench: error: %s", " ".join(str(error).split()))  # one readable line above Flower's traceback
        raise
    finally:
        if context.run_config.get("stop-local-superlink", True):
            stop_managed_superlink_later()


def _warn_runtime_install() -> None:
    """Flower's runtime dependency install builds a fresh environment for the app: say so, and how to avoid it."""
    env = os.environ.get("VIRTUAL_ENV", "")
    if env and Path(env).parent.name == "runtime-envs":  # Flower's folder for them, under FLWR_HOME
        log.warning("deployment: running in Flower's runtime environment %s (installed from pyproject.toml, pinned "
                    "to requirements.lock by [tool.uv] constraint-dependencies); to use your own environment "
                    "instead set FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 before `flwr run` starts the "
                    "SuperLink", env)


# --- ClientApp ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _client_app_for(overrides: tuple[str, ...]) -> ClientApp:
    from flbench.fl.client_app import make_client_app

    return make_client_app(_compose(overrides))


def _delegate(msg: Message, context: Context) -> Message:
    if "partition-id" not in context.node_config:
        raise ConfigError("this SuperNode has no partition: start it with "
                          "--node-config 'partition-id=<i> num-partitions=<num_clients>'")
    requested = requested_clients(context.run_config)
    num_clients = requested or int(context.node_config.get("num-partitions", 0))
    if num_clients <= 0:
        raise ConfigError("num-clients=0 needs num-partitions in the SuperNode's node config "
                          "(--node-config 'partition-id=<i> num-partitions=<n>')")
    return _client_app_for(tuple(run_overrides(context.run_config, num_clients)))(msg, context)


client_app = ClientApp()
client_app.train()(_delegate)
client_app.evaluate()(_delegate)
client_app.query()(_delegate)

