"""The renderer's speed-ups draw the same pixels: its separable max/min filter against PIL's rank filters, its box
downsampling against PIL's BOX resize, and the whole renderer (channels-first canvases, broadcast backgrounds, the
pattern lookup, the cached pixel grid) against the renderer as first written, pixel for pixel."""

import itertools
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from flbench.datasets.render import (COLOURS, PATTERNS, SHAPES, SUPERSAMPLE, _extreme_filter, _jitter, _mask, _place,
                                     box_downsample, render)


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


@pytest.mark.parametrize("size", [4, 8, 32, 64])
def test_box_downsample_equals_pils_box_resize(size):
    rng = np.random.default_rng(size)
    for trial in range(10):
        if trial % 2:  # smooth ramps and flat areas, as the renderer's, and arbitrary values
            planes = np.clip(rng.normal(128, 60, (3, 1, 1)) + np.linspace(-90, 90, size * SUPERSAMPLE), 0, 255)
            planes = np.broadcast_to(planes, (3, size * SUPERSAMPLE, size * SUPERSAMPLE)).astype(np.uint8)
        else:
            planes = rng.integers(0, 256, (3, size * SUPERSAMPLE, size * SUPERSAMPLE), dtype=np.uint8)
        image = Image.fromarray(np.ascontiguousarray(planes.transpose(1, 2, 0)))
        reference = np.asarray(image.resize((size, size), Image.BOX))
        np.testing.assert_array_equal(box_downsample(planes).transpose(1, 2, 0), reference)


def _first_pattern_fill(pattern, colour, size, rng):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / rng.uniform(4.5, 6.0)
    phase = rng.uniform(0, period)
    if pattern == "striped":
        angle = rng.uniform(0, math.pi)
        on = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle) + phase) / period) > 0
    elif pattern == "dotted":
        u, v = (xx + phase) % period - period / 2, (yy + phase) % period - period / 2
        on = u * u + v * v > (0.3 * period) ** 2
    elif pattern == "checkered":
        on = (((xx + phase) // period + (yy + phase) // period) % 2) == 0
    else:
        on = np.ones_like(xx, dtype=bool)
    light = np.clip(colour * 0.25 + 200, 0, 255)
    return np.where(on[..., None], colour, light)


def _first_background(domain, size, rng):
    if domain == "photo":
        tint_a, tint_b = rng.uniform(90, 200, 3), rng.uniform(90, 200, 3)
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        return (tint_a * (1 - ramp[..., None]) + tint_b * ramp[..., None]) * np.ones((size, size, 1), np.float32)
    if domain == "sketch":
        return np.full((size, size, 3), rng.uniform(235, 255), np.float32)
    if domain == "cartoon":
        return np.ones((size, size, 3), np.float32) * rng.uniform(200, 250, 3)
    grey = np.repeat(rng.integers(60, 200, (2, 2, 1), dtype=np.uint8), 3, axis=2)
    canvas = Image.fromarray(grey).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(3):
        x0, y0 = rng.uniform(0, size, 2)
        r = rng.uniform(size * 0.04, size * 0.14)
        fill = (int(rng.integers(0, 255)),) * 3
        if rng.random() < 0.5:
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=fill)
        else:
            draw.line((x0, y0, *rng.uniform(0, size, 2)), fill=fill, width=int(r / 3) + 1)
    return np.asarray(canvas, np.float32)


def _first_render(shape, colour, pattern, domain, rng, image_size):
    """The renderer as first written: channels-last full canvases, np.where patterns, PIL's rank filters and BOX
    resize, a fresh pixel grid per image (the shape placement and mask are shared code: they did not change)."""
    size = image_size * SUPERSAMPLE
    outer, holes = SHAPES[shape]()
    placed, scale = _place(outer + holes, size, rng)
    mask = _mask(placed[: len(outer)], placed[len(outer):], size)
    canvas = _first_background(domain, size, rng)
    fill_colour = _jitter(colour, rng)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    line = max(2, int(scale * 0.12))
    if domain == "sketch":
        window = 2 * (line // 2) + 1
        edge = _pil_extreme_filter(mask, window, np.maximum) - _pil_extreme_filter(mask, window, np.minimum)
        alpha = np.clip(edge, 0, 255)[..., None] / 255.0
        fill = _first_pattern_fill(pattern, fill_colour, size, rng) if pattern != "plain" else fill_colour
        inner = np.asarray(mask, np.float32)[..., None] / 255.0 * (0.35 if pattern != "plain" else 0.0)
        canvas = canvas * (1 - inner) + _first_pattern_fill(pattern, fill_colour, size, rng) * inner
        canvas, noise = canvas * (1 - alpha) + fill * alpha, 4
    else:
        fill = _first_pattern_fill(pattern, fill_colour, size, rng)
        if domain == "photo":
            yy, xx = (grid / size for grid in np.mgrid[0:size, 0:size].astype(np.float32))
            light_angle = rng.uniform(0, 2 * math.pi)
            shade = 0.75 + 0.45 * ((xx - 0.5) * math.cos(light_angle) + (yy - 0.5) * math.sin(light_angle))
            fill = np.clip(fill * shade[..., None], 0, 255)
        canvas = canvas * (1 - alpha) + fill * alpha
        if domain == "cartoon":
            outline = _pil_extreme_filter(mask, 2 * (line // 2) + 1, np.maximum)
            outline = np.clip(outline - np.asarray(mask, np.float32), 0, 255)[..., None] / 255.0
            canvas = canvas * (1 - outline)
        noise = {"photo": 6, "cartoon": 2, "noisy": 14}[domain]
    small = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((image_size, image_size), Image.BOX)
    out = np.asarray(small, np.float32) + rng.normal(0, noise, (image_size, image_size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("image_size", [32, 16])
def test_every_shape_domain_and_pattern_renders_as_first_written(image_size):
    combos = itertools.product(SHAPES, ("photo", "sketch", "cartoon", "noisy"), PATTERNS, range(2))
    for i, (shape, domain, pattern, _) in enumerate(combos):
        colour = list(COLOURS.values())[i % len(COLOURS)]
        image = render(shape, colour, pattern, domain, np.random.default_rng(i), image_size)
        reference = _first_render(shape, colour, pattern, domain, np.random.default_rng(i), image_size)
        np.testing.assert_array_equal(image, reference, err_msg=str((shape, domain, pattern, i)))
