"""The ``webdataset`` source: existing WebDataset tars as img2dataset writes them (``key.jpg``, ``key.txt``,
``key.json``), read in sorted tar order."""

from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from braceexpand import braceexpand  # a dependency of webdataset, which reads the same patterns

from diffusion.data.records import Skipped
from diffusion.data.sources.common import (
    IMAGE_EXTENSIONS, Assembler, Found, Item, SourceError, TextEncodingError, decode_text, sanitise_key,
)

#: webdataset's own rule (``base_plus_ext``): key = everything up to the first dot of the basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns (``shards-{000..009}.tar``), globs and lists -> the tar files, sorted.

    Raises:
        SourceError: nothing matched, or a named file does not exist.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for pattern in patterns:
        for item in braceexpand(pattern):
            if is_remote(item):
                found.append(item)  # opened by webdataset's gopen: pipe:, http(s)://, s3:// ...
            elif any(char in item for char in "*?["):
                found += sorted(glob.glob(item))
            elif Path(item).is_file():
                found.append(item)
            elif Path(item).is_dir():  # the folder of the shards, given where their names are expected
                tars = sorted(Path(item).glob("*.tar"))
                hint = (f"to read its {len(tars)} .tar files, give the pattern {str(Path(item) / '*.tar')!r}" if tars
                        else "it holds no .tar files; for a folder of images use shard.source=folder")
                raise SourceError(f"{item}: a folder, not a tar file (from {pattern!r}); {hint}")
            else:
                raise SourceError(f"{item}: no such tar file (from {pattern!r})")
    if not found:
        raise SourceError(f"{urls!r}: no tar files matched (expected a glob, a brace pattern or a list of .tar paths)")
    return sorted(dict.fromkeys(found))


def _open(url: str) -> BinaryIO:
    if is_remote(url):
        from webdataset import gopen  # only for remote URLs; local files need nothing but tarfile

        return gopen(url)
    return open(url, "rb")


def _tar_groups(url: str) -> Iterator[tuple[str, dict[str, bytes]] | Skipped]:
    """The samples of one tar: members grouped by key, in tar order (WebDataset's rule: the files of one
    sample are adjacent). A tar that breaks off is one `Skipped` (corrupt), not the end of the run."""
    key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                match = _MEMBER_NAME.match(member.name) if member.isfile() else None
                if match is None:
                    continue  # folders, links, and names without an extension are not sample files
                if match.group(1) != key:
                    if group:
                        yield key, group
                    key, group = match.group(1), {}
                group[match.group(2).lower()] = tar.extractfile(member).read()
            if not _ended_with_zero_block(tar):
                raise tarfile.ReadError("the file ends where a member header should be (no end-of-archive block)")
    except (tarfile.TarError, OSError, EOFError) as error:
        # The group being read when the tar broke may be incomplete; it is dropped with the rest.
        yield Skipped(url, "corrupt", f"tar breaks off at or after sample {key!r}: {type(error).__name__}: {error}")
        return
    if group:
        yield key, group


def _ended_with_zero_block(tar: tarfile.TarFile) -> bool:
    """Whether iteration stopped at the end-of-archive zero block rather than at the end of the file.

    In stream mode ("r|") tarfile stops silently when the file ends where the next header should be, so a tar
    cut on a 512-byte boundary would lose its remaining samples without a trace. Its stream's position tells:
    a complete tar's last header read was a full zero block. (``pos`` is the stream's own counter; without
    it, the check is skipped.)
    """
    pos = getattr(tar.fileobj, "pos", None)
    return pos is None or pos >= tar.offset + tarfile.BLOCKSIZE


def _wds_item(url: str, key: str, group: dict[str, bytes], assemble: Assembler) -> Found:
    """One img2dataset sample -> `Sample`: the image, ``txt`` as the caption, ``json`` kept as the meta."""
    source = f"{url}#{key}"
    image_ext = next((ext for ext in (e.lstrip(".") for e in IMAGE_EXTENSIONS) if ext in group), None)
    if image_ext is None:
        return Skipped(source, "missing_file", f"no image member (found {sorted(group)})")
    meta: dict[str, Any] = {}
    if "json" in group:
        try:
            meta = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return Skipped(source, "corrupt", f"json member: {error}")
        if not isinstance(meta, dict):
            return Skipped(source, "corrupt", "json member is not an object")
    if "txt" in group:
        try:
            caption: str | None = decode_text(group["txt"])
        except TextEncodingError as error:
            return Skipped(source, "bad_caption_encoding", f"txt member: {error}")
    else:  # img2dataset also stores the caption in the json
        caption = meta["caption"] if isinstance(meta.get("caption"), str) else None
    # The same sample key in two tars (two img2dataset runs side by side) is told apart by the tar's name, not
    # its path, which differs between machines.
    identity = f"{Path(url).name}#{key}"
    return assemble(source, sanitise_key(key), caption, lambda: group[image_ext], meta, identity=identity)


def iter_webdataset(urls: str | list[str], resolution: int, workers: int = 1) -> Iterator[Item]:
    """Every sample of existing WebDataset tars (img2dataset's layout): tars sorted, members in tar order.

    Args:
        urls: a glob (``shards/*.tar``), a brace pattern (``shards-{000..009}.tar``), or a list of either;
            ``pipe:`` and ``http(s)://`` URLs are opened with webdataset's ``gopen``.
        resolution: side of the square RGB images yielded.
        workers: threads that decode images (`Assembler.run`); the output does not depend on it.

    Raises:
        SourceError: no tar file matched, or a named file does not exist (at the call, not on iteration).
    """
    tars = expand_urls(urls)  # outside the generator, so a bad pattern fails before any work starts
    assemble = Assembler(resolution, workers)
    return assemble.run(
        group if isinstance(group, Skipped) else _wds_item(url, *group, assemble)
        for url in tars
        for group in _tar_groups(url)
    )
