"""Data: sources, the shard writer, the tokenizer, the streaming loader and map-style datasets.

Exports are resolved lazily (PEP 562), so importing one light submodule (say the tokenizer's special ids,
which the models need) does not import WebDataset and the loaders with it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TextImageDataset": "dataset", "ListDataset": "dataset", "create_dummy_dataset": "dataset",
    "make_loader": "loader", "iter_shards": "shard_reading",
    "Sample": "records", "Skipped": "records",
    "write_shards": "shards", "list_shards": "shards", "atomic_write_json": "shards", "atomic_write_text": "shards",
    "train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer", "save_tokenizer": "tokenizer",
    "encode": "tokenizer", "null_tokens": "tokenizer",
    "generate_shapes": "shapes", "iter_folder": "sources", "iter_webdataset": "sources",
    "make_latent_loader": "latents", "iter_latents": "latents",
    "LabelledImages": "in_memory", "load_split": "in_memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffusion.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
