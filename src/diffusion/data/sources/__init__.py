"""A user's own images and captions, as a stream of `Sample` or `Skipped`.

Two sources, both deterministic (sorted inputs) and streaming (one image in memory at a time):

- `iter_folder` (a `FolderSource`): a folder in one of three layouts, the conventions people already use:
  ``metadata`` (``metadata.jsonl`` files with ``file_name`` and ``text``, Hugging Face's imagefolder),
  ``captions`` (``x.jpg`` beside ``x.txt``, kohya/EveryDream style) or ``classes`` (``cats/001.jpg``,
  torchvision's ImageFolder; the caption comes from a template). A folder split into ``train/`` and
  ``test/`` (or ``validation/``...), as Hugging Face datasets come, gives each sample its split
  (`splits.find_split_folders`).
- `iter_webdataset`: existing WebDataset tars as img2dataset writes them (``key.jpg``, ``key.txt``,
  ``key.json``).

Bad inputs (a broken image, a missing caption, a duplicate) are yielded as `Skipped` and counted, never
fatal; a bad *source* (no such folder, a malformed ``metadata.jsonl``, no tar matched) raises `SourceError`
when the source is built, before any image is read, since no run over it could be right.
"""

from diffusion.data.sources.common import IMAGE_EXTENSIONS, Item, SourceError, sanitise_key, summarise
from diffusion.data.sources.folder import FolderSource, Layout, class_label, detect_layout, iter_folder
from diffusion.data.sources.metadata import METADATA_FILE
from diffusion.data.sources.splits import FolderSplits, SplitFolders
from diffusion.data.sources.tars import expand_urls, iter_webdataset

__all__ = [
    "IMAGE_EXTENSIONS", "METADATA_FILE", "FolderSource", "FolderSplits", "Item", "Layout", "SourceError",
    "SplitFolders", "class_label", "detect_layout", "expand_urls", "iter_folder", "iter_webdataset", "sanitise_key", "summarise",
]
