"""Procedural renderer for the synthetic suite: one small RGB image of an attribute×object class in a domain.

Every image is a pure function of its integer seed sequence, so any subset of any split is reproducible without
generating the rest. Shapes are drawn as polygons at 4× supersampling, then box-downsampled, which is cheap
(~0.65 ms/image at 32 px on one core of the Xeon: benchmarks/render.py) and anti-aliased. Canvases are channels
first [3, H, W], so that every per-pixel blend runs over long contiguous planes (a channels-last [H, W, 3] canvas
blended with an [H, W, 1] mask steps through 3-element inner loops), and flat or one-way-graded layers stay
broadcastable arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
# Bump when rendering changes: cached images are keyed by it, so stale caches are never reused.
RENDER_VERSION = 3

Polygon = list[tuple[float, float]]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (238, 210, 2),
    "green": (44, 160, 44),
    "cyan": (23, 190, 207),
    "blue": (31, 80, 220),
    "purple": (148, 70, 189),
    "pink": (247, 120, 190),
}


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> Polygon:
    return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


def _star() -> Polygon:
    return [((1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + math.pi * i / 5),
             (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + math.pi * i / 5)) for i in range(10)]


def _heart() -> Polygon:
    points = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17, -y / 17 - 0.1))
    return points


def _cross(arm: float = 0.33) -> Polygon:
    a, b = arm, 1.0
    return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]


# Each shape is (outer polygons, hole polygons) in the unit square [-1, 1]².
SHAPES: dict[str, Callable[[], tuple[list[Polygon], list[Polygon]]]] = {
    "circle": lambda: ([_regular(40)], []),
    "square": lambda: ([_regular(4, 1.2, math.pi / 4)], []),
    "triangle": lambda: ([[(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)]], []),
    "star": lambda: ([_star()], []),
    "cross": lambda: ([_cross()], []),
    "ring": lambda: ([_regular(40)], [_regular(40, 0.55)]),
    "heart": lambda: ([_heart()], []),
    "moon": lambda: ([_regular(40)], [[(x + 0.45, y - 0.2) for x, y in _regular(40, 0.85)]]),
    # Second family: different objects, so cross-dataset transfer means new nouns, not new combinations.
    "arrow": lambda: ([[(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)]], []),
    "diamond": lambda: ([[(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]], []),
    "hexagon": lambda: ([_regular(6)], []),
    "bolt": lambda: ([[(0.2, -1), (-0.6, 0.1), (-0.05, 0.1), (-0.3, 1), (0.6, -0.2), (0.05, -0.2), (0.35, -1)]], []),
    "chevron": lambda: ([[(-1, -0.8), (0, 0.1), (1, -0.8), (1, -0.1), (0, 0.8), (-1, -0.1)]], []),
    "hourglass": lambda: ([[(-0.8, -1), (0.8, -1), (0.08, 0), (0.8, 1), (-0.8, 1), (-0.08, 0)]], []),
    "drop": lambda: ([[(0.0, -1.0)] + [(0.62 * math.cos(t), 0.35 + 0.62 * math.sin(t))
                                        for t in np.linspace(-0.15 * math.pi, 1.15 * math.pi, 24)]], []),
    "tee": lambda: ([[(-1, -1), (1, -1), (1, -0.5), (0.25, -0.5), (0.25, 1), (-0.25, 1), (-0.25, -0.5), (-1, -0.5)]], []),
}

PATTERNS = ("striped", "dotted", "checkered", "plain")


def _place(polygons: Sequence[Polygon], size: int, rng: np.random.Generator) -> tuple[list[Polygon], float]:
    """Random scale, rotation and position; returns pixel-space polygons and the scale in pixels."""
    scale = size * rng.uniform(0.26, 0.38)
    angle = rng.uniform(-0.5, 0.5)
    cx, cy = size * rng.uniform(0.38, 0.62, size=2)
    c, s = math.cos(angle), math.sin(angle)
    placed = [[(cx + scale * (c * x - s * y), cy + scale * (s * x + c * y)) for x, y in poly] for poly in polygons]
    return placed, scale


def _mask(outer: list[Polygon], holes: list[Polygon], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for poly in outer:
        draw.polygon(poly, fill=255)
    for poly in holes:
        draw.polygon(poly, fill=0)
    return mask


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) coordinates of a size×size canvas as float32, shared read-only by every image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _extreme_filter(mask: Image.Image, size: int, reduce: np.ufunc) -> np.ndarray:
    """PIL's MaxFilter(size) (reduce=np.maximum) or MinFilter(size) (np.minimum) of `mask`, edges replicated as PIL
    does, as float32. A square window's max/min is separable, so two 1-D passes give exactly PIL's values, ~30×
    faster than its per-pixel rank sort (a third of the rendering time; tests/test_render.py)."""
    a = np.asarray(mask)
    r, (h, w) = size // 2, a.shape
    padded = np.pad(a, r, mode="edge")
    rows = reduce.reduce([padded[k:k + h] for k in range(size)])
    return reduce.reduce([rows[:, k:k + w] for k in range(size)]).astype(np.float32)


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: float = 18) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _pattern_fill(pattern: str, colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [3, size, size] texture (channels first, like every canvas here): the colour modulated by the pattern; plain
    is the colour alone, [3, 1, 1], which broadcasts to the same pixels."""
    yy, xx = _pixel_grid(size)
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
        return colour[:, None, None]
    light = np.clip(colour * 0.25 + 200, 0, 255)
    # A lookup, not np.where over [size, size, 3]: the same values, ~5x faster (one pass per channel).
    texture, pick = np.empty((3, size, size), colour.dtype), on.view(np.uint8)
    for channel in range(3):
        np.take(np.array((light[channel], colour[channel])), pick, out=texture[channel])
    return texture


