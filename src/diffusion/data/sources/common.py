"""What every source shares: the accepted image extensions, sample keys, skip counts, and the `Assembler`
that turns a candidate image and caption into a `Sample` or a `Skipped`."""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from diffusion.data.images import PreparedImage, prepare, strict_decoding
from diffusion.data.ordered_pool import OrderedPool
from diffusion.data.records import SKIP_REASONS, Sample, Skipped

Item = Sample | Skipped

#: Image files, by extension in any case: the raster formats this Pillow decodes (each one is in
#: ``PIL.Image.registered_extensions()``, a test checks it), including what phones and old cameras name their
#: JPEGs (.jfif, .jpe) and AVIF. Not containers or documents Pillow only half reads (PDF and EPS need
#: Ghostscript, PSD layers, ICO sizes), nor HEIC, which needs a plugin: those, and every other file but
#: captions, are counted as unsupported_format. A file with one of these extensions that does not decode is
#: not_an_image, truncated or corrupt. In a WebDataset sample the first member present in this order is the
#: image, so the eight read before come first.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".jfif", ".jpe", ".avif", ".apng", ".dib", ".jp2", ".j2k", ".qoi", ".tga", ".ppm", ".pgm", ".pbm", ".pnm",
)
#: Why a common extension is not read, where there is more to say than "not an image format".
_UNSUPPORTED_HINTS = {
    ".heic": "HEIC needs the pillow-heif plugin; convert it to JPEG",
    ".heif": "HEIF needs the pillow-heif plugin; convert it to JPEG",
    ".pdf": "a document, not an image",
    ".psd": "a layered Photoshop file; export it as PNG",
}
#: WebDataset splits a member name into key and extension at the first dot of its basename, so keys
#: must not contain dots; we keep them to a conservative character set that is safe in any file system.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
#: Hex digits of the hash that makes a changed name's key its own (32 bits: clashes are rare, and resolved).
KEY_HASH_HEX = 8


class SourceError(ValueError):
    """The source itself is unusable (not one bad image): missing folder, unknown layout, bad index file.

    `key` is the ``shard`` parameter to change (``path``, ``folder_layout``, ``caption_template``), for the
    stage's message.
    """

    def __init__(self, message: str, key: str = "path") -> None:
        super().__init__(message)
        self.key = key


class TextEncodingError(ValueError):
    """Text that is neither UTF-8 nor UTF-16 with a byte-order mark; `line` (from 1) where it can be told."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


#: Byte-order marks read, and what the text after them is. UTF-32's BOM starts like UTF-16's; its text then
#: holds NULs and is refused.
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def decode_text(data: bytes) -> str:
    """Caption or metadata bytes -> text, strictly, or `TextEncodingError` saying what is wrong.

    UTF-8, with or without the byte-order mark Windows editors add; UTF-16 only with its mark (what Notepad
    saves as "Unicode"), as nothing else tells it apart. Anything else (latin-1 or Windows-1252 from an old
    editor) is refused, not decoded with replacement characters: "un caf\ufffd cr\ufffdme" would be trained on.
    A NUL character is refused too: it is what UTF-16 without its mark looks like when read as UTF-8.
    """
    encoding = "utf-8"
    for bom, codec in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom):], codec
            break
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        if encoding != "utf-8":
            raise TextEncodingError(f"starts with a {encoding} byte-order mark but is not {encoding}: {error.reason}")
        line = data.count(b"\n", 0, error.start) + 1
        raise TextEncodingError(
            f"not UTF-8 (byte 0x{data[error.start]:02x}; latin-1 or Windows-1252?): save it as UTF-8", line,
        ) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise TextEncodingError("holds a NUL character (UTF-16 without a byte-order mark?): save it as UTF-8", line)
    return text


def summarise(skipped: Iterable[Skipped]) -> dict[str, int]:
    """Count skips per reason, with every reason in `SKIP_REASONS` present (zero when none), for the manifest."""
    counts = Counter(item.reason for item in skipped)
    unknown = set(counts) - set(SKIP_REASONS)
    if unknown:
        raise ValueError(f"unknown skip reasons {sorted(unknown)}; allowed: {list(SKIP_REASONS)}")
    return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}


def _short_hash(text: str) -> str:
    """Eight hex digits of a hash of `text` (surrogate escapes: a file name that is not valid UTF-8 still hashes)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=KEY_HASH_HEX // 2).hexdigest()


