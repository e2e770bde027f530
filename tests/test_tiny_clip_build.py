"""The tiny CLIP build: same settings, same weights, whatever thread count the caller runs with."""

import torch

from flbench.backbones.tiny import build_tiny

# A few steps on a small corpus: enough for thread-dependent reductions to show, cheap enough for a test.
SMALL = dict(steps=3, batch_size=64, corpus=256, warmup=1)


def _build(cache, threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backbone = build_tiny("tiny", SMALL, cache=str(cache))
        assert torch.get_num_threads() == threads, "pretraining must restore the caller's thread count"
        return backbone
    finally:
        torch.set_num_threads(before)


def test_pretraining_gives_the_same_weights_with_one_or_two_caller_threads(tmp_path):
    one, two = _build(tmp_path / "one", 1), _build(tmp_path / "two", 2)
    assert one.fingerprint() == two.fingerprint()


def test_a_cached_model_loads_with_the_fingerprint_it_was_built_with(tmp_path):
    built = _build(tmp_path, 1)
    loaded = build_tiny("tiny", SMALL, cache=str(tmp_path))  # a cache hit this time
    assert loaded is not built and loaded.fingerprint() == built.fingerprint()
    assert len(list((tmp_path / "tiny_clip").glob("tiny-*.pt"))) == 1
