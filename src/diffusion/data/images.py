"""Turn the bytes of a user's image file into a square RGB image, or a reason to skip it.

User folders and scraped shards hold every kind of file: empty downloads, HTML error pages saved as
``.jpg``, half-written PNGs, 16-bit scans, CMYK print files, phone photos stored sideways. Each bad file
becomes a `Skipped` with a reason from `SKIP_REASONS` (counted in the shard manifest), never an exception
that stops the whole stage; each good file comes out the same way: upright, RGB, resized so its short side
is the resolution, centre-cropped to a square.
"""

from __future__ import annotations

import io
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from diffusion.data.records import Skipped

#: JPEG decoding can skip DCT coefficients (``draft``) as long as the short side stays at least this many
#: times the target resolution, so the Lanczos filter below still has real pixels to average.
DRAFT_MARGIN = 2
#: Pillow first reduces by whole factors (box filter, fast) until the image is within this factor of the
#: target, then finishes with Lanczos; 3.0 is indistinguishable from a plain Lanczos resize in practice.
REDUCING_GAP = 3.0
#: 16-bit samples (0..65535) map to 8 bit by dividing by 257 (65535 / 255), so white stays white and
#: mid-grey stays mid-grey; clipping, as ``convert("L")`` does, turns most of the range white.
SCALE_16_TO_8 = 257.0
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class PreparedImage:
    """A decoded image ready to write.

    Attributes:
        image: RGB, ``resolution`` x ``resolution``.
        original_size: (width, height) of the file as displayed (after EXIF orientation), before resizing.
    """

    image: Image.Image
    original_size: tuple[int, int]


# strict_decoding's nesting: the flag is switched off by the first to enter and restored by the last to leave.
_strict_lock = threading.Lock()
_strict_depth = 0
_strict_saved = False


@contextmanager
def strict_decoding() -> Iterator[None]:
    """Make Pillow raise on truncated files for the duration, whatever another library set globally.

    With ``LOAD_TRUNCATED_IMAGES = True`` Pillow fills the missing part with grey and reports success, so
    half-downloaded files would be trained on. The flag is module-global, so overlapping uses (the shard stage's
    threads decoding at once, each image inside the run's own ``strict_decoding``; two streams read side by side)
    share one switch: the first to enter saves the flag and turns it off, the last to leave puts it back. Saving
    and restoring it per use let one stream's end turn it back on under another's threads.
    """
    global _strict_depth, _strict_saved
    with _strict_lock:
        if _strict_depth == 0:
            _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
            # Load every format plugin now, on one thread: Image.open loads the less common ones on first need,
            # and two threads doing it at once is a window Pillow does not guard.
            Image.init()
        _strict_depth += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def _failure_reason(error: Exception) -> str:
    """Map a decoding exception to a skip reason: truncation is worth telling apart from other damage."""
    message = str(error).lower()
    if isinstance(error, EOFError) or "truncat" in message:
        return "truncated"  # "image file is truncated", "Truncated File Read"
    return "corrupt"


def _too_large(error: Image.DecompressionBombError) -> str:
    """The skip detail for an image over Pillow's decompression-bomb limit: its pixel count and the limit."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
    if found is None:  # another wording in some Pillow version: its own message says as much
        return f"{error}"
    pixels, limit = map(int, found.groups())
    return (f"{pixels:,} pixels, over the {limit:,} Pillow decodes (2 x PIL.Image.MAX_IMAGE_PIXELS, its "
            "decompression-bomb guard); downscale it first")


def decode(data: bytes, source: str, *, min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]] | Skipped:
    """Decode ``data`` fully and turn it upright (EXIF orientation), or say why it cannot be used.

    Args:
        data: the file's bytes.
        source: where it came from, for the `Skipped` record.
        min_side: if given, JPEGs may be decoded at a reduced scale (``draft``) as long as both sides stay
            at least this long; a large speed-up for phone photos bound for a small resolution.

    Returns:
        ``(image, original_size)``: the image in its own mode, and its displayed (width, height) at full
        scale; or a `Skipped` with reason empty_file, not_an_image, too_large, truncated or corrupt.
    """
    if not data:
        return Skipped(source, "empty_file")
    with strict_decoding():
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if min_side is not None and img.format == "JPEG":
                img.draft(None, (min_side, min_side))
            img.load()  # the whole decode happens here, inside the try: Image.open only reads the header
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            img = ImageOps.exif_transpose(img)
        except UnidentifiedImageError:  # an HTML error page saved as .jpg shows itself in its first bytes
            return Skipped(source, "not_an_image", f"not an image format Pillow recognises; it starts {data[:16]!r}")
        except Image.DecompressionBombError as error:  # a real scan or panorama as often as an attack
            return Skipped(source, "too_large", _too_large(error))
        # Decoders for untrusted input raise almost anything (OSError, SyntaxError, ValueError,
        # struct.error, ...): any failure here is a property of this file, to be counted, not a crash.
        except Exception as error:  # noqa: BLE001
            return Skipped(source, _failure_reason(error), f"{type(error).__name__}: {error}")
    # EXIF orientations 5-8 rotate by 90 degrees, so the displayed size swaps the stored one.
    original_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return img, original_size


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer or float greyscale -> mode L, scaling the range instead of clipping it."""
    values = np.asarray(img).astype(np.float64)  # (H, W); I;16B arrives big-endian, astype handles it
    if img.mode == "F":
        # Float images (TIFF, some scientific formats) are usually in [0, 1]; otherwise read as 0..255.
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
    else:
        # I;16* are 16-bit by definition; mode I is what Pillow makes of 16-bit PNG and TIFF data too.
        values = np.clip(values, 0, 65535) / SCALE_16_TO_8
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited on white, as a viewer shows it on a page."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        # P with a transparent index, L/RGB with a tRNS colour: RGBA first makes the alpha explicit.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversions are right for these.
    return img.convert("RGB")


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is ``resolution`` and keep the centred square.

    Resampling only the centred square (``box``) does the crop and the resize in one antialiased pass,
    and never filters pixels that are about to be thrown away.
    """
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def prepare(data: bytes, source: str, resolution: int) -> PreparedImage | Skipped:
    """Bytes -> a ``resolution`` square RGB image and its original size, or a `Skipped` saying why not."""
    decoded = decode(data, source, min_side=DRAFT_MARGIN * resolution)
    if isinstance(decoded, Skipped):
        return decoded
    img, original_size = decoded
    return PreparedImage(center_crop_resize(to_rgb(img), resolution), original_size)
