"""One SIGINT or SIGTERM stops a run in seconds, on both backends: one line, exit 128 + signal, no record, the
checkpoint kept for resume, no Ray process or temporary folder left behind (real signals, real CLI)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import SMALL

ROOT = Path(__file__).resolve().parents[1]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process tree read from /proc")
@pytest.mark.parametrize("backend, signum", [("inprocess", signal.SIGTERM), ("ray", signal.SIGINT)])
def test_one_signal_stops_the_run_cleanly(tmp_path, backend, signum):
    results = tmp_path / "results"
    short_tmp = Path(tempfile.mkdtemp(prefix="fbs", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    args = [sys.executable, "-m", "flbench", *SMALL, "num_rounds=8", "checkpoint.every=1", f"backend={backend}",
            f"results_dir={results}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(short_tmp)}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if "checkpoint: round 1 saved" in line:
                break
        workers = _descendants(proc.pid)
        sent = time.monotonic()
        proc.send_signal(signum)
        proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flbench: interrupted ({signal.Signals(signum).name})"), lines
    assert elapsed < 15, f"took {elapsed:.1f} s to stop"
    assert not list(results.glob("records/*.json")), "no record for an interrupted run"
    assert list(results.glob("checkpoints/*/server.pt")), "the checkpoint is kept for resume"
    deadline = time.monotonic() + 10  # an actor mid-task notices its raylet is gone within a second or two
    while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "Ray workers were left running"
    left = list(short_tmp.glob("flbench-ray-*"))
    shutil.rmtree(short_tmp, ignore_errors=True)
    assert not left, "Ray's temporary folder was left"
