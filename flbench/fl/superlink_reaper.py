"""Stop the SuperLink that `flwr run` started for a local simulation, once the run that used it is over.

`flwr run .` (no SuperLink of the user's) starts a managed local SuperLink in the background and leaves it running
after the command returns (Flower's design: the next `flwr run` reuses it, and restarts it when it is gone). A
benchmark run should leave nothing behind, so the ServerApp hands this small watcher the SuperLink's pid: it waits
until the run's process has exited and no other run is active on that SuperLink for a few seconds, then sends it
SIGTERM (its SuperExec exits with it). Only Flower's managed local SuperLink is ever stopped — one started with
`--simulation` and a log file under `<FLWR_HOME>/local-superlink/` — never one a user started. Linux only (/proc);
`stop-local-superlink = false` in the run config keeps Flower's behaviour.

    python -m flbench.fl.superlink_reaper <superlink pid> <run pid>      (started by the ServerApp, detached)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("flbench")

IDLE_S = 3.0  # no run on the SuperLink for this long: stop it (a queued run starts within about a second)
RUN_PROGRAMS = ("flwr-simulation", "flwr-serverapp")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def is_managed_superlink(pid: int) -> bool:
    command = _cmdline(pid)
    return (any(Path(part).name == "flower-superlink" for part in command[:2]) and "--simulation" in command
            and any(part.endswith(os.path.join("local-superlink", "superlink.log")) for part in command))


def managed_superlink(pid: int | None = None) -> int | None:
    """The pid of Flower's managed local SuperLink among the ancestors of `pid` (default: this process)."""
    current = os.getppid() if pid is None else pid
    while current > 1:
        if is_managed_superlink(current):
            return current
        stat = _stat(current)
        if stat is None:
            return None
        current = stat[1]
    return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        stat = _stat(pid)
        if stat is None:
            return False
        pid = stat[1]
        if pid == ancestor:
            return True
    return False


def busy(superlink: int) -> bool:
    """Some run (a simulation or ServerApp process) is active under the SuperLink."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            command = _cmdline(int(entry.name))
            if any(Path(part).name in RUN_PROGRAMS for part in command[:2]) and \
                    _descends_from(int(entry.name), superlink):
                return True
    return False


def stop_managed_superlink_later() -> None:
    """From the ServerApp: hand the managed local SuperLink (if that is what runs us) to a detached watcher."""
    superlink = managed_superlink() if sys.platform.startswith("linux") else None
    if superlink is None:
        return
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    subprocess.Popen([sys.executable, "-m", "flbench.fl.superlink_reaper", str(superlink), str(os.getpid())],
                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    log.info("deployment: the local SuperLink `flwr run` started (pid %d) stops once this run is over "
             "(run config stop-local-superlink=false keeps it running)", superlink)


def reap(superlink: int, run_pid: int, idle_s: float = IDLE_S, timeout_s: float = 3600.0) -> bool:
    """Wait for `run_pid` to end and the SuperLink to be idle, then stop it; True when it was stopped."""
    deadline = time.monotonic() + timeout_s
    while alive(run_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    idle_since = time.monotonic()
    while alive(superlink) and is_managed_superlink(superlink):
        if busy(superlink):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= idle_s:
            os.kill(superlink, signal.SIGTERM)
            for _ in range(100):
                if not alive(superlink):
                    return True
                time.sleep(0.1)
            os.kill(superlink, signal.SIGKILL)
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return False


if __name__ == "__main__":
    reap(int(sys.argv[1]), int(sys.argv[2]))
