"""The ClientApp: one client's local training, its own evaluation, and a query for its partition id.

Shared parameters arrive in the message; client-local parameters (personal prompts, control variates, and under
protocol=local the client's whole model) live in the client's Flower `Context.state` between rounds — never
averaged, never lost. The experiment (data, backbone, cached features) is looked up per process, so every
simulated client in a process shares one frozen backbone.

- train: load shared + own state, run the protocol's local steps (with its gradient hooks), reply with the shared
  state and metrics. System heterogeneity (a straggler's smaller step budget, an injected failure) is decided
  here from (seed, round, partition id), identically on every backend.
- evaluate: the client's own model on its personal val/test splits (personalised scenarios), and, under
  protocol=local where no global model exists, on the scenario's shared splits too.
- query: the partition id, so the server can list nodes in partition order (seeded sampling on every backend).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flbench.algorithms.base import PromptMethod
from flbench.algorithms.cohort import ClientState, bound
from flbench.engine import (CohortMember, LocalResult, stacking_refusal, step_activation_bytes, train_cohort,
                            train_local)
from flbench.experiment import Experiment, derive_seed, get_experiment
from flbench.fl.backends import client_blame
from flbench.fl.checkpoint import Checkpointer
from flbench.fl.heterogeneity import INJECTED_FAILURE_CODE, fails, straggler_steps
from flbench.fl.protocols import ClientRound, get_protocol

log = logging.getLogger(__name__)

LOCAL_KEY = "flbench.local"  # the method's client-local state (never sent)
OWN_KEY = "flbench.own"  # protocol=local: the client's own copy of the shared parameters
CLIENT_META = "flbench.client"  # {"partition-id": …} in every reply
# backend.cohort_memory_mb=null: a cohort step's activations may take this share of the process's resident memory
# (the one backbone, the caches: the sequential footprint) on the CPU, and this share of a GPU's free memory.
AUTO_MEMORY_SHARE = {"cpu": 0.15, "cuda": 0.5}

ExperimentFn = Callable[[Mapping[str, Any]], Experiment]


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict() if len(record) else {}


def load_client_method(experiment: Experiment, global_state: Mapping[str, torch.Tensor], context: Context,
                       own_model: bool = False) -> PromptMethod:
    """The process's method reset to its initial state, then the server's shared state, then this client's own
    (under protocol=local its own shared parameters replace the server's, which never change)."""
    method = experiment.fresh()
    method.load_partial(global_state)
    if own_model and OWN_KEY in context.state:
        method.load_partial(to_state(context.state[OWN_KEY]))
    if LOCAL_KEY in context.state:
        method.load_partial(to_state(context.state[LOCAL_KEY]))
    return method


class CohortClientApp(ClientApp):
    """Flower's ClientApp plus `train_cohort`: the train messages of several clients answered in one call, their
    local training run as one cohort (`flbench.engine.train_cohort`). The in-process grid hands it a round's
    messages; the Ray engine and `flwr run` deliver one message at a time through the ClientApp itself."""

    def __init__(self, train_cohort: Callable[[list[tuple[Message, Context]]], list[Message]]) -> None:
        super().__init__()
        self.train_cohort = train_cohort


@dataclass
class _Job:
    """One client's train message on its way through a cohort."""

    index: int  # position of the message in the call (replies come back in the same order)
    message: Message
    context: Context
    partition_id: int
    server_round: int
    rnd: ClientRound | None = None
    member: CohortMember | None = None  # its state is a copy of the method's when the cohort has several clients
    budget: int | None = None


def make_client_app(cfg: Mapping[str, Any], experiment_fn: ExperimentFn = get_experiment) -> CohortClientApp:
    """A ClientApp bound to a resolved config (a plain dict, so it pickles into Ray workers). `experiment_fn` finds
    the process's experiment; tests pass a small stand-in."""
    trainer = _Trainer(cfg, experiment_fn)
    app = CohortClientApp(lambda pairs: trainer.train(pairs, attribute_errors=True))
    protocol, checkpointer = trainer.protocol, trainer.checkpointer

    def meta(partition_id: int) -> ConfigRecord:
        return ConfigRecord({"partition-id": partition_id})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return trainer.train([(msg, context)])[0]

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Counts, not accuracies, so the server can weight by samples or average over clients exactly."""
        partition_id = int(context.node_config["partition-id"])
        if checkpointer:
            checkpointer.restore_client(partition_id, int(msg.content["config"]["server-round"]), context.state)
        experiment = experiment_fn(cfg)
        method = load_client_method(experiment, to_state(msg.content["arrays"]), context,
                                    own_model=not protocol.aggregates)
        metrics: dict[str, Any] = {}
        if experiment.scenario.personal:
            rows = experiment.evaluate_personal(method, experiment.node_clients[partition_id])
            metrics.update({f"personal.{k}": [float(r[k]) for r in rows] for k in rows[0]})
        if not protocol.aggregates:  # no global model exists: the client's own model stands in for it
            metrics.update(experiment.evaluate(method, experiment.scenario.val, "val"))
            metrics.update(experiment.evaluate(method, experiment.scenario.test, "test"))
        metrics["num-examples"] = len(experiment.client_images(partition_id))
        return Message(RecordDict({"metrics": MetricRecord(metrics), CLIENT_META: meta(partition_id)}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        partition_id = int(context.node_config["partition-id"])
        return Message(RecordDict({CLIENT_META: meta(partition_id)}), reply_to=msg)

    return app


class _Trainer:
    """The ClientApp's train side: prepare each client (its state, hooks, budget, seeds) exactly as if it trained
    alone, train them in cohorts of at most `cohort_size` (one at a time for a method that does not stack), then
    reply for each client."""

    def __init__(self, cfg: Mapping[str, Any], experiment_fn: ExperimentFn) -> None:
        self.cfg, self.experiment_fn = cfg, experiment_fn
        self.protocol = get_protocol(cfg["protocol"]["name"])
        self.seed = int(cfg["seed"])
        self.checkpointer = Checkpointer.from_config(cfg)  # a restarted client restores its Context.state from disk
        self._logged: set[str] = set()
        self._activation: dict[tuple, int] = {}

    def train(self, pairs: list[tuple[Message, Context]], attribute_errors: bool = False) -> list[Message]:
        """One reply per message, in order. With `attribute_errors` (the in-process grid's cohort call) an exception
        names the client whose part failed, or the cohort's clients for their joint step."""
        blame = client_blame if attribute_errors else _no_blame
        replies: list[Message | None] = [None] * len(pairs)
        jobs = []
        for index, (message, context) in enumerate(pairs):
            job = _Job(index, message, context, int(context.node_config["partition-id"]),
                       int(message.content["config"]["server-round"]))
            if fails(self.cfg, job.server_round, job.partition_id):
                # Before any work and without touching the client's state: as if the device had dropped out.
                replies[index] = Message(Error(code=INJECTED_FAILURE_CODE,
                                               reason="injected failure (protocol.failure_prob)"), reply_to=message)
            else:
                jobs.append(job)
        if jobs:
            with blame(*[job.partition_id for job in jobs]):
                experiment = self.experiment_fn(self.cfg)
                experiment.method  # noqa: B018 — built before any client's seed (building it reseeds torch)
                size = self.cohort_size(experiment, jobs, blame)
            for chunk in _chunks(jobs, size):
                for job, reply in zip(chunk, self._train_chunk(experiment, chunk, blame)):
                    replies[job.index] = reply
        return replies  # type: ignore[return-value]

    def _train_chunk(self, experiment: Experiment, chunk: list[_Job], blame: Callable[..., Any]) -> list[Message]:
        alone = len(chunk) == 1  # trained in place, on the live random stream: exactly the sequential path
        for job in chunk:
            with blame(job.partition_id):
                self._prepare(experiment, job, copy=not alone)
        train_cfg = self.cfg["train"]
        with blame(*[job.partition_id for job in chunk]):
            if alone:
                m = chunk[0].member
                results = [train_local(chunk[0].rnd.method, m.images, train_cfg, m.generator, cached=m.cached,
                                       gradient_hooks=m.gradient_hooks, max_steps=m.max_steps)]
            else:
                results = train_cohort(experiment.method, [job.member for job in chunk], train_cfg)
        replies = []
        for job, result in zip(chunk, results):
            with blame(job.partition_id), (contextlib.nullcontext() if alone else
                                           bound(job.rnd.method, job.member.state)):
                replies.append(self._finish(job, result))
        return replies

    def _prepare(self, experiment: Experiment, job: _Job, copy: bool) -> None:
        """Everything before local training, in the order a client training alone does it: checkpoint restore,
        seed, method state, protocol hooks (SCAFFOLD's full-shard gradient included), straggler budget."""
        if self.checkpointer:
            self.checkpointer.restore_client(job.partition_id, job.server_round, job.context.state)
        torch.manual_seed(derive_seed(self.seed, job.server_round, job.partition_id, 1))
        global_state = to_state(job.message.content["arrays"])
        method = load_client_method(experiment, global_state, job.context, own_model=not self.protocol.aggregates)
        images = experiment.client_images(job.partition_id)
        job.rnd = ClientRound(method=method, global_state=global_state, config=job.message.content["config"],
                              content=job.message.content, state=job.context.state, images=images,
                              cached=experiment.client_cache(job.partition_id), train_cfg=self.cfg["train"])
        hooks = self.protocol.client.hooks(job.rnd)
        job.budget = straggler_steps(self.cfg, job.server_round, job.partition_id, len(images))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, job.server_round, job.partition_id, 2))
        state = ClientState.of(method, copy=copy, owner=job.partition_id)
        job.member = CohortMember(state, images, generator, job.rnd.cached, hooks, job.budget)

    def _finish(self, job: _Job, result: LocalResult) -> Message:
        """The reply and the client's kept state, with the method holding this client's trained state."""
        method, rnd, context = job.rnd.method, job.rnd, job.context
        local = method.local_state()
        if local:
            context.state[LOCAL_KEY] = ArrayRecord(local)
        if not self.protocol.aggregates:
            context.state[OWN_KEY] = ArrayRecord(method.shared_state())
        reply = RecordDict({
            # protocol=local: nothing travels (an empty record keeps the reply's shape)
            "arrays": ArrayRecord(method.shared_state()) if self.protocol.aggregates else ArrayRecord(),
            "metrics": MetricRecord({"num-examples": result.num_examples, "train_loss": result.loss,
                                     "local_steps": result.steps, "straggler": int(job.budget is not None)}),
            CLIENT_META: ConfigRecord({"partition-id": job.partition_id}),
        })
        self.protocol.client.finish(rnd, result, reply)
        if self.checkpointer:
            self.checkpointer.save_client(job.partition_id, job.server_round, context.state)
        return Message(reply, reply_to=job.message)

    def cohort_size(self, experiment: Experiment, jobs: list[_Job], blame: Callable[..., Any]) -> int:
        """K: `backend.cohort_size` (null: every client of the call), at most as many clients as fit
        `backend.cohort_memory_mb` of activations, and 1 for a method that cannot stack (logged once)."""
        backend = self.cfg.get("backend") or {}
        wanted = backend.get("cohort_size")
        if len(jobs) == 1 or wanted == 1:
            return 1
        method = experiment.method
        refusal = stacking_refusal(method)
        if refusal:
            self._log_once(refusal, "clients train one at a time: %s", refusal)
            return 1
        limit = len(jobs) if wanted is None else min(len(jobs), int(wanted))
        budget = cohort_memory_budget(backend.get("cohort_memory_mb"), method.device)
        per_client = self._activation_bytes(experiment, jobs[0])
        fit = max(1, int(budget // max(per_client, 1)))
        if fit < limit:
            self._log_once(f"fit {fit}", "cohorts of at most %d clients: one client's step keeps %.1f MB of "
                           "activations, the budget is %.1f MB (backend.cohort_memory_mb)", fit,
                           per_client / 2 ** 20, budget / 2 ** 20)
        return min(limit, fit)

    def _activation_bytes(self, experiment: Experiment, job: _Job) -> int:
        """One client's training-step activations, measured once per process and class list (engine)."""
        method = experiment.fresh()
        key = (tuple(method.classnames), int(self.cfg["train"]["batch_size"]))
        if key not in self._activation:
            images = experiment.client_images(job.partition_id)
            member = CohortMember(ClientState.of(method, copy=True), images, torch.Generator(),
                                  experiment.client_cache(job.partition_id))
            self._activation[key] = step_activation_bytes(method, member, self.cfg["train"])
        return self._activation[key]

    def _log_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info(message, *args)


def cohort_memory_budget(megabytes: float | None, device: torch.device) -> float:
    """Bytes of activations a cohort step may keep: `backend.cohort_memory_mb`, or (null) a share of what this
    process holds on the CPU (so the peak stays within ~1.15× one client at a time) or of the GPU's free memory."""
    if megabytes is not None:
        return float(megabytes) * 2 ** 20
    if device.type == "cuda":
        return AUTO_MEMORY_SHARE["cuda"] * torch.cuda.mem_get_info(device)[0]
    return AUTO_MEMORY_SHARE["cpu"] * resident_bytes()


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; elsewhere its peak so far, from getrusage)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _chunks(jobs: list[_Job], size: int) -> list[list[_Job]]:
    """`jobs` in ⌈n/size⌉ consecutive cohorts of near-equal sizes (10 clients at K = 4: 4, 3, 3)."""
    count = -(-len(jobs) // size)
    small, extra = divmod(len(jobs), count)
    sizes = [small + 1] * extra + [small] * (count - extra)
    starts = [sum(sizes[:i]) for i in range(count)]
    return [jobs[start:start + n] for start, n in zip(starts, sizes)]


@contextlib.contextmanager
def _no_blame(*partition_ids: int) -> Iterator[None]:
    yield
