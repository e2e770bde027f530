"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step, as far as a CPU can take it, passes.

On CPU the dry run collects the kernel tests, runs kernel_check and the attention benchmark on tiny shapes in the
Triton interpreter (gradient checks included), and composes and validates the experiment's and fl_round's GPU
configs. A failure here is what would have broken the one GPU session that runs the real check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_step_limits_fit_in_eight_minutes():
    assert gpu_check.wall_bound() <= 8 * 60 - 10  # 10 s for starting the processes and the summary
    assert gpu_check.wall_bound(["kernel_check"]) == gpu_check.LIMITS["kernel_check"]


def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == list(gpu_check.LIMITS)
    assert all(s["status"] == "pass" for s in steps.values()), {k: s["status"] for k, s in steps.items()}
    assert steps["kernel_tests"]["figures"]["collected"] > 30
    assert steps["kernel_check"]["figures"]["runs"] == 2 and steps["kernel_check"]["figures"]["failed"] == 0
    attention = steps["attention"]["figures"]
    assert attention["checks_passed"] == attention["rows"] >= 4 and attention["checks_failed"] == 0
    assert steps["experiment"]["figures"]["backbone"] == "tiny"
    assert (out / "attention" / "attention.md").exists() and (out / "summary.md").exists()