def sanitise_key(name: str) -> str:
    """A relative path or foreign key -> a WebDataset-safe key that depends on nothing but `name` itself.

    The image extension is dropped and ``/`` kept (it becomes a folder inside the tar, which WebDataset reads).
    A name that needs no change is its own key, so existing datasets keep theirs. Otherwise dots and unsafe
    characters become ``_`` and a hash of the name is appended, ``a b.jpg`` -> ``a_b-<8 hex>``, ``猫.png`` ->
    ``_-<8 hex>``: the key then cannot depend on which other files exist (a counter did, and so did the
    train/val split, which hashes the key). The hash is of the name without its image extension, so ``a b.jpg``
    and ``a b.png`` share a key exactly as ``x.jpg`` and ``x.png`` do (`unique_keys` tells those apart).
    Names are NFC-normalised first: the same folder copied from macOS (NFD names) gets the same keys.
    """
    name = unicodedata.normalize("NFC", name)
    path = PurePosixPath(name)
    stem = str(path.with_suffix("")) if path.suffix.lower() in IMAGE_EXTENSIONS else name
    safe = _KEY_UNSAFE.sub("_", stem).strip("/")
    if safe and safe == stem:
        return safe
    return f"{safe or '_'}-{_short_hash(stem)}"


def path_order(name: str) -> list[str]:
    """Sort key for relative paths: folder by folder, so ``a/b.jpg`` sorts before ``a-b.jpg`` as in a file tree."""
    return name.split("/")


def unique_keys(names: Iterable[str]) -> dict[str, str]:
    """Name -> key for every image of a folder: `sanitise_key`, unless names share it (``x.jpg`` and ``x.png``,
    or two spellings of one Unicode name): then the first in sorted order keeps it and each other one gets
    ``-`` and a hash of its whole name. So a key depends on the names alone, never on the order files are
    listed in or on which of them decode; and it changes only for an image whose twin is added or removed
    (whose split does not change: the stage splits on `sanitise_key`, the same for both).
    """
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=path_order):
        groups.setdefault(sanitise_key(name), []).append(name)
    keys: dict[str, str] = {}
    used = set(groups)
    for base, members in groups.items():
        keys[members[0]] = base
        for name in members[1:]:
            key = f"{base}-{_short_hash(name)}"
            while key in used:  # only if another image is named exactly like this key; still deterministic
                key = f"{base}-{_short_hash(key)}"
            used.add(key)
            keys[name] = key
    return keys


@dataclass(frozen=True)
class Candidate:
    """An image a source found, with a usable caption, not read yet: what `Assembler.__call__` hands back for
    `Assembler.run` to read, decode and finish."""

    source: str
    key: str
    caption: str
    read: Callable[[], bytes]
    meta: dict[str, Any]
    split_key: str
    identity: str
    split: str = ""


#: What a source's walk yields before `Assembler.run` reads the candidates.
Found = Candidate | Item


def _prepare(candidate: Candidate, resolution: int) -> tuple[PreparedImage, bytes] | Skipped:
    """Read, decode, resize and hash one candidate: the costly part, which `Assembler.run` runs on its threads
    (Pillow releases the GIL while it decodes and resamples, and hashlib while it hashes)."""
    try:
        data = candidate.read()
    except OSError as error:  # listed but unreadable (permissions, a dangling link)
        return Skipped(candidate.source, "missing_file", f"cannot read: {error}")
    prepared = prepare(data, candidate.source, resolution)
    if isinstance(prepared, Skipped):
        return prepared
    # Hash the converted pixels, not the file: the same photo re-saved or re-encoded to the same pixels
    # is still one training example.
    return prepared, hashlib.blake2b(prepared.image.tobytes(), digest_size=16).digest()


