"""Module-level Flower apps for the deployment engine: the same ServerApp and ClientApp under a real SuperLink and
SuperNodes (`flwr run`), configured in pyproject.toml's [tool.flwr.app].

    flower-superlink --insecure --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 --node-config "partition-id=0 num-partitions=2"
    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9095 --node-config "partition-id=1 num-partitions=2"
    flwr run . <connection> --stream --run-config 'overrides="num_clients=2 num_rounds=2 results_dir=/abs/results"'

The experiment comes from the run config: `overrides` is a string of Hydra overrides, exactly what one would type
after `python -m flbench`; both apps compose conf/ with them, so server and clients hold the same resolved config.
Each SuperNode finds its data partition from its node config (`partition-id`), and `num_clients` must equal the
number of SuperNodes. The ServerApp writes the RunRecord (and W&B run) where `results_dir` points, on the
SuperLink's machine. See docs in experiments/README.md ("Beyond one machine").
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flbench.errors import ConfigError

log = logging.getLogger("flbench")

RUN_CONFIG_KEY = "overrides"


@lru_cache(maxsize=4)
def compose_overrides(overrides: str) -> dict[str, Any]:
    """The resolved experiment config for a string of Hydra overrides (as `python -m flbench` would build it)."""
    from flbench.cli import compose

    return compose(shlex.split(overrides))


def config_from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return compose_overrides(str(run_config.get(RUN_CONFIG_KEY, "")))


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


# --- ServerApp ------------------------------------------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """run.run() with the federation driven through the SuperLink's grid instead of a simulation backend."""
    from flbench.run import run

    _setup_logging()
    cfg = config_from_run_config(context.run_config)
    nodes = len(list(grid.get_node_ids()))
    log.info("deployment: %d SuperNode(s) connected, num_clients=%s", nodes, cfg["num_clients"])
    record = run(cfg, federate=lambda app, _client_app: app(grid, context))
    log.info("deployment: run %s finished (%s)", record["name"], "skipped" if record.get("skipped") else "done")


# --- ClientApp ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _client_app_for(overrides: str) -> ClientApp:
    from flbench.fl.client_app import make_client_app

    return make_client_app(compose_overrides(overrides))


def _delegate(msg: Message, context: Context) -> Message:
    if "partition-id" not in context.node_config:
        raise ConfigError("this SuperNode has no partition: start it with "
                          "--node-config 'partition-id=<i> num-partitions=<num_clients>'")
    return _client_app_for(str(context.run_config.get(RUN_CONFIG_KEY, "")))(msg, context)


client_app = ClientApp()
client_app.train()(_delegate)
client_app.evaluate()(_delegate)
client_app.query()(_delegate)
