"""Data: sources, the shard writer, the tokenizer, the streaming loader and map-style datasets."""

from diffusion.data.dataset import ListDataset, TextImageDataset, create_dummy_dataset
from diffusion.data.loader import iter_shards, make_loader
from diffusion.data.records import Sample, Skipped
from diffusion.data.shards import atomic_write_json, atomic_write_text, list_shards, write_shards
from diffusion.data.tokenizer import encode, load_tokenizer, null_tokens, save_tokenizer, train_tokenizer

__all__ = [
    "ListDataset",
    "Sample",
    "Skipped",
    "TextImageDataset",
    "atomic_write_json",
    "atomic_write_text",
    "create_dummy_dataset",
    "encode",
    "iter_shards",
    "list_shards",
    "load_tokenizer",
    "make_loader",
    "null_tokens",
    "save_tokenizer",
    "train_tokenizer",
    "write_shards",
]
