"""One GPU check of flbench, every output under one folder, one summary (driven by benchmarks/gpu_check.sh).

Steps, each in its own process with a time limit (steps 2 and 3 side by side; the limits bound the whole check at
470 s, under 8 minutes on one H100/H200; the limits are estimates, not measured, and a step that runs out says so):

1. environment    GPU model, driver, torch / triton / CUDA / Python versions
2. kernel_tests   tests/test_kernels.py + tests/test_kernels_compile.py with pytest, compiled kernels (skipped, and
                  said so, when pytest is not installed: step 3 covers the same ground without it)
3. kernel_check   benchmarks/kernel_check.py: compiled kernels vs the fp32 reference at the towers' sizes, every
                  autotuning candidate, both dQ paths
4. attention      benchmarks/attention.py: the kernel and the model's RoutedKVAttention vs dense/GQA/scatter/Flex
5. experiment     the default experiment (python -m flbench: CoOp, FedAvg, 10 clients, tiny CLIP) with
                  device=cuda precision=bf16
6. fl_round       benchmarks/fl_round.py rounds on a random-weight ViT-B/16 at 224 px, device=cuda precision=bf16

``--dry-run`` (CPU, seconds): the same steps with everything a CPU can check — versions; the kernel tests collected;
kernel_check and the attention benchmark on tiny shapes in the Triton interpreter; the experiment's and fl_round's
configs composed and validated (device=cpu in place of cuda), fl_round's command line parsed. Exit status 0 when
every step passed (or was skipped with its reason), 1 otherwise. Needs only torch, triton and this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Seconds per step on the GPU. The two correctness steps run side by side (compiling Triton kernels is most of their
# time, single-threaded per process), so the check's wall time is bounded by 10 + 150 + 150 + 80 + 80 = 470 s.
LIMITS = {"environment": 10, "kernel_tests": 150, "kernel_check": 150, "attention": 150, "experiment": 80,
          "fl_round": 80}
CONCURRENT = ("kernel_tests", "kernel_check")


def wall_bound(steps=tuple(LIMITS)) -> float:
    """Longest the chosen steps can take: the concurrent pair counts once."""
    together = [LIMITS[s] for s in steps if s in CONCURRENT]
    return sum(LIMITS[s] for s in steps if s not in CONCURRENT) + max(together, default=0)
EXPERIMENT = ["precision=bf16", "logger=none", "checkpoint.every=0", "force=true"]
FL_ROUND = ["rounds", "--backbone", "vit_b16", "--repeats", "1", "--rounds", "3", "--modes", "bare,inprocess"]


def run_step(name: str, cmd: list[str], out: Path, limit: float, env: dict | None = None) -> dict:
    """Run ``cmd`` with a time limit, its output in <out>/<name>.log; the step's status and seconds."""
    log = out / f"{name}.log"
    started = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=fh,
                                  stderr=subprocess.STDOUT, timeout=limit)
            status = "pass" if proc.returncode == 0 else f"fail (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout ({limit:.0f} s)"
    return {"step": name, "status": status, "seconds": round(time.monotonic() - started, 1),
            "command": " ".join(cmd), "log": log.name, "figures": {}}


def tail(path: Path, n: int = 6) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " / ".join(lines[-n:])


# --- steps ---------------------------------------------------------------------------------------------------------
def environment(out: Path, dry: bool) -> dict:
    import torch

    figures = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        figures["triton"] = triton.__version__
    except ImportError:
        figures["triton"] = "not installed"
    if torch.cuda.is_available():
        figures["gpu"] = torch.cuda.get_device_name()
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=LIMITS["environment"])
            figures["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            figures["nvidia_smi"] = f"unavailable: {exc}"
    ok = figures["triton"] != "not installed" and (dry or figures["cuda_available"])
    status = "pass" if ok else "fail (no CUDA device)" if not figures["cuda_available"] else "fail (no triton)"
    return {"step": "environment", "status": status, "seconds": 0.0, "figures": figures}


def kernel_tests(out: Path, dry: bool, limit: float) -> dict:
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"step": "kernel_tests", "status": "skipped (pytest is not installed; kernel_check covers the kernels)",
                "seconds": 0.0, "figures": {}}
    files = ["tests/test_kernels.py", "tests/test_kernels_compile.py"]
    cmd = [PY, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider"] + (["--collect-only"] if dry else [])
    # Autotuning every test's shape would dominate the step; kernel_check runs every candidate instead.
    result = run_step("kernel_tests", cmd, out, limit, env={"FLBENCH_KERNEL_AUTOTUNE": "0"})
    text = (out / "kernel_tests.log").read_text(errors="replace")
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)
    result["figures"] = {kind: int(n) for n, kind in found}
    if dry:  # --collect-only -q prints "file: count" per test file
        result["figures"]["collected"] = sum(int(n) for n in re.findall(r"^tests/\S+: (\d+)$", text, re.M))
        result["note"] = "dry run: tests collected, not run (CI runs them in the interpreter)"
    return result


