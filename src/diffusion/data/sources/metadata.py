"""The ``metadata`` layout: ``metadata.jsonl`` files with ``file_name`` and ``text`` per line (Hugging Face's
imagefolder convention), joined with the images on disk.

A ``metadata.jsonl`` may sit in the root or in any subfolder (``train/metadata.jsonl``, as imagefolder
datasets are split); each one's ``file_name`` is relative to its own folder. Every file is parsed when the
source is built, so a malformed line stops the stage before it starts, not after some images were read.
"""

from __future__ import annotations

import io
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from diffusion.data.records import Skipped
from diffusion.data.sources.common import (
    Assembler, Found, SourceError, TextEncodingError, decode_text, is_image_name, path_order, sanitise_key, unique_keys,
)

METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class Row:
    """One line of a ``metadata.jsonl``: where it is, its caption (None: none given), the rest of its fields."""

    file: str  # the metadata.jsonl, relative to the root
    line: int
    text: str | None
    meta: dict[str, Any]


def metadata_files(files: list[str]) -> list[str]:
    """The ``metadata.jsonl`` files among `files` (relative paths), in sorted order."""
    return [name for name in files if PurePosixPath(name).name == METADATA_FILE]


def _relative_file_name(value: Any, metadata: Path, line: int) -> str:
    """Validate one ``file_name``: a relative path inside the metadata file's folder (Hugging Face's convention)."""
    if not isinstance(value, str) or not value:
        raise SourceError(f"{metadata}, line {line}: 'file_name' must be a non-empty string, got {value!r}")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise SourceError(f"{metadata}, line {line}: 'file_name' must be relative to the folder of "
                          f"{METADATA_FILE}, got {value!r}")
    return path.as_posix()


def _read_lines(metadata: Path) -> Iterator[tuple[int, str]]:
    """(number, line) of the file's non-blank lines; the whole file is decoded first, strictly."""
    try:
        text = decode_text(metadata.read_bytes())
    except TextEncodingError as error:  # not a bad caption to skip: every line of the file is in doubt
        where = f", line {error.line}" if error.line else ""
        raise SourceError(f"{metadata}{where}: {error}") from None
    except OSError as error:
        raise SourceError(f"{metadata}: cannot read it: {error}") from error
    with io.StringIO(text, newline=None) as lines:  # \n, \r\n or \r, as a file opened in text mode reads them
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield number, line


def _read_one(metadata: Path, name: str) -> Iterator[tuple[str, Row]]:
    """(image path relative to the root, NFC, row) for every line of the metadata file `metadata`, listed as
    `name`."""
    folder = PurePosixPath(name).parent
    for number, line in _read_lines(metadata):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"{metadata}, line {number}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict) or "file_name" not in row:
            raise SourceError(f"{metadata}, line {number}: expected an object with 'file_name' and 'text'")
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            raise SourceError(f"{metadata}, line {number}: 'text' must be a string, got {text!r}")
        image = (folder / _relative_file_name(row["file_name"], metadata, number)).as_posix()
        image = unicodedata.normalize("NFC", image)  # as the listing names it
        meta = {k: v for k, v in row.items() if k not in ("file_name", "text")}
        yield image, Row(name, number, text, meta)


def read_metadata(root: Path, files: list[str], locate: Callable[[str], Path]) -> dict[str, list[Row]]:
    """Every ``metadata.jsonl`` under `root`, parsed now: image path relative to the root (NFC, as `files`, the
    folder's listing, names them) -> its rows (an image listed twice has two: the second is skipped as a
    duplicate). `locate` gives a listed file's path on disk.

    Only text is held; the images are read later, one at a time.

    Raises:
        SourceError: naming the file and line, for a line that is not JSON, not an object with ``file_name``,
            has a ``text`` that is not a string, names a file outside its folder, or is not UTF-8; or when no
            row has a ``text`` at all (the caption under another name, ``caption`` or ``prompt``: every image
            would be skipped).
    """
    rows: dict[str, list[Row]] = {}
    for name in metadata_files(files):
        for image, row in _read_one(locate(name), name):
            rows.setdefault(image, []).append(row)
    first = next((row for listed in rows.values() for row in listed), None)
    if first is not None and all(row.text is None for listed in rows.values() for row in listed):
        fields = ", ".join(repr(field) for field in ("file_name", *first.meta))
        raise SourceError(f"{root / first.file}: no line gives a 'text', the caption (line {first.line} has "
                          f"{fields}); name the caption field 'text'")
    return rows


def _governing(image: str, files: set[str]) -> str:
    """The metadata file nearest above `image`, which should have listed it, for the skip record."""
    for folder in PurePosixPath(image).parents:
        candidate = (folder / METADATA_FILE).as_posix()
        if candidate in files:
            return f"not listed in {candidate}"
    return f"no {METADATA_FILE} in its folder or above"


def iter_metadata(
    files: list[str], rows: dict[str, list[Row]], locate: Callable[[str], Path], assemble: Assembler,
    order: Callable[[str], Any] = path_order,
) -> Iterator[Found]:
    """The rows joined with the images listed in `files` (`locate`: where one is on disk), sorted by `order`
    (path order; the source's, for split folders): unlisted images are missing a caption, listed files that
    are not there are missing files."""
    names = sorted(set(rows) | {name for name in files if is_image_name(name)}, key=order)
    keys, listing = unique_keys(names), set(metadata_files(files))
    for name in names:
        path = locate(name)
        if name not in rows:
            yield Skipped(name, "missing_caption", _governing(name, listing))
            continue
        first = rows[name][0]
        for row in rows[name]:
            if not path.is_file():
                yield Skipped(name, "missing_file", f"listed in {row.file}, line {row.line}, but not found")
            elif row is not first:  # not read again only to find the same pixels
                yield Skipped(name, "duplicate", f"listed again in {row.file}, line {row.line} (first: "
                                                 f"{first.file}, line {first.line})")
            elif row.text is None:
                yield Skipped(name, "missing_caption", f"no 'text' in {row.file}, line {row.line}")
            else:
                yield assemble(name, keys[name], row.text, path.read_bytes, row.meta, split_key=sanitise_key(name))
