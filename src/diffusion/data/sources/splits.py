"""Split folders: a folder that comes already split, as Hugging Face imagefolder datasets do (``train/`` and
``test/``, each with its own ``metadata.jsonl``), is read with those splits rather than hashed into new ones.

Folder names are those `datasets` recognises as splits (``datasets.data_files.SPLIT_KEYWORDS``), matched
exactly and only at the top of the root: ``train/`` and ``training/`` train; ``validation/``, ``valid/``,
``val/`` or ``dev/`` (a validation split), or else ``test/``, ``testing/``, ``eval/`` or ``evaluation/`` (a
test split), are held out as val. `datasets` also takes ``train-00/``, ``my_test_set/`` or ``data/train/``;
here those stay ordinary folders (hashed), so that a folder of photos merely named with the word is never
silently held out of training: point ``shard.path`` at the folder that holds ``train/``.

An image in both ``train/`` and the held-out folder (the same pixels) is kept once, by the source's duplicate
check, on the held-out side (`SplitFolders.read_first`): never on both sides, and the test set as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffusion.data.sources.common import SourceError, is_image_name, path_order

FolderSplits = Literal["auto", "ignore"]
FOLDER_SPLITS: tuple[str, ...] = FolderSplits.__args__  # type: ignore[attr-defined]

#: `datasets`' split keywords (``data_files.SPLIT_KEYWORDS``), as top-level folder names.
TRAIN_NAMES = ("train", "training")
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
TEST_NAMES = ("test", "testing", "eval", "evaluation")
HELD_OUT_NAMES = VALIDATION_NAMES + TEST_NAMES
SPLIT_NAMES = TRAIN_NAMES + HELD_OUT_NAMES


@dataclass(frozen=True)
class SplitFolders:
    """Which top-level folders of the root are which split (folder names, sorted, without ``/``).

    Attributes:
        train: folders whose images go to the train split.
        val: folders whose images go to the val split.
        not_read: test folders left out because a validation folder is the val split (see `find_split_folders`).
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    not_read: tuple[str, ...] = ()

    def split_of(self, name: str) -> str:
        """``train`` or ``val`` for a file listed under one of the split folders (relative POSIX path)."""
        return "val" if _top(name) in self.val else "train"

    def holds(self, name: str) -> bool:
        """Whether `name` (relative POSIX path) lies in one of the split folders read."""
        return _top(name) in (*self.train, *self.val)

    def read_first(self, name: str) -> tuple[bool, list[str]]:
        """Sort key: the held-out folders' files first, then the others, each in path order. The source's
        duplicate check keeps the first of two images with the same pixels: read first, the held-out copy is the
        one kept, so the user's test set stays as given and the train copy, not it, is dropped (in path order,
        ``test/`` came before ``train/`` but ``validation/`` after). Within each side the order is path order, so
        the train shards hold the same samples in the same order as before."""
        return self.split_of(name) != "val", path_order(name)

    def inner(self, name: str) -> str:
        """`name` below its split folder: ``train/cats/1.png`` -> ``cats/1.png`` (the classes layout's path)."""
        return name.partition("/")[2]

    def describe(self) -> str:
        """``train/ -> train, test/ -> val`` and what is not read, for the stage's console line."""
        said = ", ".join([*(f"{f}/ -> train" for f in self.train), *(f"{f}/ -> val" for f in self.val)])
        if self.not_read:
            said += (f"; {_listed(self.not_read)} not read (a test split beside the validation split "
                     f"{_listed(self.val)}: kept out of training and of evaluation)")
        return said

    def to_manifest(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "not_read": list(self.not_read)}


def _top(name: str) -> str:
    """The top-level folder of a relative path; "" for a file directly in the root."""
    folder, slash, _ = name.partition("/")
    return folder if slash else ""


def _listed(folders: tuple[str, ...]) -> str:
    return " and ".join(f"{f}/" for f in folders)


