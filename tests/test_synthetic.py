import numpy as np
import torch

from flbench.datasets.synthetic import FAMILIES, load_synthetic, pretraining_corpus, render_split


def test_suite_is_deterministic_and_has_the_right_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path))
    kwargs = dict(family="shapes", domains=["photo", "sketch", "noisy"], train_per_class=2, val_per_class=1,
                  test_per_class=1, workers=1)
    a, b = load_synthetic(**kwargs), load_synthetic(**kwargs)  # the second comes from the cache
    assert a.num_classes == 64 and len(set(a.classnames)) == 64
    assert len(a.train) == 64 * 3 * 2 and len(a.val) == 64 * 3 and len(a.test) == 64 * 3
    assert a.domain_names == ["photo", "sketch", "noisy"]
    assert np.array_equal(np.bincount(a.train.domains), [128, 128, 128])
    assert torch.equal(a.train.images, b.train.images)
    uncached = render_split(FAMILIES["shapes"], ("photo", "sketch", "noisy"), "train", 2, 0, 32, cache=False,
                            workers=1)
    assert torch.equal(uncached[0], a.train.images)
    images = a.test.load(np.arange(4))
    assert images.shape == (4, 3, 32, 32) and 0.0 <= images.min() and images.max() <= 1.0


def test_splits_and_seeds_give_different_images(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path))
    fam = FAMILIES["patterns"]
    train = render_split(fam, ("photo",), "train", 1, 0, 32, cache=False, workers=1)[0]
    test = render_split(fam, ("photo",), "test", 1, 0, 32, cache=False, workers=1)[0]
    other_seed = render_split(fam, ("photo",), "train", 1, 1, 32, cache=False, workers=1)[0]
    assert not torch.equal(train, test) and not torch.equal(train, other_seed)


def test_families_are_compositional_and_distinct():
    shapes, patterns = FAMILIES["shapes"], FAMILIES["patterns"]
    assert shapes.num_classes >= 40
    assert not set(shapes.objects) & set(patterns.objects)
    # base (first half of labels) contains every attribute and every object word
    base = [shapes.combination(label) for label in range(shapes.num_classes // 2)]
    assert {a for a, _ in base} == set(range(8)) and {o for _, o in base} == set(range(8))
    held = [label for label in range(64) if shapes.held_out_of_pretraining(label)]
    assert len(held) == 16


def test_pretraining_corpus_excludes_held_out_combinations_and_the_noisy_domain(tmp_path, monkeypatch):
    monkeypatch.setenv("FLBENCH_CACHE", str(tmp_path))
    images, meta = pretraining_corpus(200, workers=1)
    assert len(images) == len(meta) >= 200
    names = {name for name, _ in meta}
    held = {FAMILIES["shapes"].classname(label) for label in range(64) if FAMILIES["shapes"].held_out_of_pretraining(label)}
    assert not names & held
    assert {domain for _, domain in meta} == {"photo", "sketch", "cartoon"}



def _worker_signal_handlers(chunk):
    import signal

    default = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    return np.full((len(chunk), 1, 1, 3), int(default), np.uint8)


def test_render_workers_leave_signals_to_the_parent(monkeypatch):
    """Forked render workers inherited cli.stop_on_signals' handlers, so Pool.terminate() raised Interrupted inside
    each worker, running its exit handlers on locks copied mid-use from the parent: a cold `python -m flbench` once
    hung forever on such a worker. Workers now die on SIGTERM, ignore Ctrl-C (the parent stops the pool) and leave
    through close/join."""
    from flbench.cli import stop_on_signals
    from flbench.datasets import synthetic

    monkeypatch.setattr(synthetic, "render_many", _worker_signal_handlers)
    specs = [FAMILIES["shapes"].spec(label, "photo", (label, i), 16) for label in range(64) for i in range(17)]
    with stop_on_signals():
        flags = synthetic._render_parallel(specs, 2)
    assert len(flags) == len(specs) and flags.min() == 1, "a worker kept the CLI's signal handlers"
