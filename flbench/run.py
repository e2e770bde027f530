"""One experiment: resolved config → federation → Flower run → RunRecord (+ W&B run).

    run(cfg) validates, skips a run whose record exists (unless force), builds the experiment, evaluates the
    zero-shot baseline on the same backbone and splits, runs the federation on the chosen backend, selects the
    reported round on validation data, and writes the record atomically — only after everything succeeded.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flbench.backbones.attention import attention_costs
from flbench.experiment import Experiment, config_hash, get_experiment
from flbench.fl.backends import connect_ray, run_federation
from flbench.fl.checkpoint import Checkpointer
from flbench.fl.client_app import make_client_app
from flbench.fl.protocols import get_protocol
from flbench.fl.server_app import RoundLog, make_server_app
from flbench.metrics import summarise
from flbench.results.record import (SCHEMA_VERSION, code_version, environment, load_record, record_path,
                                    result_config, run_lock, write_record)
from flbench.results.wandb_logger import log_skipped, start_session
from flbench.validation import preflight, validate

log = logging.getLogger("flbench")


def _zeroshot_metrics(experiment: Experiment) -> dict[str, float]:
    """Zero-shot CLIP with the dataset's first template, on the same test splits the method reports (personal and
    held-out clients' splits included)."""
    return experiment.zeroshot_metrics()


def _participation(round_log: RoundLog) -> dict[str, int]:
    """Client participation over the run: sampled, answered, failed (protocol.failure_prob), straggled."""
    rows = [r for r in round_log.rounds if "sampled" in r]
    return {key: int(sum(r.get(field, 0) for r in rows)) for key, field in
            (("sampled", "sampled"), ("answered", "clients"), ("failures", "failures"), ("stragglers", "stragglers"))}


def _partition_stats(experiment: Experiment) -> dict[str, Any]:
    train = experiment.scenario.train
    num_classes, num_domains = int(train.labels.max()) + 1, len(experiment.bundle.domain_names)
    return {
        "client_sizes": [int(len(s)) for s in experiment.shards],
        "class_histograms": [np.bincount(train.labels[s], minlength=num_classes).tolist() for s in experiment.shards],
        "domain_histograms": [np.bincount(train.domains[s], minlength=num_domains).tolist() for s in experiment.shards],
    }


def _costs(experiment: Experiment, round_log: RoundLog, wall_time: float) -> dict[str, Any]:
    method = experiment.fresh()
    # SCAFFOLD also sends control variates (×2); protocol=local communicates nothing (×0)
    shared = int(method.shared_bytes() * get_protocol(experiment.cfg["protocol"]["name"]).communication)
    clients_per_round = float(np.mean([r["clients"] for r in round_log.rounds if "clients" in r] or [0]))
    return {"trainable_params": method.num_trainable(), "shared_params": sum(v.numel() for v in
                                                                              method.shared_state().values()),
            "bytes_up_per_client": shared, "bytes_down_per_client": shared,
            "bytes_per_round": int(round(2 * shared * clients_per_round)), "clients_per_round": clients_per_round,
            "wall_time_s": round(wall_time, 3),
            "attention": attention_costs(experiment.backbone)}  # KV bytes/token/layer, K/V-projection + attention FLOPs


def _method_metrics(experiment: Experiment, round_log: RoundLog) -> dict[str, Any]:
    """The method's own figures for the record (e.g. DP-FPL's privacy budget), given what the run did."""
    train = experiment.cfg["train"]
    training = {"num_rounds": int(experiment.cfg["num_rounds"]), "epochs": int(train.get("epochs", 1)),
                "batch_size": int(train["batch_size"]), "client_sizes": [int(len(s)) for s in experiment.shards],
                "clients_per_round": [int(r["clients"]) for r in round_log.rounds if "clients" in r]}
    return experiment.fresh().extra_metrics(training)


def run(cfg: Mapping[str, Any], federate: Callable[[ServerApp, ClientApp], None] | None = None) -> dict[str, Any]:
    """Run one experiment from a resolved config (plain dict) and return its record. `federate` runs the two
    Flower apps on a grid the caller already has (the deployment engine); by default cfg.backend runs them."""
    validate(cfg)
    preflight(cfg)
    key = config_hash(result_config(cfg))
    path = record_path(cfg["results_dir"], key)
    if (skipped := _existing(cfg, path)) is not None:
        return skipped
    if cfg["backend"].get("name") == "ray" and federate is None:
        connect_ray(cfg["backend"])  # an existing cluster (backend.address) answers before anything is loaded
    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    torch.manual_seed(int(cfg["seed"]))
    experiment = get_experiment(cfg)  # bad data, partition or method settings fail here, before anything is written
    experiment.method  # noqa: B018 — built now: a hyper-parameter the method refuses is bad input too
    with run_lock(cfg["results_dir"], key):  # one process per config; the lock file is the first thing written
        if (skipped := _existing(cfg, path)) is not None:  # finished by another process meanwhile
            return skipped
        return _execute(cfg, key, experiment, federate, started, t0)


