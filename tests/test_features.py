"""The feature store (flbench/features.py): stored image features are the tensor encoding gives, bit for bit; a
second process reads them instead of running the image tower; anything the features depend on changes the key;
only the default image side of in-memory sets is stored; a crafted file runs no code; a federated record is the same
with the store hot and with it off."""

import numpy as np
import pytest
import torch

from flbench.algorithms.base import build_method
from flbench.datasets.base import TensorImageSet
from flbench.engine import encode_all
from flbench.errors import DataFileError
from flbench.features import STORE_ENV, image_features
from flbench.run import run
from helpers import compose_config, random_tiny
from test_trust import _malicious

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv(STORE_ENV, raising=False)
    return tmp_path / "features"


def _images(seed: int = 0, n: int = 6) -> TensorImageSet:
    g = torch.Generator().manual_seed(seed)
    return TensorImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                          np.arange(n) % 3, np.zeros(n, np.int64))


def _tower_calls(backbone) -> list[int]:
    calls: list[int] = []
    backbone.model.visual.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    return calls


def test_stored_features_are_the_encoded_ones_and_a_second_read_runs_no_tower(store):
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, ["a", "b", "c"], ["a photo of a {}."], {})
    images = _images().subset(np.array([4, 0, 2, 5]))
    expected = encode_all(coop, images, 3)
    calls = _tower_calls(backbone)
    first = image_features(coop, images, 3)
    assert torch.equal(first, expected) and calls == [3, 1] and len(list(store.glob("*.pt"))) == 1
    again = image_features(build_method("kgcoop", backbone, ["a", "b", "c"], ["a photo of a {}."], {}), images, 3)
    assert torch.equal(again, expected) and calls == [3, 1], "read back: the image tower did not run"


def test_everything_the_features_depend_on_is_in_the_key(store):
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, ["a", "b", "c"], ["a photo of a {}."], {})
    images = _images()
    image_features(coop, images, 4)
    image_features(coop, images, 3)                         # another batch size
    image_features(coop, _images(seed=1), 4)                # other images
    image_features(coop, images.subset(np.array([1, 0])), 4)  # other rows of the same images
    with torch.no_grad():
        next(backbone.model.visual.parameters()).mul_(1.5)  # other weights (an in-place change bumps the version)
    changed = image_features(coop, images, 4)
    assert len(list(store.glob("*.pt"))) == 5
    assert torch.equal(changed, encode_all(coop, images, 4))


def test_only_the_default_image_side_of_in_memory_sets_is_stored(store, monkeypatch):
    backbone = random_tiny("tiny")
    plot = build_method("plot", backbone, ["a", "b"], ["a photo of a {}."], {"n_prompts": 2})  # own image side
    assert torch.equal(image_features(plot, _images(), 4), encode_all(plot, _images(), 4))
    assert not store.exists()
    monkeypatch.setenv(STORE_ENV, "0")
    image_features(build_method("coop", backbone, ["a", "b"], ["a photo of a {}."], {}), _images(), 4)
    assert not store.exists()


def test_a_crafted_feature_file_is_refused_and_runs_nothing(store, tmp_path):
    backbone = random_tiny("tiny")
    coop = build_method("coop", backbone, ["a", "b"], ["a photo of a {}."], {})
    image_features(coop, _images(), 4)
    (path,) = store.glob("*.pt")
    marker = tmp_path / "marker"
    _malicious(path, marker)
    with pytest.raises(DataFileError, match=r"stored image features .*\.pt is not a plain-data file .*code, not "
                                            r"data.*delete"):
        image_features(coop, _images(), 4)
    assert not marker.exists()


def test_a_federated_record_is_the_same_with_the_store_hot_and_off(tmp_path, monkeypatch):
    records = {}
    for name, setting in (("fill", "1"), ("hot", "1"), ("off", "0")):
        monkeypatch.setenv(STORE_ENV, setting)
        records[name] = run(compose_config(["num_rounds=1"], results_dir=tmp_path / name))
    hot, off = records["hot"], records["off"]
    assert hot["config_hash"] == off["config_hash"]
    assert hot["metrics"] == off["metrics"] and hot["zeroshot"] == off["zeroshot"]
    strip = [{k: v for k, v in row.items() if k != "time_s"} for row in hot["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "time_s"} for row in off["history"]]


def test_a_changed_tower_setting_is_another_key(store):
    backbone = random_tiny("tiny-vit")
    coop = build_method("coop", backbone, ["a", "b"], ["a photo of a {}."], {})
    image_features(coop, _images(), 4)
    backbone.model.visual.final_ln_after_pool = not getattr(backbone.model.visual, "final_ln_after_pool", False)
    image_features(coop, _images(), 4)
    assert len(list(store.glob("*.pt"))) == 2
