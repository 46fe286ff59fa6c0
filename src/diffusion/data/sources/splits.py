"""Split folders: a folder that comes already split, as Hugging Face imagefolder datasets do (``train/`` and
``test/``, each with its own ``metadata.jsonl``), is read with those splits rather than hashed into new ones.

Folder names are those `datasets` recognises as splits (``datasets.data_files.SPLIT_KEYWORDS``), matched
exactly and only at the top of the root: ``train/`` and ``training/`` train; ``validation/``, ``valid/``,
``val/`` or ``dev/`` (a validation split), or else ``test/``, ``testing/``, ``eval/`` or ``evaluation/`` (a
test split), are held out as val. `datasets` also takes ``train-00/``, ``my_test_set/`` or ``data/train/``;
here those stay ordinary folders (hashed), so that a folder of photos merely named with the word is never
silently held out of training: point ``shard.path`` at the folder that holds ``train/``.

An image in both ``train/`` and the held-out folder (the same pixels) is kept once, by the source's duplicate
check, so it is never on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffusion.data.sources.common import SourceError, is_image_name

FolderSplits = Literal["auto", "ignore"]
FOLDER_SPLITS: tuple[str, ...] = FolderSplits.__args__  # type: ignore[attr-defined]

#: `datasets`' split keywords (``data_files.SPLIT_KEYWORDS``), as top-level folder names.
TRAIN_NAMES = ("train", "training")
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
TEST_NAMES = ("test", "testing", "eval", "evaluation")


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


def find_split_folders(files: list[str], mode: FolderSplits, root: object) -> tuple[SplitFolders | None, str | None]:
    """The root's split folders, or None (the stage then hashes every image into train or val), with a note for
    the console when folders named like splits are there but not used as splits.

    Split folders are used when ``mode`` is ``auto`` and the root holds a train folder and a held-out folder,
    each with at least one image file (an empty ``test/`` holds nothing to keep out). Several folders of one
    kind (``val/`` and ``validation/``) form one split, as `datasets` merges them.

    A validation folder and a test folder both present: `datasets` makes them two splits. Our val split plays
    the validation split's part (the VAE validates on it, evaluate measures FID and the judge on it), so the
    validation folder is val and the test folder is not read at all: a test set is kept for a final measurement,
    outside training and outside choosing a model. Taking both as val would mix the two; refusing would make the
    user move folders of a dataset as downloaded.

    Args:
        files: the root's listing (relative POSIX paths).
        mode: ``auto`` (use split folders when present) or ``ignore`` (never: hash every image).
        root: the folder, for the messages.

    Raises:
        SourceError: (key ``folder_splits``) when split folders are used and an image lies outside them, in the
            root or in another folder: whether it should train or be held out cannot be told, and `datasets`
            would drop it without a word.
    """
    if mode not in FOLDER_SPLITS:
        raise SourceError(f"folder_splits {mode!r} unknown; allowed: {list(FOLDER_SPLITS)}", key="folder_splits")
    with_images = sorted({_top(name) for name in files if is_image_name(name)} - {""})
    train = tuple(f for f in with_images if f in TRAIN_NAMES)
    validation = tuple(f for f in with_images if f in VALIDATION_NAMES)
    test = tuple(f for f in with_images if f in TEST_NAMES)
    named = (*train, *validation, *test)
    if not named:
        return None, None
    if mode == "ignore":
        return None, f"shard.folder_splits=ignore: {_listed(named)} read as ordinary folders"
    if not train:
        return None, f"{_listed(named)} without a train/ folder beside it: not taken as splits"
    if not (validation or test):
        return None, f"{_listed(train)} without a test/ or validation/ folder beside it: not taken as splits"
    splits = SplitFolders(train, validation or test, test if validation else ())
    outside = [name for name in files if is_image_name(name) and _top(name) not in named]
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise SourceError(
            f"{root} is split into folders ({splits.describe()}) but {len(outside)} images are outside them: "
            f"{shown}. Move them into {_listed(train)} (or {_listed(splits.val)}), or set "
            "shard.folder_splits=ignore to hash every image into train or val by shard.val_fraction",
            key="folder_splits",
        )
    return splits, None
