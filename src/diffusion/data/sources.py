"""A user's own images and captions, as a stream of `Sample` or `Skipped`.

Two sources, both deterministic (sorted inputs) and streaming (one image in memory at a time):

- `iter_folder`: a folder in one of three layouts, the conventions people already use:
  ``metadata`` (a ``metadata.jsonl`` with ``file_name`` and ``text``, Hugging Face's imagefolder),
  ``captions`` (``x.jpg`` beside ``x.txt``, kohya/EveryDream style) or ``classes`` (``cats/001.jpg``,
  torchvision's ImageFolder; the caption comes from a template).
- `iter_webdataset`: existing WebDataset tars as img2dataset writes them (``key.jpg``, ``key.txt``,
  ``key.json``).

Bad inputs (a broken image, a missing caption, a duplicate) are yielded as `Skipped` and counted, never
fatal; a bad *source* (no such folder, a malformed ``metadata.jsonl``, no tar matched) raises `SourceError`
before or as soon as it is found, since no run over it could be right.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Literal

from braceexpand import braceexpand  # a dependency of webdataset, which reads the same patterns

from diffusion.data.images import PreparedImage, prepare
from diffusion.data.records import SKIP_REASONS, Sample, Skipped

Layout = Literal["auto", "metadata", "captions", "classes"]
Item = Sample | Skipped

#: Recognised by extension (any case); files with these extensions that do not decode are counted as
#: not_an_image. In WebDataset samples the first present in this order is the image.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
#: WebDataset splits a member name into key and extension at the first dot of its basename, so keys
#: must not contain dots; we keep them to a conservative character set that is safe in any file system.
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
#: webdataset's own rule (``base_plus_ext``): key = everything up to the first dot of the basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


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


class _Assembler:
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


# ----------------------------------------------------------------------------------------------- folders


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root`` (through symlinked folders), sorted by path components.

    Hidden files and folders are left out: ``.DS_Store``, macOS ``._IMG_0001.jpg`` resource forks (which
    carry an image extension but are not images), ``.ipynb_checkpoints``, ``.git``.
    """
    found, seen = [], set()
    # Symlinked folders are followed (a class folder linked in from elsewhere is a common layout); a folder
    # reached twice, e.g. through a link to its own parent, is listed once.
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = Path(folder).relative_to(root)
        found += [(relative / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(found, key=lambda name: name.split("/"))


def _read_caption(path: Path) -> str | None:
    """A side-car caption, or None when there is none. ``utf-8-sig`` drops the BOM Windows editors add."""
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8-sig", errors="replace")


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
    with metadata.open(encoding="utf-8-sig") as lines:
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


def _iter_metadata(root: Path, files: list[str], assemble: _Assembler, template: str) -> Iterator[Item]:
    """``metadata.jsonl`` rows joined with the images on disk: unlisted images are missing a caption,
    listed files that are not there are missing files."""
    rows = _read_metadata(root / METADATA_FILE)
    names = set(rows) | {name for name in files if _is_image_name(name)}
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
            yield assemble(name, name, row.get("text"), path.read_bytes, meta)


def _iter_captions(root: Path, files: list[str], assemble: _Assembler, template: str) -> Iterator[Item]:
    """Each image with the caption in the ``.txt`` of the same name beside it, in any subfolder. The suffix in
    any case (``IMG_0001.JPG`` beside ``IMG_0001.TXT``, as cameras and Windows tools write them), as images'."""
    sidecars: dict[str, str] = {}
    for name in sorted(files, key=lambda n: n.endswith(CAPTION_SUFFIX)):  # an exact ".txt" wins over ".TXT"
        if name.lower().endswith(CAPTION_SUFFIX):
            sidecars[name[: -len(CAPTION_SUFFIX)]] = name
    for name in filter(_is_image_name, files):
        path = root / name
        stem = str(PurePosixPath(name).with_suffix(""))
        try:
            caption = _read_caption(root / sidecars.get(stem, stem + CAPTION_SUFFIX))
        except OSError as error:  # permission denied, an I/O error: skipped like an unreadable image
            yield Skipped(name, "missing_file", f"cannot read its caption {CAPTION_SUFFIX}: {error}")
            continue
        yield assemble(name, name, caption, path.read_bytes, {})


def class_label(folder: str) -> str:
    """``golden_retriever`` or ``golden-retriever`` -> ``golden retriever``."""
    return " ".join(re.sub(r"[_\-]", " ", folder).split())


def _iter_classes(root: Path, files: list[str], assemble: _Assembler, template: str) -> Iterator[Item]:
    """The top-level folder is the class; images deeper inside still belong to it. Images directly in the
    root have no class, hence no caption."""
    for name in filter(_is_image_name, files):
        folder, _, rest = name.partition("/")
        if not rest:
            yield Skipped(name, "missing_caption", "not inside a class folder")
            continue
        label = class_label(folder)
        meta = {"attributes": {"class": label}}
        yield assemble(name, name, template.format(label=label), (root / name).read_bytes, meta)


_LAYOUTS = {"metadata": _iter_metadata, "captions": _iter_captions, "classes": _iter_classes}


def detect_layout(root: Path, files: list[str]) -> str:
    """The first layout whose marks are present: ``metadata.jsonl``; a side-car ``.txt`` beside an image;
    images in subfolders."""
    if (root / METADATA_FILE).is_file():
        return "metadata"
    image_stems = {str(PurePosixPath(name).with_suffix("")) for name in files if _is_image_name(name)}
    if any(name.lower().endswith(CAPTION_SUFFIX) and name[: -len(CAPTION_SUFFIX)] in image_stems for name in files):
        return "captions"
    if any("/" in name for name in files if _is_image_name(name)):
        return "classes"
    raise SourceError(
        f"{root}: cannot tell how captions are given. Use one of: 'metadata' (a {METADATA_FILE} with one "
        '{"file_name": ..., "text": ...} per line), \'captions\' (x.jpg beside x.txt), or \'classes\' '
        "(one subfolder per class, e.g. cats/001.jpg)"
    )


def iter_folder(root: Path, layout: Layout, caption_template: str, resolution: int) -> Iterator[Item]:
    """Every image under ``root`` as a `Sample` (or a `Skipped`), in sorted path order, one at a time.

    Args:
        root: the folder.
        layout: ``metadata``, ``captions``, ``classes``, or ``auto`` (the first of those whose marks exist).
        caption_template: caption for the ``classes`` layout; ``{label}`` is the folder name, with ``_``
            and ``-`` read as spaces.
        resolution: side of the square RGB images yielded.

    Raises:
        SourceError: ``root`` is not a folder or no layout fits (at the call); ``metadata.jsonl`` is
            malformed (at the first ``next``, before anything is yielded).
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder (expected a folder of images)")
    if layout != "auto" and layout not in _LAYOUTS:
        raise SourceError(f"layout {layout!r} unknown; allowed: {['auto', *_LAYOUTS]}")
    try:
        caption_template.format(label="x")
    except (KeyError, IndexError, ValueError) as error:
        raise SourceError(f"caption_template {caption_template!r}: only {{label}} may be used ({error})") from error
    files = _list_files(root)
    chosen = detect_layout(root, files) if layout == "auto" else layout
    if chosen == "metadata" and not (root / METADATA_FILE).is_file():
        raise SourceError(f"{root}: layout 'metadata' needs {root / METADATA_FILE}")
    return _LAYOUTS[chosen](root, files, _Assembler(resolution), caption_template)


# ------------------------------------------------------------------------------------------- webdataset


def _is_remote(url: str) -> bool:
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
            if _is_remote(item):
                found.append(item)  # opened by webdataset's gopen: pipe:, http(s)://, s3:// ...
            elif any(char in item for char in "*?["):
                found += sorted(glob.glob(item))
            elif Path(item).is_file():
                found.append(item)
            else:
                raise SourceError(f"{item}: no such tar file (from {pattern!r})")
    if not found:
        raise SourceError(f"{urls!r}: no tar files matched (expected a glob, a brace pattern or a list of .tar paths)")
    return sorted(dict.fromkeys(found))


def _open(url: str) -> BinaryIO:
    if _is_remote(url):
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


def _wds_item(url: str, key: str, group: dict[str, bytes], assemble: _Assembler) -> Item:
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
        caption: str | None = group["txt"].decode("utf-8-sig", errors="replace")
    else:  # img2dataset also stores the caption in the json
        caption = meta["caption"] if isinstance(meta.get("caption"), str) else None
    return assemble(source, key, caption, lambda: group[image_ext], meta)


def iter_webdataset(urls: str | list[str], resolution: int) -> Iterator[Item]:
    """Every sample of existing WebDataset tars (img2dataset's layout): tars sorted, members in tar order.

    Args:
        urls: a glob (``shards/*.tar``), a brace pattern (``shards-{000..009}.tar``), or a list of either;
            ``pipe:`` and ``http(s)://`` URLs are opened with webdataset's ``gopen``.
        resolution: side of the square RGB images yielded.

    Raises:
        SourceError: no tar file matched, or a named file does not exist (at the call, not on iteration).
    """
    tars = expand_urls(urls)  # outside the generator, so a bad pattern fails before any work starts
    assemble = _Assembler(resolution)
    return (
        group if isinstance(group, Skipped) else _wds_item(url, *group, assemble)
        for url in tars
        for group in _tar_groups(url)
    )
