"""`python -m flbench`: Hydra composes conf/ into one config and runs it (or a sweep of them with --multirun).

The door is the one researchers type: `python -m flbench +experiment=<name>` (and `experiment=<name>`, which means the
same here). Whatever goes wrong that the user can act on is one line on stderr and an exit code — 2 for bad input,
1 for a failed run, 130/143 for SIGINT/SIGTERM — with no traceback and nothing written.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from flbench.errors import FlbenchError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("flbench")

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def normalise_overrides(overrides: Sequence[str]) -> list[str]:
    """`+experiment=x` as `experiment=x`. The defaults list holds `experiment: null` (so that `experiment=x` works,
    Hydra's own advice), and Hydra refuses to append a second value to it; both spellings mean the same here."""
    return [o.lstrip("+") if o.lstrip("+").startswith("experiment=") else o for o in overrides]


def compose(overrides: Sequence[str] = (), job_name: str = "flbench") -> dict[str, Any]:
    """The resolved config `python -m flbench <overrides>` would run, as a plain dict (for scripts, tests and the
    deployment engine, which run experiments without Hydra's command line)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name=job_name):
        cfg = hydra_compose(config_name="config", overrides=normalise_overrides(overrides))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return resolved


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    quiet = logging.INFO if verbose else logging.ERROR
    for name in ("flwr", "ray", "urllib3", "filelock", "wandb", "alembic"):
        logging.getLogger(name).setLevel(quiet)
    os.environ["FLBENCH_VERBOSE"] = "1" if verbose else "0"  # for loggers that reset their level on import (ray)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (finally blocks stop Ray, close W&B), then exit 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    for other in SIGNAL_EXIT:  # a second signal while unwinding must not start a second unwinding
        signal.signal(other, signal.SIG_IGN)
    # Stopping Flower's engine mid-round makes its worker threads log each dead Ray actor's traceback (80 lines);
    # the interruption is reported in one line instead.
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM both become `Interrupted` in the main thread (SIGTERM's default would kill the process
    without running a single finally block: Ray agents and temporary folders would be left behind)."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in SIGNAL_EXIT}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def fail(error: BaseException, prog: str = "flbench") -> None:
    """One line on stderr and the error's exit code; no traceback."""
    if isinstance(error, KeyboardInterrupt):
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"{prog}: interrupted ({signal.Signals(signum).name}): no record written; the last checkpoint (if any) "
              "is kept, so the same command resumes from it", file=sys.stderr)
        exit_now(SIGNAL_EXIT.get(signum, 130))
    message = " ".join(str(error).split())
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(getattr(error, "exit_code", 1))


def exit_now(code: int, grace_s: float = 2.0) -> None:
    """Exit with `code` once cleanup has run. Threads of a simulation engine that was stopped mid-round (Flower's
    worker pool blocks in `ray.get` for actors that no longer exist) would keep the interpreter from exiting: give
    them `grace_s` to finish, then leave without waiting for them."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main_from_config(cfg: DictConfig) -> dict:
    """Resolve, run, print the summary table. Bad input: one line on stderr, exit code 2, nothing written."""
    from flbench.run import run
    from flbench.summary import job_banner, print_summary  # after logging is configured: heavy imports follow

    setup_logging(bool(cfg.get("verbose", False)))
    try:
        with stop_on_signals():
            resolved = OmegaConf.to_container(cfg, resolve=True)
            if banner := job_banner(resolved):  # "job 3/24: …" in a multirun
                log.info(banner)
            if resolved.get("cache_dir"):
                os.environ["FLBENCH_CACHE"] = str(resolved["cache_dir"])
            record = run(resolved)
    except (FlbenchError, KeyboardInterrupt) as error:
        fail(error)
    print_summary(record)
    return record


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    main_from_config(cfg)


def main() -> None:
    sys.argv[1:] = normalise_overrides(sys.argv[1:])
    _hydra_main()
