"""The built-in shapes dataset: determinism, vocabularies, captions, hold-out, and what the pixels show."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from diffusion.config import ConfigError
from diffusion.data.shape_captions import (
    ATTRIBUTE_VALUES,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    attribute_values,
    canonical_caption,
    caption_for,
)
from diffusion.data.shapes import (
    PALETTE,
    POSITION_ANCHORS,
    generate_shapes,
    validate_holdout,
)
from diffusion.data_configs import ShapesConfig


def _samples(split="train", resolution=32, seed=0, **cfg):
    cfg = {"num_train": 300, "num_val": 300, **cfg}
    return list(generate_shapes(ShapesConfig(**cfg), split, resolution, seed))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text))


def _object_pixels(image) -> np.ndarray:
    """(H, W) bool: the saturated pixels. The background is nearly grey, every palette colour is not."""
    a = np.asarray(image, dtype=np.int16)
    return (a.max(axis=2) - a.min(axis=2)) > 70


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda c: float(np.sum((np.asarray(PALETTE[c]) - rgb) ** 2)))


def test_deterministic_for_a_seed_and_different_across_seeds_and_splits():
    a, b = _samples(num_train=40), _samples(num_train=40)
    assert [s.key for s in a] == [s.key for s in b]
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.caption, s.meta) for s in a] == [(s.caption, s.meta) for s in b]
    other_seed = _samples(num_train=40, seed=1)
    val = _samples("val", num_val=40)
    assert all(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other_seed))
    assert all(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, val))


def test_one_seed_gives_the_same_scenes_at_every_resolution():
    small, large = _samples(resolution=20, num_train=60), _samples(resolution=64, num_train=60)
    assert [(s.caption, s.meta) for s in small] == [(s.caption, s.meta) for s in large]


@pytest.mark.parametrize("resolution", [16, 32, 64, 256])
def test_images_are_rgb_at_the_resolution_and_keys_sort_in_generation_order(resolution):
    samples = _samples(resolution=resolution, num_train=12)
    assert all(s.image.mode == "RGB" and s.image.size == (resolution, resolution) for s in samples)
    keys = [s.key for s in samples]
    assert keys[3] == "shapes-train-000003" and keys == sorted(keys) and len(set(keys)) == len(keys)


def test_keys_widen_to_keep_sorted_order_past_a_million():
    # Only the key format is at stake; generating a million images is not needed to see the width.
    first = next(generate_shapes(ShapesConfig(num_train=1_234_567), "train", 16, 0))
    assert first.key == "shapes-train-0000000"


@pytest.mark.parametrize("level", ["single", "pair"])
def test_attributes_are_in_the_vocabulary_and_cover_every_value(level):
    scheme = attribute_values(level)
    seen = {name: Counter() for name in scheme}
    for s in _samples(level=level, resolution=16):
        attrs = s.meta["attributes"]
        assert set(attrs) == set(scheme) and s.meta["holdout"] is False
        for name, value in attrs.items():
            assert isinstance(value, str) and value in scheme[name] == ATTRIBUTE_VALUES[name]
            seen[name][value] += 1
    assert {name: set(c) for name, c in seen.items()} == {name: set(v) for name, v in scheme.items()}


def test_vocabularies():
    assert len(SHAPES) >= 5 and len(COLORS) == 6 and len(POSITIONS) == 5 and len(SIZES) == 2
    assert set(RELATIONS) == {"left of", "right of", "above", "below"}
    assert set(PALETTE) == set(COLORS)
    assert set(attribute_values("single")) == {"shape", "color", "size", "position"}
    assert set(attribute_values("pair")) == {"shape", "color", "relation", "shape2", "color2"}
    with pytest.raises(ValueError, match="level"):
        attribute_values("triple")


def test_captions_name_their_attributes_in_several_phrasings():
    samples = _samples()
    for s in samples:
        a, words = s.meta["attributes"], _words(s.caption)
        assert {a["color"], a["shape"]} <= words, s.caption
        assert words & {"small", "little", "tiny", "large", "big"}, s.caption
        other_colours = set(COLORS) - {a["color"]}
        assert not words & other_colours, s.caption
        assert " a o" not in f" {s.caption}", s.caption  # "an orange", never "a orange"
    # The same attributes, phrased many ways by the rng.
    attrs = {"shape": "circle", "color": "red", "size": "small", "position": "top left"}
    rng = np.random.default_rng(0)
    phrasings = {caption_for(attrs, rng) for _ in range(200)}
    assert len(phrasings) >= 6
    assert "top-left: a little red circle" in phrasings
    assert canonical_caption(attrs) == "a small red circle in the top left"


def test_pair_captions_name_both_objects_and_the_relation():
    samples = _samples(level="pair")
    for s in samples:
        a, words = s.meta["attributes"], _words(s.caption)
        assert {a["color"], a["shape"], a["color2"], a["shape2"]} <= words, s.caption
        assert (a["color"], a["shape"]) != (a["color2"], a["shape2"])
        assert words & {"left", "right", "above", "below"}, s.caption
    assert len({re.sub(r"\b(" + "|".join(COLORS + SHAPES) + r")\b", "", s.caption) for s in samples}) >= 8
    attrs = {"shape": "circle", "color": "red", "relation": "left of", "shape2": "square", "color2": "orange"}
    assert canonical_caption(attrs) == "a red circle to the left of an orange square"
    with pytest.raises(ValueError, match="keys"):
        canonical_caption({"shape": "circle", "color": "red"})


@pytest.mark.parametrize("level", ["single", "pair"])
def test_holdout_combinations_only_in_val_at_the_configured_fraction(level):
    held = {("purple", "triangle"), ("red", "circle")}
    cfg = {"level": level, "holdout": ("purple triangle", "Red  Circle"), "holdout_val_fraction": 0.25}

    def combos(a):
        return {(a["color"], a["shape"])} | ({(a["color2"], a["shape2"])} if level == "pair" else set())

    train = _samples(resolution=16, num_train=500, **cfg)
    assert not any(combos(s.meta["attributes"]) & held for s in train)
    val = _samples("val", resolution=16, num_val=200, **cfg)
    flagged = [s for s in val if s.meta["holdout"]]
    assert len(flagged) == 50
    assert all(combos(s.meta["attributes"]) & held for s in flagged)
    assert not any(combos(s.meta["attributes"]) & held for s in val if not s.meta["holdout"])
    assert {c for s in flagged for c in combos(s.meta["attributes"])} >= held


def test_no_holdout_means_no_flagged_val_images():
    assert not any(s.meta["holdout"] for s in _samples("val", resolution=16, num_val=50))


@pytest.mark.parametrize("bad", ["pink triangle", "purple blob", "triangle", "purple triangle square"])
def test_bad_holdout_raises_naming_the_key_and_the_allowed_words(bad):
    cfg = ShapesConfig(holdout=("red circle", bad))
    with pytest.raises(ConfigError, match=r"shard\.shapes\.holdout\[1\]") as err:
        validate_holdout(cfg)
    assert "purple" in str(err.value) and "triangle" in str(err.value)
    with pytest.raises(ConfigError):  # the generator refuses before drawing anything
        next(generate_shapes(cfg, "train", 32, 0))


def test_holding_out_everything_is_refused():
    every = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
    with pytest.raises(ConfigError, match=r"shard\.shapes\.holdout"):
        validate_holdout(ShapesConfig(holdout=every))
    assert validate_holdout(ShapesConfig(holdout=every[1:])) == {(c, s) for c in COLORS for s in SHAPES} - {
        ("red", "circle")}  # one combination left is enough for single objects
    with pytest.raises(ConfigError, match="needs 2"):
        validate_holdout(ShapesConfig(holdout=every[1:], level="pair"))


@pytest.mark.parametrize("resolution", [32, 64])
def test_pixels_show_the_declared_colour_position_and_size(resolution):
    areas = {size: [] for size in SIZES}
    for s in _samples(resolution=resolution, num_train=150):
        a = s.meta["attributes"]
        mask = _object_pixels(s.image)
        pixels = np.asarray(s.image, dtype=np.float64)[mask]  # (N, 3)
        assert _nearest_colour(np.median(pixels, axis=0)) == a["color"], s.caption
        ys, xs = np.nonzero(mask)
        centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / resolution
        nearest = min(POSITION_ANCHORS, key=lambda p: float(np.sum((np.asarray(POSITION_ANCHORS[p]) - centroid) ** 2)))
        assert nearest == a["position"], s.caption
        # Coverage, not a thresholded count: anti-aliased edges would count a small object's rim in full.
        sat = np.ptp(np.asarray(s.image, dtype=np.float64), axis=2)  # (H, W)
        areas[a["size"]].append(np.clip(sat - 20, 0, None).sum() / (np.median(sat[mask]) - 20))
    # Any large object, of any shape, covers clearly more pixels than any small one.
    assert min(areas["large"]) > 1.3 * max(areas["small"])


def test_pair_pixels_show_the_relation():
    checked = 0
    for s in _samples(level="pair", resolution=32, num_train=150):
        a = s.meta["attributes"]
        if a["color"] == a["color2"]:
            continue  # the two objects cannot be told apart by colour
        img = np.asarray(s.image, dtype=np.float64)
        ys, xs = np.nonzero(_object_pixels(s.image))
        names = [_nearest_colour(img[y, x]) for y, x in zip(ys, xs)]
        first = np.array([n == a["color"] for n in names])
        second = np.array([n == a["color2"] for n in names])
        assert first.sum() > 5 and second.sum() > 5, s.caption
        dx = xs[second].mean() - xs[first].mean()  # > 0: the first object is to the left
        dy = ys[second].mean() - ys[first].mean()  # > 0: the first object is above
        along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
            a["relation"]]
        assert along > 0.3 * 32 and along > abs(across), s.caption
        checked += 1
    assert checked > 100


def test_a_holdout_with_no_val_image_to_measure_it_is_refused():
    """floor(num_val * holdout_val_fraction) held-out val images: none would leave the holdout unmeasured."""
    with pytest.raises(ConfigError, match=r"shard\.shapes\.holdout_val_fraction"):
        validate_holdout(ShapesConfig(num_val=4, holdout=("purple triangle",), holdout_val_fraction=0.2))
    assert validate_holdout(ShapesConfig(num_val=5, holdout=("purple triangle",), holdout_val_fraction=0.2))
    assert validate_holdout(ShapesConfig(num_val=4, holdout_val_fraction=0.2)) == frozenset()  # nothing held


def test_each_shape_draws_its_own_outline():
    """The pixels show the named shape, not only its colour, size and place: each shape's coverage of its
    bounding box (square 1, circle pi/4, cross ~0.59, triangle and diamond 1/2, star ~0.37), and the upright
    triangle's weight in its lower half. Two polygons swapped passed every pixel test."""
    from diffusion.data.shapes import generate_shapes
    from diffusion.data_configs import ShapesConfig

    fills: dict[str, list[float]] = {s: [] for s in SHAPES}
    lower: list[float] = []
    for s in generate_shapes(ShapesConfig(num_train=400), "train", 128, 0):
        a = s.meta["attributes"]
        if a["size"] != "large":
            continue
        img = np.asarray(s.image, dtype=np.float64)
        sat = np.clip(np.ptp(img, axis=2) - 20, 0, None)  # (H, W) coverage-weighted, as the size test
        full = np.median(sat[sat > 50])
        cover = np.clip(sat / full, 0, 1)
        ys, xs = np.nonzero(cover > 0.5)
        box = cover[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        fills[a["shape"]].append(cover.sum() / box.size)
        if a["shape"] == "triangle":
            half = len(box) // 2
            lower.append(box[half:].sum() / box.sum())
    mean = {s: float(np.mean(v)) for s, v in fills.items()}
    assert mean["square"] > 0.9 and 0.72 < mean["circle"] < 0.85 and 0.5 < mean["cross"] < 0.68, mean
    assert 0.4 < mean["triangle"] < 0.58 and 0.4 < mean["diamond"] < 0.58 and mean["star"] < 0.45, mean
    assert min(lower) > 0.6, lower  # apex up: three quarters of a triangle's area is in its lower half
