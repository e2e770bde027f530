"""Device and precision plumbing (issue 9), testable without a GPU: the `device`/`precision` keys resolve and fail
clearly, autocast really runs the forward passes in bf16 while the prompts stay fp32, what travels to Flower is on the
CPU, Ray gets the GPU fraction, and the new keys leave the record hash of existing runs unchanged."""

import pytest
import torch

import flbench.engine as engine
from flbench.algorithms.base import build_method
from flbench.datasets.base import TensorImageSet
from flbench.engine import encode_all, resolve_device, train_local
from flbench.errors import ConfigError
from flbench.results.record import result_config
from flbench.validation import validate
from helpers import compose_config, random_tiny

NO_CUDA = not torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_device_auto_and_cpu_resolve_and_unknown_names_fail():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='tpu' is unknown"):
        resolve_device("tpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_device_cuda_without_cuda_is_a_config_error_before_any_work(tmp_path):
    cfg = compose_config(["device=cuda"], results_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^device=cuda but this process sees no CUDA GPU.*device=cpu"):
        validate(cfg)
    assert not any(tmp_path.iterdir()), "validation must fail before anything is written"


def test_precision_checks(monkeypatch):
    with pytest.raises(ConfigError, match=r"precision='fp8' is unknown"):
        validate(compose_config(["device=cpu", "precision=fp8"]))
    with pytest.raises(ConfigError, match=r"precision=fp16 needs device=cuda"):
        validate(compose_config(["device=cpu", "precision=fp16"]))
    validate(compose_config(["device=cpu", "precision=bf16"]))  # CPU autocast exists (slow, but valid)
    # On a GPU, fp16 still needs a method whose backward() applies the loss scale; ProGrad computes its own.
    monkeypatch.setattr(engine, "resolve_device", lambda name="auto": torch.device("cuda"))
    validate(compose_config(["device=cuda", "precision=fp16"]))
    with pytest.raises(ConfigError, match=r"precision=fp16 needs loss scaling.*algorithm.name=prograd"):
        validate(compose_config(["device=cuda", "precision=fp16", "algorithm=prograd"]))


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU")
def test_ray_gpu_fraction_needs_a_gpu_and_reaches_ray(monkeypatch):
    with pytest.raises(ConfigError, match=r"backend.client_gpus=0.25 but this machine has no CUDA GPU"):
        validate(compose_config(["backend=ray", "backend.client_gpus=0.25"]))
    import flwr.simulation

    from flbench.fl.backends import run_ray

    seen = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    run_ray(None, None, 4, {"name": "ray", "num_cpus": 8, "client_cpus": 2, "client_gpus": 0.25, "temp_dir": "/tmp/x"})
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert seen["backend_config"]["init_args"]["num_gpus"] == 2, "Ray must be told the GPUs it may hand out"
    run_ray(None, None, 4, {"name": "ray", "client_gpus": 0.0, "temp_dir": "/tmp/x"})
    assert "num_gpus" not in seen["backend_config"]["init_args"]


def test_new_keys_leave_existing_record_hashes_alone():
    """`device` never changes what a run measures; `precision=fp32` and `cache_views=0` are what every record before
    these keys ran with, so they stay out of the hash (old records are still found, skipped and resumed)."""
    cfg = compose_config()
    assert {"device", "precision", "cache_views"} <= set(cfg)
    assert not {"device", "precision", "cache_views"} & set(result_config(cfg))
    changed = result_config(compose_config(["precision=bf16", "cache_views=2", "device=cpu"]))
    assert changed["precision"] == "bf16" and changed["cache_views"] == 2 and "device" not in changed


def _images(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                          torch.arange(n) % 4, torch.zeros(n))


def test_bf16_autocast_runs_forward_passes_in_bf16_with_fp32_master_prompts():
    backbone = random_tiny()
    names = ["red circle", "blue square", "green star", "white moon"]
    method = build_method("coop", backbone, names, ["a photo of a {}."], {})
    images = _images()
    assert encode_all(method, images, 8).dtype == torch.float32
    method.precision = "bf16"
    features = encode_all(method, images, 8)
    assert features.dtype == torch.bfloat16, "the frozen image tower must run under autocast"
    before = method.ctx.detach().clone()
    result = train_local(method, images, {"lr": 0.01, "batch_size": 4, "optimizer": "adamw"},
                         torch.Generator().manual_seed(0), cached=features)
    assert method.ctx.dtype == torch.float32 and not torch.equal(method.ctx, before)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.loss))
    assert all(v.device.type == "cpu" for v in method.shared_state().values())
