"""What a data source yields: a usable sample, or a record of why an input was skipped.

Sources (the built-in shapes, image folders, existing WebDataset tars) all yield these, so the shard
writer and the manifest treat every source alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

#: Why an input was skipped. Each reason is counted in the shard manifest; none is fatal.
SkipReason = Literal[
    "empty_file",  # zero bytes
    "not_an_image",  # has an image extension but is not an image Pillow recognises
    "unsupported_format",  # neither an image by its extension nor a caption (.txt) or metadata.jsonl
    "corrupt",  # recognised but fails to decode
    "too_large",  # more pixels than Pillow decodes (its decompression-bomb guard), e.g. a 195-megapixel scan
    "truncated",  # the file ends before the image data does
    "missing_caption",  # no caption found for this image
    "empty_caption",  # a caption that is empty or only white space
    "bad_caption_encoding",  # a caption file that is not UTF-8 (or UTF-16 with a byte-order mark)
    "duplicate",  # the same pixels as an earlier image (after conversion), or a folder reached again by a link
    "missing_file",  # listed (metadata.jsonl, a tar sample's txt/json) but not there, or cannot be read
]
SKIP_REASONS: tuple[str, ...] = SkipReason.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Sample:
    """One image-caption pair, ready to write.

    Attributes:
        key: unique, stable id; shards are written in sorted key order.
        image: RGB PIL image at the configured resolution (square).
        caption: the text.
        meta: JSON-serialisable metadata; categorical attributes under ``meta["attributes"]``.
        split_key: what a user source's train/val split hashes; empty: the key. It depends on the image's own
            name only, while a key may also depend on a twin's (``x.jpg`` beside ``x.png``: ``x-<hash>``).
        split: ``train`` or ``val`` when the source itself says (a folder split into ``train/`` and ``test/``);
            empty: the stage hashes `split_key`.
    """

    key: str
    image: Image.Image
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    split_key: str = ""
    split: str = ""


@dataclass(frozen=True)
class Skipped:
    """An input that was not used: where it came from and why (one of SKIP_REASONS)."""

    source: str
    reason: str
    detail: str = ""