def _existing(cfg: Mapping[str, Any], path: Any) -> dict[str, Any] | None:
    """The finished record of this config, marked skipped (None when there is none, or force=true)."""
    existing = load_record(path)
    if existing is None or cfg.get("force", False):
        return None
    log.info("skipped: a record for this config exists at %s (force=true reruns it)", path)
    return {**existing, "skipped": True, "wandb_dir": log_skipped(cfg, existing)}


def _execute(cfg: Mapping[str, Any], key: str, experiment: Experiment,
             federate: Callable[[ServerApp, ClientApp], None] | None, started: dt.datetime, t0: float
             ) -> dict[str, Any]:
    path = record_path(cfg["results_dir"], key)
    checkpointer = Checkpointer.from_config(cfg)
    if checkpointer is not None and cfg.get("force", False):
        checkpointer.clear()  # force reruns from scratch, never from an earlier attempt's checkpoint
    zeroshot = _zeroshot_metrics(experiment)
    wandb_run = start_session(cfg, _run_name(cfg, key), zeroshot)  # live: each round is logged as it ends
    round_log = RoundLog(on_round=wandb_run.log_rounds)
    try:
        if experiment.method.num_trainable() > 0 and int(cfg["num_rounds"]) > 0:
            server_app, client_app = make_server_app(cfg, round_log), make_client_app(cfg)
            if federate is not None:
                federate(server_app, client_app)
            else:
                run_federation(server_app, client_app, experiment.num_nodes, cfg["backend"])
        else:  # nothing to learn: the run is its own round-0 evaluation
            round_log.add({"round": 0, **experiment.evaluate_state([{}], 0, with_personal=True), "time_s": 0.0})
        _check_complete(round_log, int(cfg["num_rounds"]) if experiment.method.num_trainable() > 0 else 0)
    except BaseException as error:  # failed or interrupted (SIGINT/SIGTERM: 128 + signal): the W&B run says so
        wandb_run.abort(128 + error.signum if hasattr(error, "signum") else 1)
        raise

    scenario = experiment.scenario
    record = {
        "schema": SCHEMA_VERSION, "name": _run_name(cfg, key), "config_hash": key, "config": dict(cfg),
        "seed": int(cfg["seed"]), "code_version": code_version(), "environment": environment(),
        "started_at": started.isoformat(), "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "selection": scenario.selection, "history": round_log.rounds,
        "metrics": summarise(round_log.rounds, [f"test/{m}" for m in scenario.reported], scenario.selection),
        "backbone": {"name": experiment.backbone.name, "weights_sha1": experiment.backbone.fingerprint(),
                     "build_sha1": experiment.backbone.build_fingerprint()},
        "zeroshot": zeroshot, "costs": _costs(experiment, round_log, time.perf_counter() - t0),
        "partition": _partition_stats(experiment),
        "participation": _participation(round_log), "method": _method_metrics(experiment, round_log),
        "wandb": wandb_run.info(), "data": experiment.bundle.provenance,  # e.g. a generated split's SHA-256
    }
    record["metrics"] = {k.removeprefix("test/"): v for k, v in record["metrics"].items()}
    write_record(path, record)
    if checkpointer is not None:
        checkpointer.clear()  # the record is the result now; checkpoints only served to get here
    log.info("record written to %s", path)
    record["wandb_dir"] = wandb_run.finish(record)
    return record


def _check_complete(round_log: RoundLog, num_rounds: int) -> None:
    """A record is written only for a run that evaluated every round (a federation that stopped early is an error)."""
    last = int(round_log.rounds[-1]["round"]) if round_log.rounds else -1
    if last != num_rounds:
        raise RuntimeError(f"the federation stopped after round {last} of {num_rounds} (see the log above); no record "
                           "was written")


def _run_name(cfg: Mapping[str, Any], key: str) -> str:
    return (f"{cfg['algorithm']['name']}-{cfg['protocol']['name']}-{cfg['dataset']['name']}-"
            f"{cfg['scenario']['name']}-s{cfg['seed']}-{key[:6]}")
