"""The ``folder`` source: a folder of images in one of three layouts (``metadata``, ``captions``,
``classes``), listed once, sorted, and read one image at a time."""

from __future__ import annotations

import os
import re
import unicodedata
from collections import deque
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Literal

from diffusion.data.records import Skipped
from diffusion.data.sources.common import (
    IMAGE_EXTENSIONS, Assembler, Found, Item, SourceError, TextEncodingError, decode_text, is_image_name, path_order,
    sanitise_key, unique_keys, unsupported,
)
from diffusion.data.sources.metadata import METADATA_FILE, iter_metadata, metadata_files, read_metadata
from diffusion.data.sources.splits import FolderSplits, SplitFolders, check_outside, find_split_folders

Layout = Literal["auto", "metadata", "captions", "classes"]
CAPTION_SUFFIX = ".txt"


def _list_files(root: Path) -> tuple[list[str], dict[str, str], list[Skipped]]:
    """Relative POSIX paths of every file under ``root`` (through symlinked folders), NFC-normalised and sorted by
    path components; the name on disk of each that normalising changed; and a `Skipped` for each folder not
    listed: reached a second time through a link, or unreadable.

    Names are NFC, as typed and as ``metadata.jsonl`` holds them: macOS stores ``café.png`` decomposed (NFD), and
    matched as is it was both an unlisted image and a listed file not found. (Should a folder hold both spellings
    of one name, each keeps its own, so both are read.)

    Hidden files and folders are left out: ``.DS_Store``, macOS ``._IMG_0001.jpg`` resource forks (which
    carry an image extension but are not images), ``.ipynb_checkpoints``, ``.git``.

    Symlinked folders are followed (a class folder linked in from elsewhere is a common layout), but only after
    every real folder: a folder reached twice (``zlink -> sub1``, a link to an ancestor) is then always listed
    under its real path, whatever order the file system returns entries in. ``os.walk`` took them in that
    order, so which copy was listed, and which was dropped, differed between machines.
    """
    found: list[str] = []
    notes: list[Skipped] = []
    listed = {os.path.realpath(root): ""}  # real path -> the relative path it was listed under
    folders: deque[str] = deque([""])  # real folders waiting, breadth first ("" is the root)
    links: deque[str] = deque()  # symlinked folders, entered once no real folder is left
    while folders or links:
        relative = folders.popleft() if folders else links.popleft()
        path = root / relative
        if relative:  # the root is entered as given
            real = os.path.realpath(path)
            if real in listed:
                first = _shown(listed[real] or ".")
                notes.append(Skipped(_shown(f"{relative}/"), "duplicate", f"the same folder as {first}/, listed there"))
                continue
            listed[real] = relative
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError as error:  # permission denied: every image inside is missing, so say so
            notes.append(Skipped(_shown(f"{relative}/"), "missing_file", f"cannot list the folder: {error}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}" if relative else entry.name
            if not entry.is_dir():  # files, links to files, dangling links (unreadable: counted when read)
                found.append(name)
            elif entry.is_symlink():
                links.append(name)
            else:
                folders.append(name)
    # Counted as any file that is not read (captions are not: the image they belong to is counted).
    notes += [Skipped(_shown(name), "unsupported_format", "its name (or its folder's) is not UTF-8 (written in another "
                      "encoding?): rename it") for name in found if not _is_utf8(name) and not _is_caption(name)]
    names, on_disk = _normalised([name for name in found if _is_utf8(name)])
    return sorted(names, key=path_order), on_disk, notes


def _is_utf8(name: str) -> bool:
    """Whether a name from the file system is text: Python keeps bytes that are not UTF-8 as lone surrogates,
    which no JSON or tar member name can hold (the stage crashed writing the sample)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """`name` with any bytes that are not UTF-8 shown as U+FFFD, for the skip records and the console."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _normalised(found: list[str]) -> tuple[list[str], dict[str, str]]:
    """The NFC form of each name, and the name on disk of those it changed. Decided from the names alone, not
    by asking the file system (macOS finds ``café.png`` under either spelling)."""
    spellings: dict[str, list[str]] = {}
    for name in found:
        spellings.setdefault(unicodedata.normalize("NFC", name), []).append(name)
    names, on_disk = [], {}
    for nfc, raw in spellings.items():
        if len(raw) == 1:
            names.append(nfc)
            if raw[0] != nfc:
                on_disk[nfc] = raw[0]
        else:  # both spellings on disk (possible on Linux): each keeps its own
            names += raw
    return names, on_disk


def _read_caption(path: Path) -> bytes | None:
    """A side-car caption's bytes, or None when there is none."""
    return path.read_bytes() if path.is_file() else None


def _side_car_caption(source: FolderSource, image: str, caption_file: str) -> str | None | Skipped:
    """The caption in `caption_file` beside `image`; None when there is none; a `Skipped` when it cannot be read
    or decoded (a caption in another encoding is skipped and counted rather than trained on garbled)."""
    try:
        data = _read_caption(source.path(caption_file))
    except OSError as error:  # permission denied, an I/O error: skipped like an unreadable image
        return Skipped(image, "missing_file", f"cannot read its caption {caption_file}: {error}")
    if data is None:
        return None
    try:
        return decode_text(data)
    except TextEncodingError as error:
        return Skipped(image, "bad_caption_encoding", f"{caption_file}: {error}")


def _iter_captions(source: FolderSource, assemble: Assembler) -> Iterator[Found]:
    """Each image with the caption in the ``.txt`` of the same name beside it, in any subfolder. The suffix in
    any case (``IMG_0001.JPG`` beside ``IMG_0001.TXT``, as cameras and Windows tools write them), as images'."""
    sidecars: dict[str, str] = {}
    for name in sorted(source.files, key=lambda n: n.endswith(CAPTION_SUFFIX)):  # exact ".txt" wins over ".TXT"
        if name.lower().endswith(CAPTION_SUFFIX):
            sidecars[name[: -len(CAPTION_SUFFIX)]] = name
    images = sorted(filter(is_image_name, source.files), key=source.read_order)
    keys = unique_keys(images)
    for name in images:
        stem = str(PurePosixPath(name).with_suffix(""))
        caption = _side_car_caption(source, name, sidecars.get(stem, stem + CAPTION_SUFFIX))
        if caption is None:
            caption = Skipped(name, "missing_caption", f"no {PurePosixPath(stem).name}{CAPTION_SUFFIX} beside it")
        if isinstance(caption, Skipped):
            yield caption
            continue
        yield assemble(name, keys[name], caption, source.path(name).read_bytes, {}, split_key=sanitise_key(name))


def class_label(folder: str) -> str:
    """``golden_retriever`` or ``golden-retriever`` -> ``golden retriever``."""
    return " ".join(re.sub(r"[_\-]", " ", folder).split())


def _iter_classes(source: FolderSource, assemble: Assembler) -> Iterator[Found]:
    """The top-level folder is the class (in a folder split into ``train/`` and ``test/``, the top folder inside
    each: ``train/cats/1.png``); images deeper inside still belong to it. Images directly in the root (or in a
    split folder) have no class, hence no caption."""
    images = sorted(filter(is_image_name, source.files), key=source.read_order)
    keys = unique_keys(images)
    for name in images:
        folder, _, rest = source.class_path(name).partition("/")
        if not rest:
            yield Skipped(name, "missing_caption", "not inside a class folder")
            continue
        label = class_label(folder)
        meta = {"attributes": {"class": label}}
        caption = source.caption_template.format(label=label)
        yield assemble(name, keys[name], caption, source.path(name).read_bytes, meta, split_key=sanitise_key(name))


def _iter_metadata(source: FolderSource, assemble: Assembler) -> Iterator[Found]:
    return iter_metadata(source.files, source.rows, source.path, assemble, source.read_order)


_LAYOUTS = {"metadata": _iter_metadata, "captions": _iter_captions, "classes": _iter_classes}


def detect_layout(root: Path, files: list[str], splits: SplitFolders | None = None) -> tuple[str, str]:
    """The first layout whose marks are present, and the file that showed it: a ``metadata.jsonl`` (in the root
    or a subfolder); a side-car ``.txt`` beside an image; images in subfolders (of the split folders, when
    `splits` are given: ``train/`` itself is not a class). One stray caption is enough to pick ``captions``, so
    the reason is reported: a folder of classes misread that way is then easy to spot."""
    found = metadata_files(files)
    if found:
        return "metadata", f"found {found[0]}" + (f" and {len(found) - 1} more" if len(found) > 1 else "")
    images = {str(PurePosixPath(name).with_suffix("")): name for name in files if is_image_name(name)}
    for name in files:
        if name.lower().endswith(CAPTION_SUFFIX) and name[: -len(CAPTION_SUFFIX)] in images:
            return "captions", f"{name} is a caption beside {images[name[: -len(CAPTION_SUFFIX)]]}"
    inner = splits.inner if splits else str
    nested = next((name for name in images.values() if "/" in inner(name)), None)
    if nested is not None:
        return "classes", f"images are in subfolders, e.g. {nested}"
    raise SourceError(
        f"{root}: cannot tell how captions are given. Use one of: 'metadata' (a {METADATA_FILE} with one "
        '{"file_name": ..., "text": ...} per line), \'captions\' (x.jpg beside x.txt), or \'classes\' '
        "(one subfolder per class, e.g. cats/001.jpg)", key="folder_layout",
    )


class FolderSource:
    """A folder of images, checked as a whole when built; iterate it for every image as a `Sample` or a
    `Skipped`, in sorted path order, one image in memory at a time (each iteration reads the images anew).

    Building it lists the folder, picks the layout and parses every ``metadata.jsonl``: whatever is wrong with
    the folder as a whole (no such folder, no layout that fits, a malformed metadata line) raises here, before
    any image is read, so the stage's ``validate`` stops on it before its run starts.

    Attributes:
        root: the folder.
        layout: the layout read: ``metadata``, ``captions`` or ``classes``.
        reason: why ``auto`` chose it (``cats/x.txt is a caption beside cats/x.png``); None when it was given.
        files: every file under ``root``, relative POSIX paths, sorted (hidden files left out).
        rows: the ``metadata.jsonl`` rows by image path (``metadata`` layout; else empty).
        images: how many files have an image extension.
        captioned: how many of those have a caption in this layout (before any is read or decoded).
        in_subfolders: whether any image is in a subfolder (the folder may be meant as classes); below its split
            folder, if the root is split into folders.
        splits: the root's split folders (``train/``, ``test/``...), which give each sample its `split`; None: the
            stage hashes every image into train or val.
        splits_note: why folders named like splits are not taken as splits (only ``train/``, an empty
            ``test/``, or ``folder_splits: ignore``), and a hint for folders that look like splits but do not match
            (``Train/``, ``data/train/``), for the console; None otherwise.
    """

    def __init__(
        self, root: Path, layout: Layout, caption_template: str, resolution: int, workers: int = 1,
        folder_splits: FolderSplits = "auto",
    ) -> None:
        """Args:
            root: the folder.
            layout: ``metadata``, ``captions``, ``classes``, or ``auto`` (the first of those whose marks exist).
            caption_template: caption for the ``classes`` layout; ``{label}`` is the folder name, with ``_``
                and ``-`` read as spaces.
            resolution: side of the square RGB images yielded.
            workers: threads that read and decode images (`Assembler.run`); the output does not depend on it.
            folder_splits: ``auto``: a root split into ``train/`` and ``test/`` (or ``validation/``...) gives each
                sample its `split` from its folder (`splits.find_split_folders`); ``ignore``: never (every
                sample's `split` is empty, for the stage to hash).

        Raises:
            SourceError: ``root`` is not a folder or holds no image file, no layout fits, a ``metadata.jsonl``
                is malformed, or the root is split into folders and an image the layout would read (one with a
                caption) lies outside them.
        """
        self.root = Path(root)
        if self.root.is_file():
            raise SourceError(f"{self.root} is a file; expected the folder that holds the images")
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: no such folder (expected a folder of images)")
        if layout != "auto" and layout not in _LAYOUTS:
            raise SourceError(f"layout {layout!r} unknown; allowed: {['auto', *_LAYOUTS]}", key="folder_layout")
        try:
            caption_template.format(label="x")
        except (KeyError, IndexError, ValueError) as error:
            raise SourceError(f"caption_template {caption_template!r}: only {{label}} may be used ({error})",
                              key="caption_template") from error
        self.caption_template, self.resolution, self.workers = caption_template, resolution, workers
        self.files, self._on_disk, self._unlisted = _list_files(self.root)
        if not any(map(is_image_name, self.files)):
            raise SourceError(_no_images(self.root, self.files, self._unlisted))
        folders = tuple(sorted(entry.name for entry in os.scandir(self.root)
                               if entry.is_dir() and not entry.name.startswith(".")))
        self.splits, self.splits_note = find_split_folders(self.files, folder_splits, self.root, folders)
        if self.splits and self.splits.not_read:  # a test folder beside a validation one: as if it were not there
            self.files = [name for name in self.files if not self._not_read(name)]
            self._unlisted = [item for item in self._unlisted if not self._not_read(item.source)]
        if layout == "auto":
            self.layout, self.reason = detect_layout(self.root, self.files, self.splits)
        else:
            self.layout, self.reason = layout, None
        if self.layout == "metadata" and not metadata_files(self.files):
            raise SourceError(f"{self.root}: layout 'metadata' needs a {METADATA_FILE} in it or in a subfolder",
                              key="folder_layout")
        self.rows = read_metadata(self.root, self.files, self.path) if self.layout == "metadata" else {}
        # A root metadata.jsonl may list images of the folder not read (``test/1.png``).
        self.rows = {name: rows for name, rows in self.rows.items() if not self._not_read(name)}
        images = [name for name in self.files if is_image_name(name)]
        self.images, self.in_subfolders = len(images), any("/" in self.class_path(name) for name in images)
        captioned = list(filter(self._caption_given(), images))
        self.captioned = len(captioned)
        if self.splits:
            # Only now, with the layout known: an image outside the split folders stops the source only if it
            # would be read (its caption found); one without is skipped and counted, as in any folder.
            check_outside(self.splits, captioned, self.root)

    def _caption_given(self) -> Callable[[str], bool]:
        """Whether this layout finds a caption for an image (not yet whether it reads or decodes)."""
        if self.layout == "metadata":
            return self.rows.__contains__
        if self.layout == "classes":
            return lambda image: "/" in self.class_path(image)
        stems = {name[: -len(CAPTION_SUFFIX)] for name in self.files if name.lower().endswith(CAPTION_SUFFIX)}
        return lambda image: str(PurePosixPath(image).with_suffix("")) in stems

    def read_order(self, name: str) -> tuple[bool, list[str]] | list[str]:
        """Sort key of the images as the layouts read them: path order, or with split folders the held-out
        folders first (`SplitFolders.read_first`: of two copies of one image, the held-out one is kept)."""
        return self.splits.read_first(name) if self.splits else path_order(name)

    def class_path(self, name: str) -> str:
        """`name` as the classes layout reads it: below its split folder, if the root is split into folders."""
        return self.splits.inner(name) if self.splits else name

    def _not_read(self, name: str) -> bool:
        """Whether `name` lies in a split folder that is not read (a test folder beside a validation one)."""
        return bool(self.splits) and name.partition("/")[0] in self.splits.not_read

    def path(self, name: str) -> Path:
        """Where the file listed (NFC) as `name` is on disk."""
        return self.root / self._on_disk.get(name, name)

    def __iter__(self) -> Iterator[Item]:
        yield from self._unlisted
        # Files listed in a metadata.jsonl are read whatever their extension (and counted if they fail then).
        yield from (unsupported(name, name) for name in self.files
                    if not _read_by_layouts(name) and name not in self.rows)
        assemble = Assembler(self.resolution, self.workers, self.splits.split_of if self.splits else None)
        yield from assemble.run(_LAYOUTS[self.layout](self, assemble))


def _no_images(root: Path, files: list[str], unlisted: list[Skipped]) -> str:
    """The error for a folder without one image file: said as such, not as a layout that cannot be told."""
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        found = f"{len(files)} files ({shown}), none with an image extension ({', '.join(IMAGE_EXTENSIONS)})"
    elif unlisted:
        found = "no file could be listed"
    else:
        found = "it is empty (or holds only hidden files)"
    if unlisted:  # folders it could not list, files whose names are not UTF-8
        found += f"; not read: {unlisted[0].source} ({unlisted[0].detail})" + (
            f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else "")
    return f"no images found in {root}: {found}"


def iter_folder(
    root: Path, layout: Layout, caption_template: str, resolution: int, workers: int = 1,
    folder_splits: FolderSplits = "auto",
) -> FolderSource:
    """The folder source (see `FolderSource`): checked now, its images read when iterated."""
    return FolderSource(root, layout, caption_template, resolution, workers, folder_splits)


def _is_caption(name: str) -> bool:
    return name.lower().endswith(CAPTION_SUFFIX)


def _read_by_layouts(name: str) -> bool:
    """Images, side-car captions and metadata.jsonl; any other file is counted as unsupported_format. ``.txt``
    files never are, in any layout: they are captions, or notes about the images (``cats/about.txt``)."""
    return is_image_name(name) or _is_caption(name) or PurePosixPath(name).name == METADATA_FILE
