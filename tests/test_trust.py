"""Trust under attack and accident (issue 13): nothing executes from a results folder or a cache, a client's own
error stops the run, keys that would be ignored are refused, results folders are checked before the work, and two
identical runs never both do it."""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from flbench.errors import BusyError, ConfigError, DataFileError, FlbenchError, StorageError
from flbench.fl.checkpoint import Checkpointer, decode, encode
from flbench.io import atomic_write
from flbench.results.record import load_record, result_config, run_lock
from flbench.run import run
from flbench.validation import validate
from helpers import SMALL, TEST_PRETRAIN, compose_config

ROOT = Path(__file__).resolve().parents[1]


class _Marker:
    """Unpickling this runs `touch <path>`: what a crafted results tarball would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _malicious(path: Path, marker: Path, payload: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(payload or {}), "x": _Marker(marker)}, path)


def test_checkpoint_codec_round_trips_strategy_data():
    state = {"m_t": {"w": np.ones((2, 3), np.float32)}, "eta": 0.1, "step": np.int64(3), "rng": (3, (1, 2), None),
             "arrays": ArrayRecord({"w": torch.arange(4.0)}), "config": ConfigRecord({"a": 1, "b": "x"})}
    back = decode(torch.load(_save_bytes(encode(state)), weights_only=True))
    assert np.array_equal(back["m_t"]["w"], state["m_t"]["w"]) and back["m_t"]["w"].dtype == np.float32
    assert back["eta"] == 0.1 and back["step"] == 3 and back["rng"] == (3, (1, 2), None)
    assert torch.equal(back["arrays"].to_torch_state_dict()["w"], torch.arange(4.0))
    assert dict(back["config"]) == {"a": 1, "b": "x"}
    with pytest.raises(TypeError):
        encode({"f": lambda: None})


def _save_bytes(payload):
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    buffer.seek(0)
    return buffer


def test_crafted_client_checkpoint_never_runs(tmp_path):
    ckpt = Checkpointer.from_config({"results_dir": str(tmp_path), "checkpoint": {"every": 1}, "seed": 0})
    marker = tmp_path / "marker"
    _malicious(ckpt.root / "clients" / "0" / "round_1.pt", marker, {"round": 1})
    with pytest.raises(DataFileError, match=r"checkpoint .*round_1\.pt .*code, not data.*delete"):
        ckpt.restore_client(0, 2, RecordDict())
    assert not marker.exists()


def test_crafted_tiny_clip_cache_never_runs(tmp_path, monkeypatch):
    from flbench.backbones import pretrain, tiny

    monkeypatch.setattr(pretrain, "pretrain_tiny_clip", lambda *a, **k: pytest.fail("must not rebuild"))
    settings = {**pretrain.DEFAULT_PRETRAIN, "steps": 1}
    path = tmp_path / "tiny_clip" / f"tiny-{tiny._tiny_key('tiny', settings)}.pt"
    marker = tmp_path / "marker"
    _malicious(path, marker)
    with pytest.raises(DataFileError, match="tiny-CLIP cache .* delete it"):
        tiny.build_tiny("tiny", {"steps": 1}, str(tmp_path))
    assert not marker.exists()


def test_crafted_synthetic_cache_is_refused(tmp_path, monkeypatch):
    from flbench.datasets import synthetic

    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path))
    args = (synthetic.FAMILIES["shapes"], ("photo",), "test", 1, 0, 32)
    synthetic.render_split(*args)  # writes the cache file; overwrite it with an object array
    (path,) = (tmp_path / "synthetic").glob("*.npz")
    np.savez(path, images=np.array([_Marker(tmp_path / "marker")], dtype=object), labels=np.zeros(1),
             domains=np.zeros(1))
    with pytest.raises(DataFileError, match="synthetic image cache .* delete it"):
        synthetic.render_split(*args)
    assert not (tmp_path / "marker").exists()


def test_a_record_that_is_not_json_is_absent_not_executed(tmp_path):
    path = tmp_path / "records" / "abc.json"
    _malicious(path, tmp_path / "marker")
    assert load_record(path) is None and not (tmp_path / "marker").exists()


def test_files_keep_umask_permissions_and_a_full_disk_is_one_line(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "r.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "colleagues on a shared folder can read records"

    def full(_):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError, match=f"cannot write {tmp_path / 'x.pt'}: No space left on device"):
        atomic_write(tmp_path / "x.pt", full)

    def torch_short_write(_):  # what torch.save raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    with pytest.raises(StorageError, match="stopped short"):
        atomic_write(tmp_path / "y.pt", torch_short_write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"], "no temp file is left behind"


@pytest.mark.parametrize("overrides, key", [
    (["train.lr=nan"], "train.lr=nan"), (["protocol.mu=inf", "protocol=fedprox"], "protocol.mu=inf"),
    (["results_dir=null"], "results_dir"), (["results_dir=''"], "results_dir"),
    (["seed=18446744073709551616"], "seed"), (["+backbone.checkpoint=/x.pt"], "backbone.checkpoint"),
    (["logger.mode=offline", "logger.project=../../x"], "logger.project"),
])
def test_bad_values_are_refused_before_any_work(overrides, key, tmp_path):
    cfg = compose_config(overrides, results_dir=None)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        validate(cfg)


def test_a_results_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        validate(compose_config([f"results_dir={tmp_path / 'file' / 'results'}"]))


def test_values_the_code_would_ignore_or_clamp_are_refused_and_nothing_is_written(tmp_path):
    for overrides, message in ((["shots=5"], "shots=5 but no class has more than 4 training images"),  # SMALL: 4
                               (["algorithm.n_ctx=16"], "algorithm.n_ctx=16 .*ctx_init")):
        with pytest.raises(ConfigError, match=message):
            run(compose_config(overrides, results_dir=tmp_path))
    assert not tmp_path.joinpath("records").exists() and not tmp_path.joinpath("locks").exists()


@pytest.mark.parametrize("unread, read", [
    (["train.momentum=0.5"], ["train.optimizer=sgd"]),
    (["cache_views=2"], ["train.augment=true"]),
    (["checkpoint.every=0", "checkpoint.dir=/elsewhere"], ["checkpoint.every=1"]),
    (["protocol.straggler_work=0.3"], ["protocol.stragglers=0.5"]),
    (["protocol=fedadam", "protocol.eta_l=0.1"], None),
    (["partition=domain", "partition.min_samples=3"], ["partition.alpha=0.5"]),
    (["backend=ray", "backend.address=localhost:6379", "backend.num_cpus=3"], ["backend.address=null"]),
    (["backend.cohort_size=1", "backend.cohort_memory_mb=64"], ["backend.cohort_size=2"]),
    (["+backbone/attention=routed_kv", "backbone.attention.calibration.steps=1000"],
     ["backbone.attention.routers=calibrated"]),
    (["+backbone/attention=gqa", "backbone.attention.uptrain.lr=0.01"], ["backbone.attention.uptrain.steps=60"]),
])
def test_a_key_its_code_path_never_reads_is_refused_unless_at_its_default(unread, read, tmp_path):
    """A key set on a path that ignores it would only change the record's hash (a no-op "tuned" row); the same value
    is accepted where the path reads it, and the default is accepted everywhere."""
    key = unread[-1].partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.* changes nothing here: .*remove it"):
        validate(compose_config(unread, results_dir=tmp_path))
    validate(compose_config(unread[:-1], results_dir=tmp_path))
    if read is not None:
        validate(compose_config([*unread, *read], results_dir=tmp_path))


def test_a_seed_a_word_initialised_context_never_draws_from_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.init_seed=1 changes nothing: algorithm\.ctx_init="):
        run(compose_config(["+algorithm.init_seed=1"], results_dir=tmp_path))
    assert not tmp_path.joinpath("records").exists()


def test_an_offline_tag_or_a_missing_checkpoint_fails_before_rendering_anything(tmp_path, monkeypatch):
    """Weights first: the ViT-B/16 suite at 224 px would take minutes to render; the weights check takes seconds."""
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path / "cache"))
    for overrides, message in ((["backbone=vit_b16"], "not in the local cache and HF_HUB_OFFLINE is set"),
                               (["backbone=vit_b16", f"backbone.checkpoint={tmp_path}/missing.pt"], "does not exist")):
        cfg = compose_config([*overrides, "dataset.image_size=224"], results_dir=tmp_path / "results", small=False)
        with pytest.raises(ConfigError, match=message):
            run(cfg)
    assert not (tmp_path / "cache" / "synthetic").exists() or not any((tmp_path / "cache" / "synthetic").iterdir())
    assert not (tmp_path / "results").exists()


def test_a_second_identical_run_stops_saying_who_holds_the_lock(tmp_path):
    cfg = compose_config(["logger.mode=disabled"], results_dir=tmp_path)
    from flbench.experiment import config_hash

    with run_lock(tmp_path, config_hash(result_config(cfg))):
        with pytest.raises(BusyError, match=f"pid {os.getpid()} on .* holds"):
            run(cfg)
    assert not (tmp_path / "records").exists()


def test_a_client_that_cannot_read_its_image_stops_the_run_naming_it(tmp_path, monkeypatch):
    from fake_roots import make_coop_root

    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path / "cache"))
    root = make_coop_root(tmp_path / "data", "oxford_flowers")
    broken = root / "oxford_flowers" / "jpg" / "oxford_flowers_class_1" / "train_2.jpg"
    broken.write_bytes(b"not a jpeg")
    cfg = compose_config(["dataset=oxford_flowers", f"dataset.root={root}", "dataset.num_classes=3", "shots=5",
                          "num_clients=2", "num_rounds=1", "partition=iid", "cache_features=false",
                          "dataset.workers=1", "logger.mode=disabled", f"+backbone.pretrain={TEST_PRETRAIN}"],
                         results_dir=tmp_path / "results", small=False)
    # the message names the client(s) whose part failed: with cohort training, the cohort the client trained in
    with pytest.raises(FlbenchError, match=r"^clients? [\d, ]*\d( \(one cohort\))?: cannot read .*train_2\.jpg"):
        run(cfg)
    assert not list((tmp_path / "results").rglob("*.json"))


def _cli(args: list[str], tmp_path: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flbench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_a_crafted_server_checkpoint_is_refused_by_the_cli_and_never_runs(tmp_path):
    results, marker = tmp_path / "results", tmp_path / "marker"
    args = [*SMALL, "checkpoint.every=1", f"results_dir={results}"]
    ckpt = Checkpointer.from_config(compose_config(args[len(SMALL):]))
    _malicious(ckpt.server_path, marker, {"schema": 1})
    done = _cli(args, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert f"checkpoint {ckpt.server_path}" in lines[0] and "delete" in lines[0]
    assert "weights_only=False" not in done.stderr + done.stdout
    assert not marker.exists() and not list(results.rglob("records/*.json"))


def test_experiment_with_and_without_plus_compose_the_same(tmp_path):
    outputs = [_cli([f"{prefix}experiment=synthetic_protocols", "--cfg", "job"], tmp_path) for prefix in ("+", "")]
    assert all(o.returncode == 0 for o in outputs), outputs[0].stderr[-1500:]
    assert outputs[0].stdout == outputs[1].stdout and "results_dir: results/synthetic_protocols" in outputs[0].stdout


def test_unknown_keys_are_refused_by_the_cli_in_one_line(tmp_path):
    for override, expected in (("+num_round=3", "num_round is not a known key (did you mean num_rounds?)"),):
        done = _cli([*SMALL, override, f"results_dir={tmp_path / 'r'}"], tmp_path)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr[-1500:]
    assert not (tmp_path / "r").exists()


def test_kgcoop_misspelt_weight_names_the_real_one():
    with pytest.raises(ConfigError, match=r"algorithm\.lamda .*did you mean algorithm\.lam"):
        validate(compose_config(["algorithm=kgcoop", "+algorithm.lamda=4"]))


def test_base2novel_on_one_class_names_the_scenario():
    from flbench.datasets.base import DatasetBundle, TensorImageSet
    from flbench.scenarios import build_scenario

    images = TensorImageSet(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), np.zeros(2, np.int64), np.zeros(2, np.int64))
    bundle = DatasetBundle("one", ["only"], ["default"], images, images, images)
    with pytest.raises(ConfigError, match="base2novel needs at least 2 classes"):
        build_scenario("base2novel", bundle)
