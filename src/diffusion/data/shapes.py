"""The built-in dataset `shapes`: coloured geometric shapes with captions, generated procedurally.

Why a procedural dataset: the pipeline must run anywhere with nothing to download, and because every
image's content is known exactly, a small classifier (the judge, `diffusion.evaluation`) can later measure
whether a generated image follows its caption. Colour-shape combinations held out of training measure
compositional generalisation ("purple triangle" seen only as "purple ..." and "... triangle").

This module draws the attributes and the pictures; their words (the attribute scheme, the vocabulary and
the caption templates) live in `diffusion.data.shape_captions`.

Images
    A light, low-contrast background (a two-tone linear gradient in a random direction, faint noise) with
    one object (``level: single``) or two objects in a spatial relation (``level: pair``). Objects are
    drawn supersampled and box-filtered (anti-aliased), upright, so a diamond is never a rotated square.
    Placement and size jitter a little and colours a few levels, so no two images are copies. Colour,
    position, size and relation stay unambiguous from 16 px up; shapes need 32 px (a small star is ~7 px).

Metadata
    ``meta["attributes"]`` holds what the image shows, in the scheme of `shape_captions`, and the caption
    phrases it. ``meta["holdout"]`` (outside the attributes) is True for a val image drawn from the held-out
    combinations (for pair: at least one of its objects is held out) and False otherwise.

Everything is deterministic for a seed: each split has its own numpy stream seeded with (seed, split).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from diffusion.config import ConfigError
from diffusion.data.records import Sample
from diffusion.data.shape_captions import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    caption_for,
)
from diffusion.data_configs import ShapesConfig

SPLITS: tuple[str, ...] = ("train", "val")  # the index is the split's id in the seed

#: sRGB of each colour. Saturated (unlike the background) and at least ~75 apart (orange-yellow, the
#: closest pair), so the colour is unambiguous even in the few pixels of a small object at 16 px.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 190),
    "orange": (245, 135, 25),
}

#: Centre of each position's cell, as fractions of the side (x to the right, y down). Each quadrant cell
#: is half the side wide, and so is the centre cell; an object's centre stays nearest its own anchor.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
#: Side of an object's bounding box as a fraction of the image side, before `SHAPE_SCALE`. Nearly 2x
#: apart (~3.6x in area), so "small" and "large" never overlap in pixel count, whatever the shapes.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.215, "large": 0.41}
PAIR_SIZE = 0.34  # both objects of a pair: two fit side by side without touching
#: Per-shape factor on the box side. Sparse shapes fill less of their box (a star 37%, a square 100%);
#: enlarging them evens out the pixel areas (to within 2x) so that size is about area, not only the box.
SHAPE_SCALE: dict[str, float] = {
    "circle": 1.0, "square": 0.92, "triangle": 1.05, "diamond": 1.05, "star": 1.1, "cross": 1.0
}
SIZE_JITTER = 0.05  # relative; far below the gap between small and large
MAX_JITTER = 0.07  # of the side: the farthest a centre moves from its anchor (half the cell gap is 0.18)
MARGIN = 0.01  # of the side: objects keep this far from the image border
NOISE_STD = 3.0  # grey levels of per-pixel noise over the whole image
COLOR_JITTER = 8  # grey levels each channel of an object's colour may move


# --------------------------------------------------------------------------------------------------
# Hold-out combinations and attribute sampling
# --------------------------------------------------------------------------------------------------

Combo = tuple[str, str]  # (colour, shape)
T = TypeVar("T")
ALL_COMBOS: tuple[Combo, ...] = tuple(itertools.product(COLORS, SHAPES))


def validate_holdout(cfg: ShapesConfig) -> frozenset[Combo]:
    """Parse ``cfg.holdout`` into (colour, shape) pairs; raise ConfigError naming the key if any is bad.

    Cheap, so the shard stage calls it before doing any work. Case and extra spaces are forgiven.
    """
    key = "shard.shapes.holdout"
    held = set()
    for i, text in enumerate(cfg.holdout):
        words = text.lower().split()
        if len(words) != 2 or words[0] not in PALETTE or words[1] not in SHAPES:
            raise ConfigError(
                f"{key}[{i}]: {text!r} is not 'colour shape'; colours: {', '.join(COLORS)}; "
                f"shapes: {', '.join(SHAPES)}"
            )
        held.add((words[0], words[1]))
    need = 1 if cfg.level == "single" else 2  # a pair needs two different combinations
    if len(ALL_COMBOS) - len(held) < need:
        raise ConfigError(f"{key}: holds out too many combinations; level {cfg.level!r} needs {need} left to train on")
    slots = math.floor(cfg.num_val * cfg.holdout_val_fraction)  # the held-out val images (_is_holdout)
    if held and slots < 1:
        raise ConfigError(f"shard.shapes.holdout_val_fraction: {cfg.holdout_val_fraction} of num_val {cfg.num_val} "
                          f"gives no held-out val image, so {key} would never be measured")
    return frozenset(held)


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _single_attributes(rng: np.random.Generator, combos: Sequence[Combo], partners: Sequence[Combo]) -> dict[str, str]:
    color, shape = _pick(rng, combos)  # one object: `partners` is unused
    return {"shape": shape, "color": color, "size": _pick(rng, SIZES), "position": _pick(rng, POSITIONS)}


def _pair_attributes(rng: np.random.Generator, combos: Sequence[Combo], partners: Sequence[Combo]) -> dict[str, str]:
    """One object from `combos`, the other a different one from `partners`, in a random order."""
    first = _pick(rng, combos)
    second = _pick(rng, [c for c in partners if c != first])
    if rng.integers(2):
        first, second = second, first
    relation = _pick(rng, RELATIONS)
    if relation in _CONVERSE:
        # "A right of B" is the picture of "B left of A": one label per picture (the left or upper object
        # first), or the judge would see the same scene under two labels. Captions still name either first.
        first, second, relation = second, first, _CONVERSE[relation]
    return {"shape": first[1], "color": first[0], "relation": relation, "shape2": second[1], "color2": second[0]}


#: The relations stored as labels are "left of" and "above"; the other two are drawn, then read from the other side.
_CONVERSE = {"right of": "left of", "below": "above"}


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


class _Object(NamedTuple):
    shape: str
    rgb: np.ndarray  # (3,) float32
    cx: float  # centre, fractions of the side
    cy: float
    side: float  # bounding-box side, fraction of the side


def _normalised(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Centre a polygon's bounding box on 0 and scale its longer side to 1."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    scale = max(max(xs) - min(xs), max(ys) - min(ys))
    return tuple(((x - mx) / scale, (y - my) / scale) for x, y in points)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    # A fat star (inner radius 0.45, not the pentagram's 0.38) keeps its arms visible at 7 px.
    radii = [1.0 if i % 2 == 0 else inner for i in range(2 * points)]
    angles = [-math.pi / 2 + i * math.pi / points for i in range(2 * points)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


def _cross(arm: float = 0.36) -> list[tuple[float, float]]:
    h = arm / 2  # half the arm width; arms reach the box edge
    return [(-h, -0.5), (h, -0.5), (h, -h), (0.5, -h), (0.5, h), (h, h), (h, 0.5), (-h, 0.5), (-h, h),
            (-0.5, h), (-0.5, -h), (-h, -h)]


#: Unit polygons (bounding box [-0.5, 0.5]^2, y down); the circle is drawn as an ellipse instead.
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "square": ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "triangle": ((0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)),  # as tall as wide, like the other shapes
    "diamond": ((0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)),
    "star": _normalised(_star()),
    "cross": _normalised(_cross()),
}


def _supersampling(resolution: int) -> int:
    # 4x4 samples per pixel where objects are a few pixels wide; 2x2 suffices (and is 4x cheaper) above.
    return 4 if resolution <= 64 else 2


def _paint(img: np.ndarray, obj: _Object) -> None:
    """Blend the object into `img` (H, W, 3) float32, in place, weighted by its anti-aliased coverage."""
    resolution = img.shape[0]
    k = _supersampling(resolution)
    # Draw only the object's bounding box (plus a pixel): 5-10x fewer pixels than the whole image.
    half = obj.side * resolution / 2
    x0, y0 = (max(0, math.floor(c * resolution - half) - 1) for c in (obj.cx, obj.cy))
    x1, y1 = (min(resolution, math.ceil(c * resolution + half) + 1) for c in (obj.cx, obj.cy))
    mask = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
    draw = ImageDraw.Draw(mask)
    s, x, y = 2 * half * k, (obj.cx * resolution - x0) * k, (obj.cy * resolution - y0) * k
    if obj.shape == "circle":
        draw.ellipse((x - s / 2, y - s / 2, x + s / 2, y + s / 2), fill=255)
    else:
        draw.polygon([(x + u * s, y + v * s) for u, v in _POLYGONS[obj.shape]], fill=255)
    # reduce(k) averages each k x k block: a box filter, i.e. the fraction of the pixel covered.
    alpha = np.asarray(mask.reduce(k), dtype=np.float32)[..., None] * np.float32(1 / 255)  # (h, w, 1)
    crop = img[y0:y1, x0:x1]  # (h, w, 3), a view
    crop += alpha * (obj.rgb - crop)


@functools.lru_cache(maxsize=8)
def _noise_tile(resolution: int) -> np.ndarray:
    """A fixed (2H, 2W, 3) float32 tile of Gaussian noise (std NOISE_STD); each image adds a random
    H x W window of it. Drawing fresh noise per image was half the generation time; a window at a random
    offset looks just as random for a faint texture, and stays deterministic."""
    rng = np.random.default_rng(0x5EED)  # a constant: the tile is part of the dataset's definition
    return rng.standard_normal((2 * resolution, 2 * resolution, 3), dtype=np.float32) * np.float32(NOISE_STD)


@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> np.ndarray:
    """Pixel-centre coordinates along one axis, (resolution,) float32 in (-0.5, 0.5)."""
    return (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5


def _background(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A light, nearly grey two-tone gradient, (H, W, 3) float32. Low saturation by construction, so
    objects (all saturated) stand out by colour even when, like yellow, they are about as light."""
    base = rng.uniform(200.0, 238.0) + rng.uniform(-8.0, 8.0, 3)  # light grey, faintly tinted
    delta = rng.uniform(-15.0, 15.0) + rng.uniform(-4.0, 4.0, 3)  # mostly lighter/darker, not hue
    theta = rng.uniform(0.0, 2 * math.pi)
    c = _pixel_centres(resolution)
    t = np.clip(0.5 + math.cos(theta) * c[None, :] + math.sin(theta) * c[:, None], 0.0, 1.0)  # (H, W)
    return base.astype(np.float32) + t[..., None] * delta.astype(np.float32)  # (H, W, 3)


