"""Tests run offline on CPU: no network, W&B offline, Flower telemetry off, caches in a session temp folder.

The synthetic suite and the tiny CLIP are expensive to build the first time (~2 min); they are cached under
$FLBENCH_CACHE, which CI keeps between test files (and which defaults here to .cache/flbench in the repo).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLBENCH_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "flbench"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower and W&B write config/state under HOME-like folders: keep them in a temp dir."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("FLWR_HOME", str(home / "flwr"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))


@pytest.fixture
def one_thread():
    """For tests on tiny tensors (modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`): a second
    OpenMP thread buys nothing there, and on a busy machine (CI runners, shared boxes) two spinning threads per
    process made the method-zoo tests 5-9x slower in CPU time (measured)."""
    yield from _threads(1)


@pytest.fixture
def two_threads():
    """For tests of what splits work across threads (CPU kernels parallelise only with a second thread). Request it
    as an argument: it is then set up after a module's `one_thread` mark, and wins."""
    yield from _threads(2)


def _threads(count: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Default dtype float64 for the test: equivalence tests whose two sides sum in different orders (batched vs
    separate calls, other GEMM shapes) then agree to ~1e-16 per operation on any CPU, so their tolerance can be tight
    (in fp32, AdamW turns a rounding-level gradient difference on a near-zero element into a step of size lr)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
