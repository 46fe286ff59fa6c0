"""A split's images in memory, with their captions and attributes: a bounded, uniform choice of it.

The stages that need real images at hand rather than streamed (the judge's fit and accuracy, evaluate's
prompts and reference images, train_vae's validation and latent-scale batches) read them with
:func:`load_split`. Memory is bounded by the caller's `limit`, whatever the size of the split, and the choice
is uniform over the whole split: a dataset's shards are in key order, which for class folders is class order,
so "the first N" would be its first classes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LabelledImages:
    """Images held in memory with their attributes.

    images: (N, 3, H, W) uint8; attributes: one dict per image (empty when the sample had none);
    holdout: (N,) bool, True for a val image of a held-out combination (``meta["holdout"]``).
    """

    images: torch.Tensor
    attributes: list[dict[str, str]]
    holdout: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.attributes)

    def subset(self, index: torch.Tensor | Sequence[int]) -> LabelledImages:
        idx = torch.as_tensor(index, dtype=torch.long)
        return LabelledImages(self.images[idx], [self.attributes[i] for i in idx.tolist()], self.holdout[idx],
                              [self.captions[i] for i in idx.tolist()])

    def float_images(self) -> torch.Tensor:
        """(N, 3, H, W) float in [-1, 1], the loader's range."""
        return self.images.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1] -> uint8 [0, 255] (the inverse of the loader's x / 127.5 - 1)."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def load_split(urls: Sequence[str] | str, limit: int | None = None, require_attributes: bool = True,
               seed: int = 0) -> LabelledImages:
    """Read shards once, in order (``data.shard_reading.iter_shards``), into memory.

    With ``require_attributes`` samples without ``meta["attributes"]`` are skipped (the judge learns
    nothing from them). ``limit`` keeps a seeded, uniform choice of that many of the usable samples, in shard
    order, read in one pass with at most `limit` images in memory (reservoir sampling, Vitter 1985, Algorithm
    R: the i-th usable sample takes a random slot with probability limit / i); only the samples drawn into the
    reservoir are decoded. Not the first `limit`: a class-folder dataset's keys, and so its shards, are sorted
    by class, and the first 20000 of ImageNet's are its first 16 classes.
    """
    # WebDataset: imported when a split is read, not with the judge.
    from diffusion.data.shard_reading import iter_shards

    rng = random.Random(f"{seed}/load_split")
    usable, slot = 0, -1

    def keep(sample: dict[str, Any]) -> bool:
        nonlocal usable, slot
        if require_attributes and not sample["meta"].get("attributes"):
            return False
        usable += 1
        if limit is None or usable <= limit:
            slot = usable - 1
        else:
            slot = rng.randrange(usable)
            if slot >= limit:
                return False
        return True

    rows: list[tuple[torch.Tensor, dict[str, str], bool, str]] = []
    position: list[int] = []  # of each row among the usable samples
    for sample in iter_shards(urls, keep=keep):
        row = (to_uint8(sample["image"]), {str(k): str(v) for k, v in (sample["meta"].get("attributes") or {}).items()},
               bool(sample["meta"].get("holdout", False)), sample["caption"])
        if slot == len(rows):
            rows.append(row)
            position.append(usable - 1)
        else:  # a later sample replaces the one in this slot
            rows[slot], position[slot] = row, usable - 1
    order = sorted(range(len(rows)), key=position.__getitem__)  # back to shard order
    if not order:
        return LabelledImages(torch.zeros((0, 3, 1, 1), dtype=torch.uint8), [], torch.zeros(0, dtype=torch.bool), [])
    images, attrs, holdout, captions = zip(*(rows[s] for s in order))
    return LabelledImages(torch.stack(images), list(attrs), torch.tensor(holdout, dtype=torch.bool), list(captions))
