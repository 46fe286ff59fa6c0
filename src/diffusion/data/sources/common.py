"""What every source shares: the accepted image extensions, sample keys, skip counts, and the `Assembler`
that turns a candidate image and caption into a `Sample` or a `Skipped`."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import PurePosixPath
from typing import Any, Callable, Iterable

from diffusion.data.images import PreparedImage, prepare
from diffusion.data.records import SKIP_REASONS, Sample, Skipped

Item = Sample | Skipped

#: Recognised by extension (any case); files with these extensions that do not decode are counted as
#: not_an_image. In WebDataset samples the first present in this order is the image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: WebDataset splits a member name into key and extension at the first dot of its basename, so keys
#: must not contain dots; we keep them to a conservative character set that is safe in any file system.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")


class SourceError(ValueError):
    """The source itself is unusable (not one bad image): missing folder, unknown layout, bad index file."""


def summarise(skipped: Iterable[Skipped]) -> dict[str, int]:
    """Count skips per reason, with every reason in `SKIP_REASONS` present (zero when none), for the manifest."""
    counts = Counter(item.reason for item in skipped)
    unknown = set(counts) - set(SKIP_REASONS)
    if unknown:
        raise ValueError(f"unknown skip reasons {sorted(unknown)}; allowed: {list(SKIP_REASONS)}")
    return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}


def sanitise_key(name: str) -> str:
    """A relative path or foreign key -> a WebDataset-safe key: extension dropped, other dots and unsafe
    characters replaced by ``_``; ``/`` is kept (it becomes a folder inside the tar, which WebDataset reads)."""
    path = PurePosixPath(name)
    stem = str(path.with_suffix("")) if path.suffix.lower() in IMAGE_EXTENSIONS else name
    return _KEY_UNSAFE.sub("_", stem).strip("/") or "_"


class Assembler:
    """What every source does to a candidate: check the caption, decode, drop duplicates, give a unique key.

    Holds only the hashes of images already yielded and the keys already used, so memory grows by a few
    dozen bytes per image, not by the images.
    """

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution
        self._seen: set[bytes] = set()
        self._keys: set[str] = set()

    def __call__(
        self, source: str, name: str, caption: str | None, read: Callable[[], bytes], meta: dict[str, Any]
    ) -> Item:
        """Build a `Sample` from an image (read lazily: skipped captions cost no decoding), or say why not."""
        if caption is None:
            return Skipped(source, "missing_caption")
        caption = caption.strip()
        if not caption:
            return Skipped(source, "empty_caption")
        try:
            data = read()
        except OSError as error:  # listed but unreadable (permissions, a dangling link)
            return Skipped(source, "missing_file", f"cannot read: {error}")
        prepared = prepare(data, source, self.resolution)
        if isinstance(prepared, Skipped):
            return prepared
        # Hash the converted pixels, not the file: the same photo re-saved or re-encoded to the same pixels
        # is still one training example. The first in sorted order wins.
        digest = hashlib.blake2b(prepared.image.tobytes(), digest_size=16).digest()
        if digest in self._seen:
            return Skipped(source, "duplicate")
        self._seen.add(digest)
        return Sample(self._unique_key(name), prepared.image, caption, _meta(meta, source, prepared))

    def _unique_key(self, name: str) -> str:
        """Sanitising can map two names to one key (``a b.jpg``, ``a_b.png``): later ones get ``_2``, ``_3``."""
        base = key = sanitise_key(name)
        count = 1
        while key in self._keys:
            count += 1
            key = f"{base}_{count}"
        self._keys.add(key)
        return key


def _meta(meta: dict[str, Any], source: str, prepared: PreparedImage) -> dict[str, Any]:
    """The sample's json: what the input carried, plus where it came from and its size before resizing."""
    out = dict(meta)
    out["source"] = source
    width, height = prepared.original_size
    out.setdefault("original_width", width)  # img2dataset's json already holds the true original size
    out.setdefault("original_height", height)
    attributes = out.pop("attributes", None)
    if isinstance(attributes, dict) and attributes:
        out["attributes"] = {str(k): str(v) for k, v in attributes.items()}  # flat str -> str (INTERFACES.md)
    return out



def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS
