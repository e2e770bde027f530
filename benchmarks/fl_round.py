"""Federated-round benchmarks (issue 9): what a round costs, how much of it is framework, what caching saves, and
how much memory a large federation needs.

Figures (each the median over the steady rounds, round 2 on, of several runs, every run in a fresh process):

- seconds per round of CoOp with 10 clients on the `inprocess` and `ray` backends, and for a bare PyTorch loop that
  performs exactly the same local steps (same seeds, `engine.train_local`, the same FedAvg mean and server
  evaluation) with no Flower at all: the floor. Framework overhead = inprocess / floor − 1 (target ≤ 10 %). The bare
  loop also checks that it reproduced the federation's metrics, so it really did the same work;
- seconds per round with cached vs uncached frozen image features (`cache_features`; target ≥ 5×);
- peak memory (proportional set size summed over the run's whole process tree — Ray's raylet, GCS and workers
  included — sampled every 0.2 s from /proc, plus the run process's own peak RSS from the kernel) of 100 clients at
  10 % participation (target ≤ 4 GB);

for the tiny CLIP on the synthetic suite (`--backbone tiny`, the default experiment) and for a random-weight
ViT-B/16 at 224 px with a few images per client (`--backbone vit_b16`).

    python benchmarks/fl_round.py rounds --backbone tiny --repeats 3 --rounds 5
    python benchmarks/fl_round.py cache --backbone tiny
    python benchmarks/fl_round.py memory --backbone tiny
    python benchmarks/fl_round.py all --backbone vit_b16 --repeats 2 --rounds 3 --out /tmp/vit.json

Linux only (/proc). Timings are only meaningful on a quiet machine: the script records the 1-minute load average
before and after each figure. Needs the package's caches (FLBENCH_CACHE); the first ViT-B/16 run renders the
224-px synthetic images once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")

COMMON = ["logger.mode=disabled", "checkpoint.every=0", "force=true"]
# The default experiment: CoOp, FedAvg, 10 clients (one rendering domain each), the tiny CLIP.
TINY: list[str] = []
# A random-weight ViT-B/16 at 224 px: 32 classes (patterns family), two domains, a few images per client.
VIT = ["backbone=vit_b16", "backbone.pretrained=null", "dataset.image_size=null", "dataset.family=patterns",
       "dataset.domains=[photo,sketch]", "dataset.train_per_class=2", "dataset.val_per_class=1",
       "dataset.test_per_class=1", "shots=2"]
BACKBONES = {"tiny": TINY, "vit_b16": VIT}


# --- one measurement, in a fresh process ---------------------------------------------------------------------------
def compose(overrides: list[str]) -> dict[str, Any]:
    from flbench.cli import compose as compose_config

    return compose_config(overrides, job_name="bench")


def round_times(history: list[dict[str, Any]]) -> list[float]:
    """Seconds of rounds 1..R from the rows' cumulative time stamps (row 0 is the initial evaluation)."""
    stamps = [row["time_s"] for row in history]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_federation(cfg: dict[str, Any]) -> dict[str, Any]:
    from flbench.run import run

    record = run(cfg)
    return {"round_s": round_times(record["history"]), "history": record["history"]}


def run_bare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The floor: the federation's local steps, FedAvg mean and server evaluation as a plain loop, same seeds."""
    import torch

    from flbench.engine import train_local
    from flbench.experiment import derive_seed, get_experiment

    seed, rounds = int(cfg["seed"]), int(cfg["num_rounds"])
    started = time.perf_counter()
    experiment = get_experiment(cfg)
    experiment.zeroshot_metrics()  # as run() does before the federation (not timed per round)
    state = experiment.fresh().shared_state()
    history = [state]
    rows = [{"round": 0, **experiment.evaluate_state(history, 0, with_personal=True)}]
    times = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        states, counts, losses = [], [], []
        for pid in range(experiment.num_nodes):
            torch.manual_seed(derive_seed(seed, rnd, pid, 1))
            method = experiment.fresh()
            method.load_partial(state)
            generator = torch.Generator().manual_seed(derive_seed(seed, rnd, pid, 2))
            result = train_local(method, experiment.client_images(pid), cfg["train"], generator,
                                 cached=experiment.client_cache(pid))
            states.append(method.shared_state())
            counts.append(result.num_examples)
            losses.append(result.loss)
        total = sum(counts)
        state = {k: sum(s[k] * (n / total) for s, n in zip(states, counts)) for k in states[0]}
        history.append(state)
        metrics = experiment.evaluate_state(history, rnd)
        times.append(time.perf_counter() - t0)
        rows.append({"round": rnd, "train/loss": sum(l * n for l, n in zip(losses, counts)) / total, **metrics})
    return {"round_s": times, "history": rows, "total_s": time.perf_counter() - started}


