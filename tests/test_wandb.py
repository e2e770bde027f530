"""W&B: logger settings refused up front (one line naming the key), rows logged as they arrive (restored rows
first), failed runs marked failed, and a run file that is incomplete (full disk: 0-byte files) is an error — never a
silent rc 0. The live multirun (groups, tags, skipped jobs, live timestamps) is in test_sweep.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flbench.errors import ConfigError, StorageError
from flbench.results.wandb_logger import (WandbSession, check_logger, check_run_folder, run_file_complete, run_tags,
                                          start_session)
from helpers import SMALL
from wandb_files import read_run

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **logger) -> dict:
    return {"results_dir": str(tmp_path / "results"), "algorithm": {"name": "coop"}, "protocol": {"name": "fedavg"},
            "scenario": {"name": "global"}, "dataset": {"name": "synthetic"}, "backbone": {"name": "tiny"},
            "logger": {"name": "wandb", "mode": "offline", "project": "flbench", **logger}}


@pytest.mark.parametrize("logger, key", [
    ({"project": "../../x"}, "logger.project"), ({"mode": "offlne"}, "logger.mode"),
    ({"tags": ["t" * 70]}, "logger.tags"), ({"tags": "ablation"}, "logger.tags"), ({"group": ""}, "logger.group"),
    ({"name": "tensorboard"}, "logger.name"),
])
def test_bad_logger_settings_are_one_line_naming_the_key(tmp_path, logger, key):
    with pytest.raises(ConfigError) as error:
        check_logger(_cfg(tmp_path, **logger))
    assert key in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "results").exists(), "checking must not create the results folder for a refused config"


def test_online_without_credentials_and_unwritable_dir_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    with pytest.raises(ConfigError, match="logger.mode=online needs W&B credentials"):
        check_logger(_cfg(tmp_path, mode="online"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="logger.dir"):
        check_logger(_cfg(tmp_path, dir=str(blocker / "wandb")))
    check_logger(_cfg(tmp_path))  # the defaults pass
    check_logger({"logger": {"name": "none"}})
    assert run_tags(_cfg(tmp_path, tags=["mine"])) == ["method:coop", "protocol:fedavg", "scenario:global",
                                                       "dataset:synthetic", "backbone:tiny", "mine"]


class FakeRun:
    def __init__(self) -> None:
        self.logged: list[int] = []
        self.exit_code: int | None = None

    def log(self, row: dict, step: int) -> None:
        self.logged.append(step)

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


def test_rows_are_logged_once_each_restored_rows_first_and_abort_marks_the_run_failed():
    run = FakeRun()
    session = WandbSession(run)
    restored = [{"round": 0}, {"round": 1}, {"round": 2}]  # a resumed run's history arrives with its first new row
    session.log_rounds(restored + [{"round": 3}])
    session.log_rounds(restored + [{"round": 3}, {"round": 4}])
    assert run.logged == [0, 1, 2, 3, 4]
    session.abort(143)
    assert run.exit_code == 143 and session.run is None
    session.abort(1)  # closing twice is harmless
    assert WandbSession().folder is None and WandbSession().finish({}) is None


def test_incomplete_run_files_are_refused_and_a_finished_run_passes(tmp_path):
    session = start_session(_cfg(tmp_path), "check", {"global": 50.0})
    session.log_rounds([{"round": 0, "test/global": 50.0}])
    folder = session.finish({"metrics": {"global": {"best_val": 50.0, "last": 50.0}}, "costs": {"wall_time_s": 1.0},
                             "config_hash": "abc", "history": []})
    assert Path(folder).parent == tmp_path / "results" / "wandb", "runs live in <results_dir>/wandb/, not wandb/wandb/"
    run = read_run(Path(folder))
    assert run["summary"]["zeroshot/global"] == 50.0 and run["history"][0]["test/global"] == 50.0
    (path,) = Path(folder).glob("run-*.wandb")
    assert run_file_complete(path)
    data = path.read_bytes()
    for damaged in (b"", data[: len(data) // 2]):  # a full disk: 0 bytes, or cut off mid-file
        path.write_bytes(damaged)
        assert not run_file_complete(path)
        with pytest.raises(StorageError, match="incomplete"):
            check_run_folder(folder, wait_s=0.2)


def _can_mount_tmpfs() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="a full disk needs a tmpfs mount (root on Linux)")
def test_a_full_disk_under_the_wandb_folder_fails_the_run_instead_of_rc_0(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"tmpfs-{uuid.uuid4().hex[:6]}", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs refused (a container without CAP_SYS_ADMIN)")
    try:
        (full / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))
        try:
            (full / "filler2").write_bytes(b"\0" * 8192)
        except OSError:
            pass  # the disk is full now
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        done = subprocess.run([sys.executable, "-m", "flbench", *SMALL, "algorithm=zeroshot", "logger.mode=offline",
                               f"logger.dir={full}", f"results_dir={tmp_path / 'results'}"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True)
    assert done.returncode == 1, done.stdout[-1500:] + done.stderr[-1500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "incomplete" in lines[0] and "is the disk full" in lines[0], lines
    assert list((tmp_path / "results" / "records").glob("*.json")), "the record is kept: a rerun logs it to W&B"

