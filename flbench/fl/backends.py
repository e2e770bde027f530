"""Two ways to run the same ServerApp and ClientApp: Flower's Ray simulation engine, or in-process.

`inprocess` is a minimal Flower `Grid` that delivers messages by calling the ClientApp directly, with one persistent
`Context` per client: a round's train messages together to the ClientApp's cohort trainer (the sampled clients
trained as cohorts over the one frozen backbone, `backend.cohort_size`), other messages one by one. No Ray start-up,
no worker processes, and the same metrics as `ray` for the same seed. It implements Flower's public
`Grid` interface but sets a message id the way Flower's own in-memory grid does, so flwr stays pinned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from flbench.errors import ClientError, ConfigError, FlbenchError

log = logging.getLogger(__name__)

FIRST_CLIENT_NODE_ID = 100  # Flower reserves small ids (the SuperLink is node 1)
# Set while a federation is being torn down (a signal, or the engine failed): the ServerApp's thread stops waiting
# for replies (PartitionOrderedGrid), instead of polling forever for clients that will never answer.
FEDERATION_STOP = threading.Event()


class InProcessGrid(Grid):
    """Sequential, in-process delivery of messages to `num_nodes` ClientApp instances."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
        self.client_app = client_app
        self._run = None
        # partition-id is what a client uses to find its shard; node ids only need to differ from the server's.
        self.contexts = {
            node_id: Context(run_id=0, node_id=node_id, state=RecordDict(), run_config=dict(run_config or {}),
                             node_config={"partition-id": node_id - FIRST_CLIENT_NODE_ID, "num-partitions": num_nodes})
            for node_id in range(FIRST_CLIENT_NODE_ID, FIRST_CLIENT_NODE_ID + num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, message: Message) -> Message:
        """The client's reply. An exception raised by a client is deterministic here (a bad value, an unreadable
        file): it stops the run, naming the client, instead of becoming a 'failed client' (injected failures are
        replies, not exceptions: `protocol.failure_prob`)."""
        context = self.contexts[message.metadata.dst_node_id]
        with client_blame(int(context.node_config["partition-id"])):
            return self.client_app(message, context)

    def _deliver_cohort(self, messages: list[Message]) -> list[Message]:
        """The replies to a round's train messages, from one call of the ClientApp's cohort trainer (which names
        the client whose part failed, or the cohort's clients when their joint step did)."""
        pairs = [(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        with client_blame(*[int(c.node_config["partition-id"]) for _, c in pairs]):
            replies = list(self.client_app.train_cohort(pairs))  # type: ignore[attr-defined]
        if len(replies) != len(messages):
            raise RuntimeError(f"the cohort trainer answered {len(replies)} of {len(messages)} train messages")
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver every message now. The train messages of a call (a round's sampled clients) go to the
        ClientApp's cohort trainer together when it has one (`client_app.CohortClientApp`); the rest one by one."""
        messages = list(messages)
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
        train = [m for m in messages if m.metadata.message_type.split(".")[0] == MessageType.TRAIN]
        if len(train) > 1 and hasattr(self.client_app, "train_cohort"):
            for message, reply in zip(train, self._deliver_cohort(train)):
                self._replies[message.metadata.message_id] = reply
        for message in messages:
            if message.metadata.message_id not in self._replies:
                self._replies[message.metadata.message_id] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@contextlib.contextmanager
def client_blame(*partition_ids: int) -> Iterator[None]:
    """An exception raised inside stops the run naming the client: the one it carries (`cohort.OWNER_ATTRIBUTE`,
    set while that client's state was bound), else the only one, else the cohort's clients. FlbenchErrors keep their
    type (and exit code) behind the prefix, others become ClientError; an error already named passes through."""
    try:
        yield
    except Exception as error:
        if getattr(error, "flbench_blamed", False):
            raise
        owner = getattr(error, "flbench_client", None)
        if owner is not None or len(partition_ids) == 1:
            who = f"client {partition_ids[0] if owner is None else owner}"
        else:
            who = f"clients {', '.join(map(str, sorted(partition_ids)))} (one cohort)"
        named = (type(error)(f"{who}: {error}") if isinstance(error, FlbenchError)
                 else ClientError(f"{who} failed: {type(error).__name__}: {error}"))
        named.flbench_blamed = True  # type: ignore[attr-defined]
        raise named from error


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_clients: int,
                  grid: InProcessGrid | None = None) -> InProcessGrid:
    """Run the federation in this process; returns the grid, whose `contexts` hold each client's state (tests)."""
    # Flower stamps new messages with the process's task identity, which its own runtimes set before a ServerApp.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, SUPERLINK_NODE_ID
    grid = grid if grid is not None else InProcessGrid(client_app, num_clients)
    server_app(grid, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return grid


def ray_init_args(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ray.init arguments for the `backend` group: an existing cluster (`address`), or a private one in a fresh
    temporary folder (removed after the run unless `temp_dir` names one)."""
    if cfg.get("address"):
        return {"address": cfg["address"]}
    init_args: dict[str, Any] = {"num_cpus": int(cfg.get("num_cpus") or os.cpu_count() or 1),
                                 "include_dashboard": False, "_temp_dir": cfg.get("temp_dir") or
                                 tempfile.mkdtemp(prefix="flbench-ray-")}
    if float(cfg.get("client_gpus") or 0) > 0:  # Ray then sets CUDA_VISIBLE_DEVICES in each worker to its GPU
        import torch

        init_args["num_gpus"] = torch.cuda.device_count()  # explicit: a GPU Ray failed to detect would hang the run
    return init_args


def connect_ray(cfg: Mapping[str, Any]) -> None:
    """Join the existing cluster `backend.address` now, before data and weights are loaded, so that a wrong address
    fails in seconds (run_ray then reuses the connection)."""
    import ray

    if cfg.get("address") and not ray.is_initialized():
        _start_ray(ray_init_args(cfg))


def run_ray(server_app: ServerApp, client_app: ClientApp, num_clients: int, cfg: Mapping[str, Any]) -> None:
    """Flower's simulation engine. Each Ray worker builds the experiment once and reuses it for its clients."""
    import ray
    from flwr.simulation import run_simulation

    init_args = ray_init_args(cfg) if not ray.is_initialized() else {"address": cfg.get("address")}
    backend_config = {
        "init_args": init_args,
        "client_resources": {"num_cpus": float(cfg.get("client_cpus", 1)),
                             "num_gpus": float(cfg.get("client_gpus") or 0)},
    }
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    FEDERATION_STOP.clear()
    try:
        if not ray.is_initialized():
            _start_ray(init_args)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                       backend_config=backend_config, verbose_logging=False)
    except BaseException:
        FEDERATION_STOP.set()  # the ServerApp thread must not outlive the engine (it would keep the process alive)
        raise
    finally:
        _stop_ray(init_args.get("_temp_dir") if not cfg.get("temp_dir") else None)


RAY_CONNECT_TIMEOUT_S = 10.0  # an existing cluster answers in a second or two; ray.init would keep retrying


def _start_ray(init_args: Mapping[str, Any]) -> None:
    """ray.init as Flower's Ray backend would do it (which then reuses this session), keeping the process's SIGTERM
    handler (ray.init replaces it with one that calls sys.exit, which would skip the one-line stop of flbench.cli),
    and giving up on an existing cluster (`backend.address`) that does not answer within RAY_CONNECT_TIMEOUT_S."""
    import _thread
    import sys

    import ray

    handler = signal.getsignal(signal.SIGTERM)
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath  # workers import what this driver imports (as Flower's backend does)
    address = init_args.get("address")
    watchdog = threading.Timer(RAY_CONNECT_TIMEOUT_S, _thread.interrupt_main) if address else None
    if watchdog is not None:
        watchdog.daemon = True
        watchdog.start()
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 **{"include_dashboard": False, "logging_level": _ray_log_level(), "log_to_driver": _verbose(),
                    **init_args})
    except (KeyboardInterrupt, ConnectionError) as error:
        if isinstance(error, KeyboardInterrupt) and (watchdog is None or watchdog.is_alive()):
            raise  # the user's Ctrl-C, not the watchdog
        raise ConfigError(f"backend.address={address}: no Ray cluster answered (within {RAY_CONNECT_TIMEOUT_S:.0f} "
                          "s); check the address and that the cluster is up (`ray status`), or leave "
                          "backend.address=null") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if threading.current_thread() is threading.main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def _verbose() -> bool:
    """`verbose=true` (flbench.cli.setup_logging says so in FLBENCH_VERBOSE: importing ray resets its logger's
    level, so a level set before the import does not survive)."""
    return os.environ.get("FLBENCH_VERBOSE") == "1"


def _ray_log_level() -> int:
    """Ray's own INFO lines, and the workers' log lines forwarded to this terminal, only with `verbose=true`: a
    client's error reaches the server as its reply anyway (and stops the run), and a stopped run would otherwise
    end in a burst of worker shutdown lines."""
    return logging.INFO if _verbose() else logging.ERROR


def _stop_ray(owned_temp_dir: str | None) -> None:
    """Shut Ray down and remove the temporary folder this run created. Ray's workers finish the task they are in
    before noticing that their raylet is gone (a minute for a client mid-round): they are this process's
    descendants, so they are stopped here instead of being left behind."""
    import ray

    if ray.is_initialized():
        workers = _descendants(os.getpid())
        ray.shutdown()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if owned_temp_dir:
        shutil.rmtree(owned_temp_dir, ignore_errors=True)


def _descendants(root: int) -> list[int]:
    """Process ids below `root` (Linux /proc; elsewhere none are known and Ray's own shutdown has to do)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def run_federation(server_app: ServerApp, client_app: ClientApp, num_clients: int, backend: Mapping[str, Any]) -> None:
    name = backend.get("name", "inprocess")
    if name == "inprocess":
        run_inprocess(server_app, client_app, num_clients)
    elif name == "ray":
        run_ray(server_app, client_app, num_clients, backend)
    else:
        raise ConfigError(f"backend.name={name!r} is unknown; choose inprocess or ray")
