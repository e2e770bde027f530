"""Performance machinery (issue 9) must not change results: the image-feature cache gives records identical to the
uncached path, every client of a process runs on the one shared backbone (never a copy), augmented views are
precomputed deterministically, and frozen text features are encoded once per class-name list, not per switch."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import flbench.fl.client_app as client_app
from flbench.algorithms.base import build_method
from flbench.datasets.base import TensorImageSet
from flbench.engine import AugmentedViews, encode_all, encode_views, train_local
from flbench.experiment import Experiment, get_experiment
from flbench.run import run
from helpers import compose_config, random_tiny

NAMES = ["red circle", "blue square", "green star", "white moon"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(record):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in record["history"]]


def test_cached_features_give_the_uncached_record_and_clients_share_one_backbone(tmp_path, monkeypatch):
    seen = []
    real_train_local = client_app.train_local

    def spy(method, images, cfg, generator, cached=None, **kwargs):
        backbone = method.backbone
        seen.append({"backbone": id(backbone), "method": id(method), "cached": cached is not None,
                     "ptrs": [p.data_ptr() for p in backbone.parameters()]})
        return real_train_local(method, images, cfg, generator, cached=cached, **kwargs)

    monkeypatch.setattr(client_app, "train_local", spy)
    sequential = "backend.cohort_size=1"  # the spy sees train_local, the one-client path (cohorts: test_cohort*.py)
    cfg = compose_config(["cache_features=true", sequential], results_dir=tmp_path / "cached")
    cached = run(cfg)
    experiment = get_experiment(cfg)
    calls_cached = list(seen)
    seen.clear()
    uncached = run(compose_config(["cache_features=false", sequential], results_dir=tmp_path / "uncached"))

    assert _metrics(cached) == _metrics(uncached), "caching frozen image features must not change any metric"
    assert [c["cached"] for c in calls_cached] == [True] * 8 and [c["cached"] for c in seen] == [False] * 8
    # 4 clients × 2 rounds in one process: one backbone object, one method object, weights never copied or moved
    assert {c["backbone"] for c in calls_cached} == {id(experiment.backbone)}
    assert {c["method"] for c in calls_cached} == {id(experiment.method)}
    ptrs = [p.data_ptr() for p in experiment.backbone.parameters()]
    assert all(c["ptrs"] == ptrs for c in calls_cached)
    assert not any(p.requires_grad for p in experiment.backbone.parameters())


def _flip_images(n=10):
    g = torch.Generator().manual_seed(0)
    flip = lambda batch: torch.where(torch.rand(len(batch), 1, 1, 1) < 0.5, batch.flip(-1), batch)  # noqa: E731
    return TensorImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                          np.arange(n) % 4, np.zeros(n), augment=flip)


def test_augmented_views_are_seeded_distinct_and_drawn_per_image():
    method = build_method("coop", random_tiny(), NAMES, ["a photo of a {}."], {})
    images = _flip_images()
    views = encode_views(method, images, 4, views=3, seed=7)
    assert isinstance(views, AugmentedViews) and views.count == 3 and views.encoded.shape[:2] == (3, 10)
    assert torch.equal(views.encoded, encode_views(method, images, 4, views=3, seed=7).encoded), "views are seeded"
    plain = encode_all(method, images, 4)
    # each view is the plain or the flipped encoding of an image; with 3 views of 10 images, both kinds occur
    flipped = method.encode(images.load(np.arange(10)).flip(-1))
    is_plain = (views.encoded - plain).abs().amax(-1) < 1e-5
    is_flipped = (views.encoded - flipped).abs().amax(-1) < 1e-5
    assert bool((is_plain | is_flipped).all()) and bool(is_plain.any()) and bool(is_flipped.any())
    idx = torch.tensor([4, 1, 7])
    drawn = views.draw(idx, torch.Generator().manual_seed(3))
    choice = torch.randint(3, (3,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, views.encoded[choice, idx])
    # training on views is reproducible from the generator seed
    states = []
    for _ in range(2):
        m = build_method("coop", method.backbone, NAMES, ["a photo of a {}."], {})
        train_local(m, images, {"lr": 0.01, "batch_size": 4, "epochs": 2}, torch.Generator().manual_seed(1),
                    cached=views)
        states.append(m.ctx.detach().clone())
    assert torch.equal(*states)


def test_which_methods_and_settings_use_the_feature_cache():
    def uses(frozen, train, augment=False, views=0, enabled=True):
        stub = SimpleNamespace(method=SimpleNamespace(frozen_image_side=frozen), cache_views=views,
                               cfg={"cache_features": enabled, "train": {"augment": augment}})
        return Experiment.use_cache(stub, train)

    assert uses(True, True) and uses(True, False)
    assert not uses(False, True) and not uses(False, False), "VPT/MaPLe/PromptSRC change the image tower: bypass"
    assert not uses(True, True, enabled=False)
    assert not uses(True, True, augment=True) and uses(True, True, augment=True, views=2)
    assert uses(True, False, augment=True), "evaluation never augments"


def test_experiment_caches_augmented_views_per_client(tmp_path):
    experiment = get_experiment(compose_config(["train.augment=true", "cache_views=2"], results_dir=tmp_path))
    views = experiment.client_cache(0)
    assert isinstance(views, AugmentedViews) and views.count == 2
    assert views.encoded.shape[1] == len(experiment.client_images(0))
    assert experiment.client_cache(0) is views, "computed once per process"
    assert experiment.evaluate(experiment.fresh(), experiment.scenario.val, "val"), "evaluation uses plain features"


def test_frozen_text_features_are_encoded_once_per_class_list():
    backbone = random_tiny()
    calls = []
    real = backbone.encode_text
    backbone.encode_text = lambda texts: calls.append(list(texts)) or real(texts)
    kgcoop = build_method("kgcoop", backbone, NAMES, ["a photo of a {}."], {})
    assert len(calls) == 1
    kgcoop.set_classnames(NAMES[:2])
    kgcoop.set_classnames(NAMES)
    kgcoop.set_classnames(NAMES[:2])
    assert len(calls) == 2, "switching back and forth (base→novel evaluation) must not re-encode"
    zeroshot = build_method("zeroshot", backbone, NAMES, ["a photo of a {}."], {})
    prograd = build_method("prograd", backbone, NAMES, ["a photo of a {}."], {})
    assert len(calls) == 2 and torch.equal(zeroshot.handcrafted, prograd.handcrafted)
    build_method("zeroshot", backbone, NAMES, ["a photo of a {}.", "a sketch of a {}."], {"ensemble": True})
    assert len(calls) == 4, "another template list is another entry (one call per template)"
    with torch.no_grad():  # a text-tower weight changed in place (e.g. trained routers): recompute
        backbone.model.ln_final.bias.add_(0.5)
    kgcoop.set_classnames(NAMES)
    assert len(calls) == 5
    assert not torch.allclose(kgcoop.handcrafted, zeroshot.handcrafted)
