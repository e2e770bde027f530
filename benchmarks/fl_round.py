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

Text-length trimming (issue 17, flbench/backbones/text.py), old vs new in one call, runs paired (trimmed, untrimmed,
trimmed, ...) so that drift of a shared machine hits both alike; "untrimmed" is the same code with
FLBENCH_TRIM_TEXT=0:

- `trim`: seconds per round trimmed and untrimmed, cached and uncached; the speed-ups; the cache speed-up with
  trimming; whether the metrics are identical (accuracies exactly, losses to 1e-5). `--switch prefix` compares
  shared prompt prefixes on and off instead (FLBENCH_SHARE_PREFIX, both trimmed), `--switch pack` packed rows and the
  pooled last block on and off (FLBENCH_PACK_TEXT, both trimmed and sharing), `--switch text` all three shortcuts
  against none; `experiment` takes the same switch, and `--switch store` (the feature store on and off) or
  `--switch memo` (the evaluation memo of class features on and off), `--switch all` (everything on against
  everything off);
- `experiment`: the default experiment (`python -m flbench`) under /usr/bin/time -v, warm (the caches given) and
  cold (an empty FLBENCH_CACHE per run), trimmed and untrimmed: wall seconds and peak RSS;
- `bucket`: whether one call per prompt length (each trimmed to its own length) beats one trimmed call;
- `pretrain`: tiny-CLIP pretraining alone (corpus rendering timed apart), the build as it is ("new") and as it was
  before issue 17 ("old": untrimmed text, unfused AdamW, every caption batch tokenised), same seed and steps.

Cohort training (issue 18, flbench/engine.py train_cohort), old vs new in one call: `cohort` runs the in-process
federation paired, sequential (`backend.cohort_size=1`: one client at a time, the old path) then cohort (the
default), for 10 clients and for 100 clients at 10 %: seconds per round, peak memory, whether the metrics are the
same (accuracies exactly, losses to 1e-5), and the round's achieved text-tower FLOP/s — the text tower's forward and
backward FLOPs of all the round's local steps (counted once per client step with torch's FlopCounterMode, times the
client steps counted in the run) over the round's seconds — as a fraction of a plain fp32 torch.matmul (2048³)
measured in the same process (the physical limit of this loop on the machine).

    python benchmarks/fl_round.py cohort --backbone tiny --repeats 3 --rounds 4 --out /tmp/cohort_tiny.json

`phases` (benchmarks/round_phases.py) splits the training steps of a cached round, sequential and cohort, into the
text tower's attention cores, its MLPs and the rest, each timed forward and backward.

    python benchmarks/fl_round.py rounds --backbone tiny --repeats 3 --rounds 5
    python benchmarks/fl_round.py cache --backbone tiny
    python benchmarks/fl_round.py memory --backbone tiny
    python benchmarks/fl_round.py all --backbone vit_b16 --repeats 2 --rounds 3 --out /tmp/vit.json
    python benchmarks/fl_round.py trim --backbone vit_b16 --repeats 2 --rounds 3 --out /tmp/vit_trim.json
    python benchmarks/fl_round.py experiment --repeats 3 --out /tmp/experiment.json
    python benchmarks/fl_round.py pretrain --models tiny --repeats 2
    python benchmarks/fl_round.py bucket --models tiny,vit_b16 --repeats 20

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
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:  # run as a script or imported by gpu_check.py
    sys.path.insert(0, str(ROOT / "benchmarks"))

from fl_process import COHORT, collect, load1, paired, repeat, same_metrics  # noqa: E402
from round_phases import bench_phases, measure_phases  # noqa: E402
from text_bucket import bench_bucket  # noqa: E402

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


# --- text-length trimming, old vs new (issue 17) --------------------------------------------------------------------
TRIM = {"trimmed": {"FLBENCH_TRIM_TEXT": "1"}, "untrimmed": {"FLBENCH_TRIM_TEXT": "0"}}
# Shared prompt prefixes (flbench/backbones/text.py: encode_shared_prefix), both variants trimmed.
PREFIX = {"shared": {"FLBENCH_SHARE_PREFIX": "1"}, "unshared": {"FLBENCH_SHARE_PREFIX": "0"}}
# Packed row tokens and a pooled last block inside the shared-prefix pass, both variants trimmed and sharing; and
# all the text shortcuts together against none (the text side before issue 17).
PACK = {"packed": {"FLBENCH_PACK_TEXT": "1"}, "padded": {"FLBENCH_PACK_TEXT": "0"}}
TEXT = {"shortcuts": {"FLBENCH_TRIM_TEXT": "1", "FLBENCH_SHARE_PREFIX": "1", "FLBENCH_PACK_TEXT": "1"},
        "full": {"FLBENCH_TRIM_TEXT": "0", "FLBENCH_SHARE_PREFIX": "0", "FLBENCH_PACK_TEXT": "0"}}