def _make_object(shape: str, color: str, cx: float, cy: float, side: float, rng: np.random.Generator) -> _Object:
    rgb = np.asarray(PALETTE[color], np.float32) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3)
    return _Object(shape, rgb.astype(np.float32), cx, cy, side * SHAPE_SCALE[shape])


def _single_layout(a: dict[str, str], rng: np.random.Generator) -> list[_Object]:
    side = SIZE_FRACTIONS[a["size"]] * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    ax, ay = POSITION_ANCHORS[a["position"]]
    # Every cell is half the side wide: the object stays inside the image (and so, nearly, its cell).
    j = max(0.0, min(MAX_JITTER, 0.25 - side * SHAPE_SCALE[a["shape"]] / 2 - MARGIN))
    cx, cy = ax + rng.uniform(-j, j), ay + rng.uniform(-j, j)
    return [_make_object(a["shape"], a["color"], cx, cy, side, rng)]


def _pair_layout(a: dict[str, str], rng: np.random.Generator) -> list[_Object]:
    side = PAIR_SIZE * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    # Along the relation's axis the objects sit in opposite halves (centres >= 0.42 apart, more than a
    # side, so they never touch); across it each wanders at most 0.12 from the middle. The along-axis
    # gap always beats the cross-axis offset, so "left of" never reads as "above".
    near, far = 0.25 + rng.uniform(-0.04, 0.04), 0.75 + rng.uniform(-0.04, 0.04)
    across = 0.5 + rng.uniform(-0.12, 0.12, 2)
    first_along, second_along = (near, far) if a["relation"] in ("left of", "above") else (far, near)
    if a["relation"] in ("left of", "right of"):
        centres = [(first_along, across[0]), (second_along, across[1])]
    else:
        centres = [(across[0], first_along), (across[1], second_along)]
    objects = (a["shape"], a["color"]), (a["shape2"], a["color2"])
    return [_make_object(s, c, float(x), float(y), side, rng) for (s, c), (x, y) in zip(objects, centres)]


