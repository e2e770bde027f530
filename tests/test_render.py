"""The renderer's speed-ups draw the same pixels: its separable max/min filter against PIL's rank filters, its
cached pixel grid against a fresh one."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flbench.datasets import render as render_module
from flbench.datasets.render import COLOURS, PATTERNS, SHAPES, _extreme_filter, render


def _pil_extreme_filter(mask: Image.Image, size: int, reduce: np.ufunc) -> np.ndarray:
    """The renderer's filter as it was first written: PIL's MaxFilter / MinFilter."""
    rank = ImageFilter.MaxFilter(size) if reduce is np.maximum else ImageFilter.MinFilter(size)
    return np.asarray(mask.filter(rank), np.float32)


@pytest.mark.parametrize("size", [1, 3, 5, 7, 9])
def test_extreme_filter_equals_pils_rank_filters(size):
    rng = np.random.default_rng(size)
    for trial in range(40):
        h, w = (int(n) for n in rng.integers(1, 70, 2))
        if trial % 2:  # binary masks, as the renderer's, and arbitrary grey levels
            a = (rng.random((h, w)) < rng.random()).astype(np.uint8) * 255
        else:
            a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        mask = Image.fromarray(a)
        for reduce in (np.maximum, np.minimum):
            np.testing.assert_array_equal(_extreme_filter(mask, size, reduce), _pil_extreme_filter(mask, size, reduce))


def test_every_shape_domain_and_pattern_renders_as_with_pils_filters(monkeypatch):
    combos = list(itertools.product(SHAPES, ("photo", "sketch", "cartoon", "noisy"), PATTERNS))

    def draw_all() -> list[np.ndarray]:
        return [render(shape, list(COLOURS.values())[i % len(COLOURS)], pattern, domain, np.random.default_rng(i), 32)
                for i, (shape, domain, pattern) in enumerate(combos)]

    fast = draw_all()
    monkeypatch.setattr(render_module, "_extreme_filter", _pil_extreme_filter)
    # and a fresh pixel grid per image, as before it was cached
    monkeypatch.setattr(render_module, "_pixel_grid", lambda size: tuple(np.mgrid[0:size, 0:size].astype(np.float32)))
    for i, (image, reference) in enumerate(zip(fast, draw_all())):
        np.testing.assert_array_equal(image, reference, err_msg=str(combos[i]))
