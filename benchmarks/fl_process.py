"""Measuring a run from outside (benchmarks/fl_round.py): each measurement in a fresh Python process, the memory of
its whole process tree sampled from /proc while it runs, and medians over runs. Linux only.

Nothing here imports the project: the child process (`fl_round.py _one ...`) does.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("fl_round.py")  # what a spawned measurement runs
PAGE = os.sysconf("SC_PAGE_SIZE")
# The two ways the in-process backend trains a round's clients (issue 18): one at a time, the old path, or as cohorts.
COHORT = {"sequential": ["backend.cohort_size=1"], "cohort": []}


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (Ray's raylet, GCS and workers included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _pss(pid)
        stack.extend(children.get(pid, []))
    return total


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (a forked child's copy-on-write pages, Ray's shared-memory object store)
    are split between the processes sharing them, so a sum over processes counts each page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # no smaps_rollup (old kernels): resident pages, which may count shared pages twice
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def load1() -> float:
    return os.getloadavg()[0]


def child_env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLBENCH_CACHE", str(ROOT / ".cache" / "flbench"))
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def spawn(mode: str, overrides: list[str], threads: int | None, extra_env: dict[str, str] | None = None,
          what: str = "_one") -> dict[str, Any]:
    """Run one measurement in a fresh Python process; sample the process tree's memory while it runs."""
    env = child_env(threads, extra_env)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, str(SCRIPT), what, "--mode", mode, "--result", out.name, "--", *overrides]
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stderr_lines: list[str] = []
        reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
        reader.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} {overrides} failed:\n{''.join(stderr_lines[-30:])}")
        result = json.loads(Path(out.name).read_text())
    result["peak_tree_bytes"] = peak[0]
    result["peak_process_bytes"] = usage.ru_maxrss * 1024  # the run process itself (KiB on Linux)
    return result


def steady(results: list[dict[str, Any]]) -> float:
    """Median over runs of each run's median steady round (round 2 on; round 1 also encodes and warms up)."""
    return statistics.median(statistics.median(r["round_s"][1:] or r["round_s"]) for r in results)


def repeat(mode: str, overrides: list[str], repeats: int, threads: int | None) -> dict[str, Any]:
    before = load1()
    runs = [spawn(mode, overrides, threads) for _ in range(repeats)]
    return collect(mode, overrides, runs, before)


def collect(mode: str, overrides: list[str], runs: list[dict[str, Any]], before: float) -> dict[str, Any]:
    return {"mode": mode, "overrides": overrides, "round_s": steady(runs),
            "first_round_s": statistics.median(r["round_s"][0] for r in runs),
            "all_round_s": [[round(t, 3) for t in r["round_s"]] for r in runs],
            "peak_tree_gib": max(r["peak_tree_bytes"] for r in runs) / 2 ** 30,
            "peak_process_gib": max(r["peak_process_bytes"] for r in runs) / 2 ** 30,
            "load1_before": before, "load1_after": load1(), "history": runs[0]["history"]}


def same_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], tol: float = 1e-5) -> bool:
    keys = [k for k in a[-1] if k.startswith(("val/", "test/")) or k == "train/loss"]
    return len(a) == len(b) and all(abs(x.get(k, 0.0) - y.get(k, 0.0)) <= tol * max(1.0, abs(x.get(k, 0.0)))
                                    for x, y in zip(a, b) for k in keys)



def paired(overrides: list[str], repeats: int, threads: int | None,
           variants: dict[str, tuple[str, dict[str, str]]], what: str = "_one") -> dict[str, list[dict[str, Any]]]:
    """Runs of every variant (name: (mode, extra environment)) in turn, A B A B ...: slow spells of a shared machine
    hit both variants alike."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (mode, env) in variants.items():
            runs[name].append(spawn(mode, overrides, threads, env, what))
    return runs