class Assembler:
    """What every source does to a candidate: check the caption, decode, drop duplicates, keep keys unique.

    A source calls it for each image it finds (a `Candidate`, or a `Skipped` for a missing caption) and passes
    its stream through `run`, which reads and decodes the candidates, on `workers` threads when an image takes
    long enough for that to pay (`data.ordered_pool`), and finishes them one by one in the stream's order:
    which duplicate is kept and which key an image gets never depend on the number of threads, so the shards
    are the same bytes whatever it is.

    Holds the pixel hash and source of each image already yielded (the source, so that a duplicate's record can
    name the image kept) and the keys already used: memory grows by a couple of hundred bytes per image, not by
    the images (a bounded number are read ahead).
    """

    def __init__(self, resolution: int, workers: int = 1, split_of: Callable[[str], str] | None = None) -> None:
        """`split_of`: the split (``train`` or ``val``) of an image by its source, when the source decides it (a
        folder split into ``train/`` and ``test/``); None: every sample's `split` is empty, for the stage to hash."""
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        self.resolution, self.workers, self.split_of = resolution, workers, split_of
        self._seen: dict[bytes, str] = {}
        self._keys: set[str] = set()

    def __call__(
        self, source: str, key: str, caption: str | None, read: Callable[[], bytes], meta: dict[str, Any],
        *, split_key: str | None = None, identity: str | None = None,
    ) -> Candidate | Skipped:
        """Check an image's caption: a `Candidate` for `run` to read (skipped captions cost no reading), or why not.

        Args:
            source: where the image came from, for the record and the sample's json.
            key: its key, from `sanitise_key` or `unique_keys`.
            read: returns the image file's bytes (called on one of `run`'s threads).
            split_key: what the train/val split hashes (default `key`): `sanitise_key` of the name, so that
                ``x.jpg`` and ``x.png`` (keys ``x`` and ``x-<hash>``) always fall on the same side.
            identity: a machine-independent name of the image (default `source`) that tells apart two images
                given the same key, which only WebDataset tars can do (the same sample key in two tars).
        """
        if caption is None:
            return Skipped(source, "missing_caption")
        caption = caption.strip()
        if not caption:
            return Skipped(source, "empty_caption")
        split = self.split_of(source) if self.split_of else ""
        return Candidate(source, key, caption, read, meta, split_key or key, identity or source, split)

    def run(self, items: Iterable[Found]) -> Iterator[Item]:
        """The stream with every `Candidate` read, decoded and finished (a `Sample`, or a `Skipped`), in order."""
        pool = OrderedPool(self._prepare_found, self.workers, "shard-decode", timed=lambda item: isinstance(item, Candidate))
        try:
            with strict_decoding():  # held for the whole stream: each image's own use nests inside it
                for item in items:
                    for done in pool.put(item):
                        yield self._finish(*done)
                for done in pool.drain():
                    yield self._finish(*done)
        finally:
            pool.close()

    def _prepare_found(self, item: Found) -> tuple[PreparedImage, bytes] | Skipped | None:
        """`_prepare` for a candidate; None for a `Skipped` the source found, which passes through in order."""
        return _prepare(item, self.resolution) if isinstance(item, Candidate) else None

    def _finish(self, candidate: Found, prepared: tuple[PreparedImage, bytes] | Skipped | None) -> Item:
        """Drop a duplicate (the first in the stream's order wins), make the key unique, build the `Sample`."""
        if prepared is None:  # not a candidate: a Skipped the source found
            return candidate
        if isinstance(prepared, Skipped):
            return prepared
        image, digest = prepared
        source, key, identity = candidate.source, candidate.key, candidate.identity
        if digest in self._seen:
            return Skipped(source, "duplicate", f"same pixels as {self._seen[digest]}")
        self._seen[digest] = source
        unique = key
        while unique in self._keys:
            unique = f"{key}-{_short_hash(identity)}"
            identity = unique  # a further clash (never in practice) hashes on from there
        self._keys.add(unique)
        meta = _meta(candidate.meta, source, image)
        return Sample(unique, image.image, candidate.caption, meta, split_key=candidate.split_key, split=candidate.split)


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


def unsupported(source: str, name: str) -> Skipped:
    """The record of a file that is not read as an image, so that it is counted rather than silently left out."""
    suffix = PurePosixPath(name).suffix.lower()
    hint = _UNSUPPORTED_HINTS.get(suffix, "not one of the image extensions read (README, 'Your own images')")
    return Skipped(source, "unsupported_format", f"{suffix or 'no extension'}: {hint}")