def measure_one(mode: str, overrides: list[str]) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="flbench-bench-") as results:
        backend = [] if mode == "bare" else [f"backend={mode}"]
        cfg = compose([*overrides, *backend, f"results_dir={results}"])
        out = run_bare(cfg) if mode == "bare" else run_federation(cfg)
    out["history"] = [{k: v for k, v in row.items() if k != "time_s"} for row in out["history"]]
    return out


# --- the parent: fresh processes, memory sampling, medians ------------------------------------------------------
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


def spawn(mode: str, overrides: list[str], threads: int | None) -> dict[str, Any]:
    """Run one measurement in a fresh Python process; sample the process tree's memory while it runs."""
    env = dict(os.environ)
    env.setdefault("FLBENCH_CACHE", str(ROOT / ".cache" / "flbench"))
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [sys.executable, __file__, "_one", "--mode", mode, "--result", out.name, "--", *overrides]
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


def bench_rounds(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    overrides = [*COMMON, *base, f"num_rounds={args.rounds}"]
    out = {mode: repeat(mode, overrides, args.repeats, args.threads) for mode in args.modes}
    if "bare" in out and "inprocess" in out:
        out["bare_reproduces_inprocess"] = same_metrics(out["bare"]["history"], out["inprocess"]["history"])
        out["overhead_inprocess"] = out["inprocess"]["round_s"] / out["bare"]["round_s"] - 1
    if "bare" in out and "ray" in out:
        out["overhead_ray"] = out["ray"]["round_s"] / out["bare"]["round_s"] - 1
    return out


def bench_cache(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    overrides = [*COMMON, *base, f"num_rounds={args.rounds}"]
    cached = repeat("inprocess", [*overrides, "cache_features=true"], args.repeats, args.threads)
    uncached = repeat("inprocess", [*overrides, "cache_features=false"], args.repeats, args.threads)
    return {"cached": cached, "uncached": uncached, "speedup": uncached["round_s"] / cached["round_s"],
            "identical_metrics": same_metrics(cached["history"], uncached["history"], tol=0.0)}


def bench_memory(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    overrides = [*COMMON, *base, f"num_clients={args.clients}", f"protocol.fraction={args.fraction}",
                 f"num_rounds={args.memory_rounds}"]
    return {mode: repeat(mode, overrides, 1, args.threads) for mode in args.memory_modes}


def summary(name: str, result: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and "round_s" in value:
            lines.append(f"{name} {key:10s} {value['round_s']:8.3f} s/round (first {value['first_round_s']:.2f} s) "
                         f"peak tree {value['peak_tree_gib']:.2f} GiB, process {value['peak_process_gib']:.2f} GiB, "
                         f"load {value['load1_before']:.2f}->{value['load1_after']:.2f}")
        elif not isinstance(value, dict):
            lines.append(f"{name} {key} = {value:.3f}" if isinstance(value, float) else f"{name} {key} = {value}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["rounds", "cache", "memory", "all", "_one"])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="bare,inprocess,ray", type=lambda s: s.split(","))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--memory-modes", default="inprocess,ray", type=lambda s: s.split(","))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the measured processes")
    parser.add_argument("--out", default=None, help="write every figure as JSON here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1:]  # extra Hydra overrides for every run, after --
    if args.what == "_one":
        Path(args.result).write_text(json.dumps(measure_one(args.mode, args.overrides)))
        return
    base = [*BACKBONES[args.backbone], *args.overrides]
    benches = {"rounds": bench_rounds, "cache": bench_cache, "memory": bench_memory}
    chosen = list(benches) if args.what == "all" else [args.what]
    results: dict[str, Any] = {"backbone": args.backbone, "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
    for name in chosen:
        results[name] = benches[name](base, args)
        print("\n".join(summary(name, results[name])), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