def _render(objects: list[_Object], rng: np.random.Generator, resolution: int) -> Image.Image:
    img = _background(rng, resolution)  # (H, W, 3)
    for obj in objects:
        _paint(img, obj)
    # Floats: rng.integers(resolution) may take a resolution-dependent number of draws (rejection
    # sampling); keeping the stream aligned gives one seed the same scenes at every resolution.
    dx, dy = (rng.random(2) * resolution).astype(np.int64)
    img += _noise_tile(resolution)[dy : dy + resolution, dx : dx + resolution]
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------------------

_LEVELS = {"single": (_single_attributes, _single_layout), "pair": (_pair_attributes, _pair_layout)}


def _is_holdout(i: int, fraction: float) -> bool:
    # Spread exactly floor(n * fraction) held-out images evenly, so any prefix has the right fraction.
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def generate_shapes(
    cfg: ShapesConfig, split: Literal["train", "val"], resolution: int, seed: int
) -> Iterator[Sample]:
    """Yield ``cfg.num_train`` or ``cfg.num_val`` samples of the shapes dataset, deterministically.

    Keys are ``shapes-<split>-000042``, so sorted order is generation order. Train and val draw from
    independent streams seeded with (seed, split). Train never contains a held-out combination; in val,
    a fraction ``cfg.holdout_val_fraction`` of the images (evenly spread) contain one.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    if resolution < 8:
        raise ValueError(f"resolution: expected at least 8 pixels, got {resolution}")
    held = sorted(validate_holdout(cfg))
    allowed = [c for c in ALL_COMBOS if c not in set(held)]
    n = cfg.num_train if split == "train" else cfg.num_val
    fraction = cfg.holdout_val_fraction if split == "val" and held else 0.0
    draw_attributes, layout = _LEVELS[cfg.level]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    width = max(6, len(str(n - 1)))
    for i in range(n):
        holdout = _is_holdout(i, fraction)
        # A held-out image has one held-out object; its partner (pair level) may be any other combination.
        attributes = draw_attributes(rng, held, ALL_COMBOS) if holdout else draw_attributes(rng, allowed, allowed)
        image = _render(layout(attributes, rng), rng, resolution)
        yield Sample(
            key=f"shapes-{split}-{i:0{width}d}",
            image=image,
            caption=caption_for(attributes, rng),
            meta={"attributes": attributes, "holdout": holdout},
        )