def kernel_check(out: Path, dry: bool, limit: float) -> dict:
    path = out / "kernel_check.json"
    cmd = [PY, "benchmarks/kernel_check.py", "--out", str(path)] + (["--dry"] if dry else [])
    result = run_step("kernel_check", cmd, out, limit)
    if path.exists():
        data = json.loads(path.read_text())
        result["figures"] = {k: data[k] for k in ("device", "runs", "failed", "worst_rel_err", "seconds")}
    return result


def attention(out: Path, dry: bool, limit: float) -> dict:
    folder = out / "attention"
    budget = max(limit - 30, 10)  # its own budget ends the rows; the step's limit is the backstop
    extra = ["--cpu-smoke", "--quick", "--shapes", "text", "--reps", "0"] if dry else []
    cmd = [PY, "benchmarks/attention.py", "--out-dir", str(folder), "--budget-s", f"{budget:.0f}", *extra]
    result = run_step("attention", cmd, out, limit)
    if (folder / "attention.json").exists():
        rows = json.loads((folder / "attention.json").read_text())["rows"]
        result["figures"] = {"rows": len(rows), "checks_passed": sum(r.get("check", "").startswith("pass") for r in rows),
                             "checks_failed": sum(r.get("check", "").startswith("FAIL") for r in rows),
                             "not_measured": sum("check" not in r for r in rows)}
        md = (folder / "attention.md").read_text()
        targets = md.split("## Targets", 1)[1].splitlines()[2:] if "## Targets" in md else []
        result["targets"] = [line for line in targets if line.startswith("- ")]
    return result


def _compose_and_validate(overrides: list[str]) -> dict:
    """Compose the overrides the GPU step runs, then validate them with device=cpu (a CPU has no CUDA to check)."""
    from flbench.cli import compose
    from flbench.validation import validate

    cfg = compose(overrides)
    assert cfg["device"] == "cuda" and cfg["precision"] == "bf16", "the GPU overrides did not reach the config"
    validate({**cfg, "device": "cpu"})
    return {"dataset": cfg["dataset"].get("name"), "backbone": cfg["backbone"].get("name"),
            "algorithm": cfg["algorithm"].get("name"), "num_rounds": cfg["num_rounds"],
            "num_clients": cfg["num_clients"]}


def _dry_config_step(name: str, overrides: list[str], out: Path, extra_cmd: list[str] | None = None) -> dict:
    started = time.monotonic()
    result = {"step": name, "status": "pass", "figures": {}}
    try:
        result["figures"] = _compose_and_validate(overrides)
        if extra_cmd:
            check = run_step(f"{name}_cli", extra_cmd, out, 60)
            if check["status"] != "pass":
                result["status"] = f"fail ({' '.join(extra_cmd[1:3])}: {check['status']})"
    except Exception as exc:  # the point of the dry run: report what the GPU run would trip on
        result["status"] = f"fail ({type(exc).__name__}: {exc})"[:300]
    result["seconds"] = round(time.monotonic() - started, 1)
    result["note"] = "dry run: config composed and validated with device=cpu; not run"
    return result


def tiny_clip_cached() -> str:
    cache = Path(os.environ.get("FLBENCH_CACHE") or Path.home() / ".cache" / "flbench")
    found = sorted((cache / "tiny_clip").glob("tiny-*.pt")) if (cache / "tiny_clip").exists() else []
    return f"{len(found)} tiny CLIP build(s) in {cache}" if found else f"none in {cache}: the step builds it first"