def find_split_folders(
    files: list[str], mode: FolderSplits, root: object, folders: tuple[str, ...] = (),
) -> tuple[SplitFolders | None, str | None]:
    """The root's split folders, or None (the stage then hashes every image into train or val), with a note for
    the console when folders named like splits are there but not used as splits, or look like split folders
    but are not matched (``Train/``, ``data/train/``).

    Split folders are used when ``mode`` is ``auto`` and the root holds a train folder and a held-out folder,
    each with at least one image file (an empty ``test/`` holds nothing to keep out). Several folders of one
    kind (``val/`` and ``validation/``) form one split, as `datasets` merges them.

    A validation folder and a test folder both present: `datasets` makes them two splits. Our val split plays
    the validation split's part (the VAE validates on it, evaluate measures FID and the judge on it), so the
    validation folder is val and the test folder is not read at all: a test set is kept for a final measurement,
    outside training and outside choosing a model. Taking both as val would mix the two; refusing would make the
    user move folders of a dataset as downloaded.

    Images outside the split folders are checked by the source once its layout is known
    (`check_outside`): only those the layout would read stop it.

    Args:
        files: the root's listing (relative POSIX paths).
        mode: ``auto`` (use split folders when present) or ``ignore`` (never: hash every image).
        root: the folder, for the messages.
        folders: the root's top-level folders, empty ones included (the listing holds files only), so that
            an empty ``test/`` is said to be empty rather than missing.
    """
    if mode not in FOLDER_SPLITS:
        raise SourceError(f"folder_splits {mode!r} unknown; allowed: {list(FOLDER_SPLITS)}", key="folder_splits")
    with_images = sorted({_top(name) for name in files if is_image_name(name)} - {""})
    train = tuple(f for f in with_images if f in TRAIN_NAMES)
    validation = tuple(f for f in with_images if f in VALIDATION_NAMES)
    test = tuple(f for f in with_images if f in TEST_NAMES)
    named = (*train, *validation, *test)
    if mode == "ignore":
        return None, f"shard.folder_splits=ignore: {_listed(named)} read as ordinary folders" if named else None
    if train and (validation or test):
        return SplitFolders(train, validation or test, test if validation else ()), None
    notes = [_why_not_split(train, named, files, folders), *_look_alike(with_images, files, root)]
    return None, "; ".join(note for note in notes if note) or None


def _why_not_split(train: tuple[str, ...], named: tuple[str, ...], files: list[str], folders: tuple[str, ...]) -> str:
    """Why split-named folders with images are not splits: one side missing, or there but with no image."""
    if not named:
        return ""
    present = set(folders) | {_top(name) for name in files} - {""}
    empty = tuple(sorted(f for f in present - set(named) if f in (TRAIN_NAMES if not train else HELD_OUT_NAMES)))
    if empty:  # the other side is there, but holds no image file (only a metadata.jsonl, or nothing)
        return f"{_listed(named)} beside {_listed(empty)}, which holds no image: not taken as splits"
    if not train:
        return f"{_listed(named)} without a train/ folder beside it: not taken as splits"
    return f"{_listed(train)} without a test/ or validation/ folder beside it: not taken as splits"


def _look_alike(with_images: list[str], files: list[str], root: object) -> list[str]:
    """Hints for folders that look like splits but are not matched, which matching exactly (as documented and as
    `datasets` does) would otherwise pass over without a word: ``Train/`` and ``Test/`` (names are matched in
    lowercase), and ``data/train/`` beside ``data/test/`` (only the root's own folders are splits)."""
    hints = []
    cased = tuple(f for f in with_images if f.lower() in SPLIT_NAMES and f not in SPLIT_NAMES)
    if cased:
        one = len(cased) == 1
        hints.append(f"{_listed(cased)} {'looks like a split folder' if one else 'look like split folders'}: split "
                     f"names are matched in lowercase (rename {'it' if one else 'them'} "
                     f"{_listed(tuple(f.lower() for f in cased))} to keep that split)")
    nested: dict[str, set[str]] = {}
    for name in files:
        parts = name.split("/")
        if len(parts) > 2 and parts[1] in SPLIT_NAMES and is_image_name(name):
            nested.setdefault(parts[0], set()).add(parts[1])
    for top, inner in sorted(nested.items()):
        if inner & set(TRAIN_NAMES) and inner & set(HELD_OUT_NAMES):
            shown = " and ".join(f"{top}/{f}/" for f in sorted(inner))
            hints.append(f"{shown} look like split folders: point shard.path at {root}/{top} to keep that split")
    return hints


def check_outside(splits: SplitFolders, images: list[str], root: object) -> None:
    """Refuse images outside the split folders that would be read (`images`: those with a caption in the layout
    read): whether one should train or be held out cannot be told, and `datasets` would drop it without a word.
    An image no caption is found for (a cover picture no metadata.jsonl lists) is skipped and counted, as it is
    in a folder without splits.

    Raises:
        SourceError: (key ``folder_splits``) naming the first few.
    """
    outside = [name for name in images if not splits.holds(name)]
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        are = "image is" if len(outside) == 1 else "images are"
        raise SourceError(
            f"{root} is split into folders ({splits.describe()}) but {len(outside)} {are} outside them: "
            f"{shown}. Move them into {_listed(splits.train)} (or {_listed(splits.val)}), or set "
            "shard.folder_splits=ignore to hash every image into train or val by shard.val_fraction",
            key="folder_splits",
        )
