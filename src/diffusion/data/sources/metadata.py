"""The ``metadata`` layout: a ``metadata.jsonl`` with ``file_name`` and ``text`` per line (Hugging Face's
imagefolder convention), joined with the images on disk."""

from __future__ import annotations

import io
import json
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from diffusion.data.records import Skipped
from diffusion.data.sources.common import (
    Assembler, Item, SourceError, TextEncodingError, decode_text, is_image_name, sanitise_key, unique_keys,
)

METADATA_FILE = "metadata.jsonl"


def _relative_file_name(value: Any, metadata: Path, line: int) -> str:
    """Validate one ``file_name``: a relative path inside the folder (Hugging Face's convention)."""
    if not isinstance(value, str) or not value:
        raise SourceError(f"{metadata}, line {line}: 'file_name' must be a non-empty string, got {value!r}")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise SourceError(f"{metadata}, line {line}: 'file_name' must be relative to the folder, got {value!r}")
    return path.as_posix()


def _read_metadata(metadata: Path) -> dict[str, list[dict[str, Any]]]:
    """``metadata.jsonl`` -> rows by file name (a file may be listed twice: the second is a duplicate).

    Only text is held: the captions must be joined with the files on disk before anything is yielded.
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    try:
        text = decode_text(metadata.read_bytes())
    except TextEncodingError as error:  # not a bad caption to skip: every line of the file is in doubt
        where = f", line {error.line}" if error.line else ""
        raise SourceError(f"{metadata}{where}: {error}") from None
    except OSError as error:
        raise SourceError(f"{metadata}: cannot read it: {error}") from error
    with io.StringIO(text, newline=None) as lines:  # \n, \r\n or \r, as a file opened in text mode reads them
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceError(f"{metadata}, line {number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict) or "file_name" not in row:
                raise SourceError(f"{metadata}, line {number}: expected an object with 'file_name' and 'text'")
            text = row.get("text")
            if text is not None and not isinstance(text, str):
                raise SourceError(f"{metadata}, line {number}: 'text' must be a string, got {text!r}")
            rows.setdefault(_relative_file_name(row["file_name"], metadata, number), []).append(row)
    return rows


def iter_metadata(root: Path, files: list[str], assemble: Assembler, template: str) -> Iterator[Item]:
    """``metadata.jsonl`` rows joined with the images on disk: unlisted images are missing a caption,
    listed files that are not there are missing files."""
    rows = _read_metadata(root / METADATA_FILE)
    names = set(rows) | {name for name in files if is_image_name(name)}
    keys = unique_keys(names)
    for name in sorted(names, key=lambda n: n.split("/")):
        path = root / name
        if name not in rows:
            yield Skipped(name, "missing_caption", f"not listed in {METADATA_FILE}")
            continue
        for row in rows[name]:
            if not path.is_file():
                yield Skipped(name, "missing_file", f"listed in {METADATA_FILE} but not found")
                continue
            meta = {k: v for k, v in row.items() if k not in ("file_name", "text")}
            yield assemble(name, keys[name], row.get("text"), path.read_bytes, meta, split_key=sanitise_key(name))