def experiment(out: Path, dry: bool, limit: float) -> dict:
    results_dir = out / "experiment"
    overrides = ["device=cuda", *EXPERIMENT, f"results_dir={results_dir}"]
    if dry:
        result = _dry_config_step("experiment", overrides, out)
        result["figures"]["tiny_clip_cache"] = tiny_clip_cached()
        return result
    cached = tiny_clip_cached()
    result = run_step("experiment", [PY, "-m", "flbench", *overrides], out, limit)
    result["note"] = f"tiny CLIP cache before the step: {cached}"
    records = sorted((results_dir / "records").glob("*.json")) if (results_dir / "records").exists() else []
    if records:
        record = json.loads(records[-1].read_text())
        metrics = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                   for name, m in record.get("metrics", {}).items()}
        stamps = [row.get("time_s") for row in record.get("history", []) if "time_s" in row]
        rounds = [b - a for a, b in zip(stamps, stamps[1:])]
        result["figures"] = {"metrics": metrics, "wall_time_s": record.get("costs", {}).get("wall_time_s"),
                             "median_round_s": round(sorted(rounds)[len(rounds) // 2], 3) if rounds else None,
                             "backbone": record.get("backbone", {}).get("name")}
    return result


def fl_round(out: Path, dry: bool, limit: float) -> dict:
    path = out / "fl_round.json"
    gpu = ["--", "device=cuda", "precision=bf16"]
    if dry:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import fl_round as bench  # its own override lists: what its ViT-B/16 runs compose

        overrides = [*bench.COMMON, *bench.BACKBONES["vit_b16"], "device=cuda", "precision=bf16",
                     f"results_dir={out / 'fl_round_dry'}"]
        return _dry_config_step("fl_round", overrides, out, [PY, "benchmarks/fl_round.py", "--help"])
    result = run_step("fl_round", [PY, "benchmarks/fl_round.py", *FL_ROUND, "--out", str(path), *gpu], out, limit)
    if path.exists():
        rounds = json.loads(path.read_text()).get("rounds", {})
        result["figures"] = {key: (round(v["round_s"], 3) if isinstance(v, dict) else v)
                             for key, v in rounds.items() if isinstance(v, (dict, float, bool))}
    return result


# --- summary -------------------------------------------------------------------------------------------------------
def write_summary(out: Path, steps: list[dict], dry: bool, started: float) -> None:
    total = time.monotonic() - started
    payload = {"dry_run": dry, "total_s": round(total, 1), "steps": steps}
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=str))
    lines = [f"# flbench GPU check{' (dry run on CPU)' if dry else ''}", "",
             f"Total {total:.0f} s; outputs in {out}.", "",
             "| step | status | seconds | figures |", "|---|---|---|---|"]
    for s in steps:
        figures = "; ".join(f"{k}: {json.dumps(v, default=str)}" for k, v in s.get("figures", {}).items())
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {figures.replace('|', '/')} |")
    for s in steps:
        if s.get("targets"):
            lines += ["", f"{s['step']} targets:", *s["targets"]]
        if s.get("note"):
            lines += ["", f"{s['step']}: {s['note']}"]
        if not s["status"].startswith(("pass", "skipped")) and s.get("log"):
            lines += ["", f"{s['step']} log tail ({s['log']}): {tail(out / s['log'])}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: check everything a CPU can, in seconds")
    parser.add_argument("--steps", default=",".join(LIMITS), help=f"comma list of {list(LIMITS)}")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give the output folder as an argument or $OUT")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_HOME", str(out / "flwr-home"))
    # One Triton cache for all steps: kernels compiled by kernel_check are reused by the benchmark's autotuning.
    os.environ.setdefault("TRITON_CACHE_DIR", str(out / "triton-cache"))
    if args.dry_run:  # tiny CPU tensors: a second thread per process buys nothing and costs CPU time on busy boxes
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    chosen = [s for s in args.steps.split(",") if s]
    unknown = [s for s in chosen if s not in LIMITS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(LIMITS)}")
    started, steps = time.monotonic(), []
    functions = {"kernel_tests": kernel_tests, "kernel_check": kernel_check, "attention": attention,
                 "experiment": experiment, "fl_round": fl_round}
    groups, pending = [], list(chosen)
    while pending:  # consecutive concurrent steps form one group
        group = [pending.pop(0)]
        while group[0] in CONCURRENT and pending and pending[0] in CONCURRENT:
            group.append(pending.pop(0))
        groups.append(group)
    for group in groups:
        print(f"[gpu_check] {' + '.join(group)} ...", flush=True)
        if group == ["environment"]:
            done = [environment(out, args.dry_run)]
        else:
            with ThreadPoolExecutor(len(group)) as pool:
                done = list(pool.map(lambda name: functions[name](out, args.dry_run, LIMITS[name]), group))
        for step in done:
            steps.append(step)
            print(f"[gpu_check] {step['step']}: {step['status']} ({step['seconds']} s)", flush=True)
        write_summary(out, steps, args.dry_run, started)  # after every step: a killed check keeps the rest
    print((out / "summary.md").read_text())
    return 0 if all(s["status"].startswith(("pass", "skipped")) for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