# The feature store (flbench/features.py): a process reads the frozen image features earlier runs stored, or
# encodes them; and everything of issue 17 together against none of it.
STORE = {"stored": {"FLBENCH_FEATURE_STORE": "1"}, "encoded": {"FLBENCH_FEATURE_STORE": "0"}}
# The evaluation memo (flbench/algorithms/prompting.py: text_features_memo): class features encoded once per
# evaluation, or once per batch and split.
MEMO = {"memo": {"FLBENCH_TEXT_MEMO": "1"}, "no memo": {"FLBENCH_TEXT_MEMO": "0"}}
ALL = {"all": {**TEXT["shortcuts"], **STORE["stored"], **MEMO["memo"]},
       "none": {**TEXT["full"], **STORE["encoded"], **MEMO["no memo"]}}
SWITCHES = {"trim": TRIM, "prefix": PREFIX, "pack": PACK, "text": TEXT, "store": STORE, "memo": MEMO, "all": ALL}


def accuracies_identical(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    keys = [k for k in a[-1] if k.startswith(("val/", "test/"))]
    return len(a) == len(b) and all(x.get(k) == y.get(k) for x, y in zip(a, b) for k in keys)


def loss_gap(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Largest relative difference of the per-round training loss."""
    gaps = [abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(a, b) for k in x if k.endswith("loss")]
    return max(gaps, default=0.0)


def bench_trim(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    overrides = [*COMMON, *base, f"num_rounds={args.rounds}"]
    variants = SWITCHES[args.switch]
    out: dict[str, Any] = {}
    for cache in args.caches:
        name = "cached" if cache == "true" else "uncached"
        before = load1()
        runs = paired([*overrides, f"cache_features={cache}"], args.repeats, args.threads,
                      {v: ("inprocess", env) for v, env in variants.items()})
        (new_name, new), (old_name, old) = ((v, collect("inprocess", overrides, runs[v], before)) for v in variants)
        out[f"{name} {new_name}"], out[f"{name} {old_name}"] = new, old
        out[f"{name}: speed-up, {new_name} vs {old_name}"] = old["round_s"] / new["round_s"]
        out[f"{name}: accuracies identical"] = accuracies_identical(new["history"], old["history"])
        out[f"{name}: largest relative loss difference"] = loss_gap(new["history"], old["history"])
    if len(args.caches) == 2:
        for v in variants:
            out[f"cache speed-up, {v}"] = out[f"uncached {v}"]["round_s"] / out[f"cached {v}"]["round_s"]
    return out


def time_experiment(overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -m flbench` under GNU time: wall seconds and the peak RSS it reports."""
    with tempfile.TemporaryDirectory(prefix="flbench-exp-") as results, \
            tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        cmd = ["/usr/bin/time", "-v", "-o", report.name, sys.executable, "-m", "flbench", f"results_dir={results}",
               *overrides]
        subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        fields = dict(line.strip().rsplit(": ", 1) for line in report.read().splitlines() if ": " in line)
    clock = [float(part) for part in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
    wall = sum(v * 60 ** i for i, v in enumerate(reversed(clock)))
    return {"wall_s": wall, "peak_rss_gib": int(fields["Maximum resident set size (kbytes)"]) / 2 ** 20}


def bench_experiment(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The default experiment as `make run` runs it: warm (caches as they are) and cold (an empty cache per run)."""
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")  # as `make run`
    env.setdefault("FLBENCH_CACHE", str(ROOT / ".cache" / "flbench"))
    out: dict[str, Any] = {}
    variants = SWITCHES[args.switch]
    for kind in args.kinds:
        before, runs = load1(), {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant, switch in variants.items():
                with tempfile.TemporaryDirectory(prefix="flbench-cold-") as empty:
                    cache = {"FLBENCH_CACHE": empty} if kind == "cold" else {}
                    runs[variant].append(time_experiment(args.overrides, {**env, **switch, **cache}))
        for variant, timed in runs.items():
            walls = [r["wall_s"] for r in timed]
            out[f"{kind} {variant}"] = {"wall_s": walls, "median_s": statistics.median(walls),
                                        "peak_rss_gib": max(r["peak_rss_gib"] for r in timed)}
        out[f"{kind}: load {before:.2f}->{load1():.2f}"] = ""
    return out


def measure_pretrain(variant: str, model_name: str) -> dict[str, Any]:
    """One tiny-CLIP pretraining, corpus rendering timed apart; "old" = the build before issue 17."""
    import open_clip
    import torch

    from flbench.backbones import pretrain, tiny
    from flbench.backbones.text import text_trimming

    settings = {**pretrain.DEFAULT_PRETRAIN, **pretrain.MODEL_PRETRAIN.get(model_name, {})}
    size = int(tiny.TINY_CONFIGS[model_name]["vision_cfg"]["image_size"])
    started = time.perf_counter()
    corpus = pretrain.pretraining_corpus(settings["corpus"], suite_seed=settings["corpus_seed"], image_size=size)
    render_s = time.perf_counter() - started
    pretrain.pretraining_corpus = lambda *_, **__: corpus
    if variant == "old":
        pretrain._optimizer = lambda model, lr, wd: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
        pretrain._Tokens = lambda length: open_clip.SimpleTokenizer(context_length=length)
    torch.manual_seed(int(settings["seed"]))
    model = open_clip.CLIP(**tiny.TINY_CONFIGS[model_name])
    started = time.perf_counter()
    with text_trimming(variant == "new"):
        pretrain.pretrain_tiny_clip(model, **settings)
    train_s = time.perf_counter() - started
    return {"render_s": render_s, "train_s": train_s, "steps": settings["steps"],
            "steps_per_s": settings["steps"] / train_s}


def bench_pretrain(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model_name in args.models:
        before = load1()
        runs = paired([model_name], args.repeats, args.threads, {v: (v, {}) for v in ("new", "old")}, "_pretrain")
        for variant, timed in runs.items():
            train = [r["train_s"] for r in timed]
            out[f"{model_name} {variant}"] = {
                "train_s": train, "median_train_s": statistics.median(train),
                "steps_per_s": timed[0]["steps"] / statistics.median(train),
                "median_render_s": statistics.median(r["render_s"] for r in timed),
                "peak_process_gib": max(r["peak_process_bytes"] for r in timed) / 2 ** 30}
        out[f"{model_name}: speed-up"] = out[f"{model_name} old"]["median_train_s"] / \
            out[f"{model_name} new"]["median_train_s"]
        out[f"{model_name}: load {before:.2f}->{load1():.2f}"] = ""
    return out


# --- cohort training, old vs new (issue 18) --------------------------------------------------------------------------
def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """The best of `repeats` fp32 torch.matmul calls of size³, in FLOP/s: this process's attainable peak."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def text_flops_per_client_step(method: Any) -> int:
    """FLOPs of the text tower's forward and backward (to the prompt) over one client's class prompts: what every
    local step of a CoOp-family client runs, alone or in a cohort (CoOp's context; other methods: not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    ctx = method.ctx.detach().clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        text = method.prompt.encode(ctx)
        text.backward(torch.ones_like(text))
    return int(counter.get_total_flops())


def measure_cohort(variant: str, overrides: list[str]) -> dict[str, Any]:
    """One federation, sequential or as cohorts, counting client steps; then the text FLOPs and the matmul peak."""
    from flbench import engine
    from flbench.experiment import _PROCESS_EXPERIMENTS

    client_steps = [0]
    gradients = engine._gradients

    def counted(method: Any, members: Any, batches: Any) -> Any:
        client_steps[0] += len(members)
        return gradients(method, members, batches)

    engine._gradients = counted
    out = measure_one("inprocess", [*overrides, *COHORT[variant]])
    experiment = next(iter(_PROCESS_EXPERIMENTS.values()))
    out["client_steps_per_round"] = client_steps[0] / max(len(out["round_s"]), 1)
    out["text_flops_per_client_step"] = text_flops_per_client_step(experiment.fresh())
    out["matmul_flops_per_s"] = matmul_flops_per_s()
    return out


def bench_cohort(base: list[str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients, fraction in ((10, 1.0), (args.clients, args.fraction)):
        label = f"{clients} clients at {fraction:.0%}"
        overrides = [*COMMON, *base, f"num_rounds={args.rounds}", f"num_clients={clients}",
                     f"protocol.fraction={fraction}"]
        before = load1()
        runs = paired(overrides, args.repeats, args.threads, {v: (v, {}) for v in COHORT}, "_cohort")
        results = {v: collect("inprocess", overrides, runs[v], before) for v in COHORT}
        for variant, result in results.items():
            steps = statistics.median(r["client_steps_per_round"] for r in runs[variant])
            flops = runs[variant][0]["text_flops_per_client_step"] * steps
            peak = statistics.median(r["matmul_flops_per_s"] for r in runs[variant])
            result.update(text_gflop_per_round=flops / 1e9, text_gflops=flops / result["round_s"] / 1e9,
                          matmul_peak_gflops=peak / 1e9, fraction_of_peak=flops / result["round_s"] / peak)
            out[f"{label}: {variant}"] = result
        sequential, cohort = results["sequential"], results["cohort"]
        out[f"{label}: speed-up"] = sequential["round_s"] / cohort["round_s"]
        out[f"{label}: peak memory cohort / sequential"] = cohort["peak_process_gib"] / sequential["peak_process_gib"]
        out[f"{label}: accuracies identical"] = accuracies_identical(cohort["history"], sequential["history"])
        out[f"{label}: largest relative loss difference"] = loss_gap(cohort["history"], sequential["history"])
        out[f"{label}: text tower, sequential / cohort"] = (
            f"{sequential['text_gflops']:.2f} / {cohort['text_gflops']:.2f} GFLOP/s of a {cohort['text_gflop_per_round']:.1f}"
            f" GFLOP round = {sequential['fraction_of_peak']:.1%} / {cohort['fraction_of_peak']:.1%} of the "
            f"{cohort['matmul_peak_gflops']:.1f} GFLOP/s matmul peak")
    return out


def summary(name: str, result: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and "round_s" in value:
            lines.append(f"{name} {key:10s} {value['round_s']:8.3f} s/round (first {value['first_round_s']:.2f} s) "
                         f"peak tree {value['peak_tree_gib']:.2f} GiB, process {value['peak_process_gib']:.2f} GiB, "
                         f"load {value['load1_before']:.2f}->{value['load1_after']:.2f}")
        elif isinstance(value, dict) and "median_s" in value:
            walls = ", ".join(f"{w:.1f}" for w in value["wall_s"])
            lines.append(f"{name} {key:16s} {value['median_s']:8.2f} s (runs {walls}) "
                         f"peak RSS {value['peak_rss_gib']:.2f} GiB")
        elif isinstance(value, dict) and "median_train_s" in value:
            trains = ", ".join(f"{t:.1f}" for t in value["train_s"])
            lines.append(f"{name} {key:14s} {value['median_train_s']:8.2f} s training "
                         f"({value['steps_per_s']:.2f} step/s; runs {trains}), corpus rendering "
                         f"{value['median_render_s']:.1f} s, peak {value['peak_process_gib']:.2f} GiB")
        elif not isinstance(value, dict):
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            lines.append(f"{name} {key} = {text}" if text else f"{name} {key}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["rounds", "cache", "memory", "all", "trim", "experiment", "pretrain",
                                         "bucket", "cohort", "phases", "_one", "_pretrain", "_cohort", "_phases"])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default="bare,inprocess,ray", type=lambda s: s.split(","))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--memory-modes", default="inprocess,ray", type=lambda s: s.split(","))
    parser.add_argument("--caches", default="true,false", type=lambda s: s.split(","), help="trim: cache_features")
    parser.add_argument("--switch", choices=sorted(SWITCHES), default="trim",
                        help="trim, experiment: what old vs new switches (a text shortcut, the store, the memo, ...)")
    parser.add_argument("--kinds", default="warm,cold", type=lambda s: s.split(","), help="experiment: warm,cold")
    parser.add_argument("--models", default="tiny", type=lambda s: s.split(","), help="pretrain: tiny,tiny-vit")
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
    if args.what == "_cohort":
        Path(args.result).write_text(json.dumps(measure_cohort(args.mode, args.overrides)))
        return
    if args.what == "_phases":
        Path(args.result).write_text(json.dumps(measure_phases(args.mode, args.overrides)))
        return
    if args.what == "_pretrain":
        Path(args.result).write_text(json.dumps(measure_pretrain(args.mode, args.overrides[0])))
        return
    base = [*BACKBONES[args.backbone], *args.overrides]
    benches = {"rounds": bench_rounds, "cache": bench_cache, "memory": bench_memory, "trim": bench_trim,
               "experiment": bench_experiment, "pretrain": bench_pretrain, "bucket": bench_bucket,
               "cohort": bench_cohort, "phases": lambda base, args: bench_phases([*COMMON, *base], args)}
    chosen = ["rounds", "cache", "memory"] if args.what == "all" else [args.what]
    results: dict[str, Any] = {"backbone": args.backbone, "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
    for name in chosen:
        results[name] = benches[name](base, args)
        print("\n".join(summary(name, results[name])), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