def _background(domain: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The paper behind the object, channels first; a flat or one-way-graded one as a broadcastable [3, 1 or size,
    1 or size] array (the same pixels as the full canvas, without writing them all)."""
    if domain == "photo":
        tint_a, tint_b = rng.uniform(90, 200, 3)[:, None, None], rng.uniform(90, 200, 3)[:, None, None]
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        return tint_a * (1 - ramp) + tint_b * ramp
    if domain == "sketch":
        return np.full((1, 1, 1), rng.uniform(235, 255), np.float32)
    if domain == "cartoon":
        return rng.uniform(200, 250, 3)[:, None, None]
    if domain == "noisy":
        # Grey clutter and strong noise: shape and colour stay legible, but nothing like it was seen in pretraining.
        grey = np.repeat(rng.integers(60, 200, (2, 2, 1), dtype=np.uint8), 3, axis=2)
        canvas = Image.fromarray(grey).resize((size, size), Image.BILINEAR)
        draw = ImageDraw.Draw(canvas)
        for _ in range(3):  # clutter: random grey blobs and lines
            x0, y0 = rng.uniform(0, size, 2)
            r = rng.uniform(size * 0.04, size * 0.14)
            fill = (int(rng.integers(0, 255)),) * 3
            if rng.random() < 0.5:
                draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=fill)
            else:
                draw.line((x0, y0, *rng.uniform(0, size, 2)), fill=fill, width=int(r / 3) + 1)
        return np.ascontiguousarray(np.asarray(canvas, np.float32).transpose(2, 0, 1))
    raise ValueError(f"unknown rendering domain {domain!r}")


def render(shape: str, colour: tuple[int, int, int], pattern: str, domain: str, rng: np.random.Generator,
           image_size: int = 32) -> np.ndarray:
    """Render one image as uint8 [image_size, image_size, 3]."""
    size = image_size * SUPERSAMPLE
    outer, holes = SHAPES[shape]()
    placed, scale = _place(outer + holes, size, rng)
    outer_px, holes_px = placed[: len(outer)], placed[len(outer):]
    mask = _mask(outer_px, holes_px, size)
    canvas = _background(domain, size, rng)
    fill_colour = _jitter(colour, rng)
    alpha = np.asarray(mask, np.float32) / 255.0
    line = max(2, int(scale * 0.12))

    if domain == "sketch":
        # Outline only: the mask's edge, in the object's colour, on paper.
        window = 2 * (line // 2) + 1
        edge = _extreme_filter(mask, window, np.maximum) - _extreme_filter(mask, window, np.minimum)
        alpha = np.clip(edge, 0, 255) / 255.0
        fill = _pattern_fill(pattern, fill_colour, size, rng) if pattern != "plain" else fill_colour[:, None, None]
        # Patterns still need to be visible in a sketch: hatch the inside lightly.
        inner = np.asarray(mask, np.float32) / 255.0 * (0.35 if pattern != "plain" else 0.0)
        canvas = canvas * (1 - inner) + _pattern_fill(pattern, fill_colour, size, rng) * inner
        return _finish(canvas * (1 - alpha) + fill * alpha, image_size, rng, noise=4)

    fill = _pattern_fill(pattern, fill_colour, size, rng)
    if domain == "photo":
        # Directional shading makes it look lit, not flat.
        yy, xx = (grid / size for grid in _pixel_grid(size))
        light_angle = rng.uniform(0, 2 * math.pi)
        shade = 0.75 + 0.45 * ((xx - 0.5) * math.cos(light_angle) + (yy - 0.5) * math.sin(light_angle))
        fill = np.clip(fill * shade, 0, 255)
    canvas = canvas * (1 - alpha) + fill * alpha
    if domain == "cartoon":
        outline = _extreme_filter(mask, 2 * (line // 2) + 1, np.maximum)
        outline = np.clip(outline - np.asarray(mask, np.float32), 0, 255) / 255.0
        canvas = canvas * (1 - outline)
    noise = {"photo": 6, "cartoon": 2, "noisy": 14}[domain]
    return _finish(canvas, image_size, rng, noise=noise)


def _finish(canvas: np.ndarray, image_size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    pixels = np.broadcast_to(np.clip(canvas, 0, 255).astype(np.uint8), (3,) + (image_size * SUPERSAMPLE,) * 2)
    small = box_downsample(pixels).transpose(1, 2, 0)
    out = small.astype(np.float32) + rng.normal(0, noise, (image_size, image_size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def box_downsample(pixels: np.ndarray) -> np.ndarray:
    """PIL's `resize(..., Image.BOX)` by SUPERSAMPLE of uint8 channel planes [C, H, W], bit for bit, ~4x faster than
    the round trip through a PIL image (which was a quarter of the rendering time). PIL resamples along rows, then
    along columns, each pass in 22-bit fixed point, rounded to uint8 in between; at a factor of 4 every weight is
    exactly 2^20, so a pass is (sum of 4 pixels + 2) >> 2 (tests/test_render.py checks it against PIL)."""
    assert SUPERSAMPLE == 4, "the fixed-point shortcut holds for a factor of 4"
    wide = pixels.astype(np.uint16)
    rows = (wide[..., 0::4] + wide[..., 1::4] + wide[..., 2::4] + wide[..., 3::4] + 2) >> 2
    return ((rows[:, 0::4] + rows[:, 1::4] + rows[:, 2::4] + rows[:, 3::4] + 2) >> 2).astype(np.uint8)


RenderSpec = tuple[tuple[int, ...], str, str | None, str, str, int]


def render_spec(spec: RenderSpec) -> np.ndarray:
    """Render from (seed sequence, shape, colour name or None for a random colour, pattern, domain, size)."""
    seed, shape, colour, pattern, domain, size = spec
    rng = np.random.default_rng(seed)
    name = colour if colour is not None else list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return render(shape, COLOURS[name], pattern, domain, rng, size)


def render_many(specs: Sequence[RenderSpec]) -> np.ndarray:
    """Render a list of specs into one uint8 array [n, size, size, 3] (the unit of work of a worker process)."""
    if not specs:
        return np.zeros((0, 1, 1, 3), np.uint8)
    return np.stack([render_spec(spec) for spec in specs])
