"""The words of the built-in dataset `shapes` (`diffusion.data.shapes` draws the pictures): the attribute
vocabulary every sample is labelled with, and the captions that phrase those labels.

Why apart from the drawing: the labels are the dataset's interface to everything downstream. The shard stage
writes the scheme into the manifest (the judge's heads, `diffusion.evaluation.judge`, are built from it), and
the evaluate stage phrases its fixed prompts with `canonical_caption`; neither needs the renderer. (The two
still share one random stream: `caption_for` draws from the generator that draws the images, so a changed
template or synonym list can change the images generated after it.)

Attribute scheme: ``meta["attributes"]``, a flat ``dict[str, str]``
    single: ``shape`` (SHAPES), ``color`` (COLORS), ``size`` (SIZES), ``position`` (POSITIONS).
    pair:   ``shape``, ``color`` (the first object), ``relation`` ("left of" or "above"), ``shape2``, ``color2``
            (the second object). The relation reads first-to-second: ``relation: "left of"`` is
            "a red circle to the left of a blue square" with the circle first. The stored relation is always
            "left of" or "above" (the left or upper object first: one label per picture, which the judge
            needs); captions still name either object first ("a blue square to the right of a red circle").
            Both objects have the same size and never overlap; they always differ in colour or shape, so the
            caption names each one.

Captions phrase the same attributes in several ways (see `_SINGLE_TEMPLATES`, `_PAIR_TEMPLATES`), with
synonyms for sizes (little, tiny, big) and the centre (middle); colour and shape words are always the
vocabulary words themselves. `canonical_caption` gives one fixed phrasing for evaluation prompts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

AttributeScheme = dict[str, tuple[str, ...]]
_SCHEMES: dict[str, AttributeScheme] = {
    "single": {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS},
    # Stored relations: the left or upper object first (shapes._pair_attributes); captions name all four.
    "pair": {"shape": SHAPES, "color": COLORS, "relation": ("left of", "above"), "shape2": SHAPES, "color2": COLORS},
}
#: Every attribute name of either level -> its allowed values (the judge's heads); per level, see
#: `attribute_values`.
ATTRIBUTE_VALUES: AttributeScheme = {**_SCHEMES["single"], **_SCHEMES["pair"]}


def attribute_values(level: Literal["single", "pair"]) -> AttributeScheme:
    """The attribute names of one level -> their allowed values, in a fixed order."""
    if level not in _SCHEMES:
        raise ValueError(f"level: expected one of {', '.join(_SCHEMES)}, got {level!r}")
    return dict(_SCHEMES[level])


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------

_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_POSITION_WORDS = {p: (p,) for p in POSITIONS} | {"center": ("center", "middle")}
# Per relation: the phrase, a short form, the converse (for captions naming the second object first),
# and the phrase after "with <first object>" ("a blue square with a red circle to its left").
_RELATION_WORDS = {
    "left of": ("to the left of", "left of", "to the right of", "to its left"),
    "right of": ("to the right of", "right of", "to the left of", "to its right"),
    "above": ("above", "above", "below", "above it"),
    "below": ("below", "below", "above", "below it"),
}
# The first template of each is the canonical phrasing. Articles are fixed afterwards ("an orange").
_SINGLE_TEMPLATES = (
    "a {size} {color} {shape} in the {pos}",
    "{pos_h}: a {size} {color} {shape}",
    "a {color} {shape}, {size}, at the {pos}",
    "a {size} {color} {shape} at the {pos} of the image",
    "there is a {size} {color} {shape} in the {pos}",
    "{size} {color} {shape}, {pos}",
)
_PAIR_TEMPLATES = (
    "a {c1} {s1} {rel} a {c2} {s2}",
    "{c1} {s1} {rel_short} {c2} {s2}",
    "a {c2} {s2} {rel_converse} a {c1} {s1}",
    "a {c2} {s2} with a {c1} {s1} {rel_with}",
    "there is a {c1} {s1} {rel} a {c2} {s2}",
)
_AN = re.compile(r"\ba (?=[aeiou])")


def _level_of(attributes: dict[str, str]) -> str:
    for level, scheme in _SCHEMES.items():
        if set(attributes) == set(scheme):
            return level
    expected = " or ".join("{" + ", ".join(s) + "}" for s in _SCHEMES.values())
    raise ValueError(f"attributes: expected the keys {expected}, got {sorted(attributes)}")


def _fill(attributes: dict[str, str], choose: Callable[[Sequence[str]], str]) -> str:
    """Fill one template; `choose` picks among alternatives (the first, or a random one)."""
    a = attributes
    if _level_of(a) == "single":
        pos = choose(_POSITION_WORDS[a["position"]])
        fields = {"size": choose(_SIZE_WORDS[a["size"]]), "color": a["color"], "shape": a["shape"],
                  "pos": pos, "pos_h": pos.replace(" ", "-")}
        template = choose(_SINGLE_TEMPLATES)
    else:
        rel, short, converse, with_ = _RELATION_WORDS[a["relation"]]
        fields = {"c1": a["color"], "s1": a["shape"], "c2": a["color2"], "s2": a["shape2"], "rel": rel,
                  "rel_short": short, "rel_converse": converse, "rel_with": with_}
        template = choose(_PAIR_TEMPLATES)
    return _AN.sub("an ", template.format(**fields))


def canonical_caption(attributes: dict[str, str]) -> str:
    """The one fixed phrasing of these attributes: "a small red circle in the top left",
    "a red circle to the left of a blue square". Used for fixed evaluation prompts."""
    return _fill(attributes, lambda options: options[0])


def caption_for(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A caption for these attributes in a phrasing (and synonyms) chosen by `rng`."""
    return _fill(attributes, lambda options: options[int(rng.integers(len(options)))])
