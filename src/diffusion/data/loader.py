"""The training loader (`make_loader`): batches streamed from WebDataset shards, as many on every DDP rank.

Reading shards once, in order (`iter_shards`), and the tar reading and image decoding this stream shares
with it live in `diffusion.data.shard_reading`.

Batches (docs/INTERFACES.md, Data): ``{"image": (B,3,H,W) float32 in [-1,1], "tokens": (B,T) long,
"caption": list[str], "meta": list[dict], "key": list[str]}``.

Why the training loader is built this way (pitfall 1):

- DDP needs every rank to run the same number of steps: a rank that runs out of batches first stops calling
  all_reduce and the others wait for it forever. With ``resampled=True`` every rank and every worker draws
  shards *with replacement* from the full list, forever, and ``WebLoader.with_epoch(n)`` cuts that
  endless stream at exactly `n` batches on every rank. The cut is on the loader, after the workers' streams
  are merged, so `n` counts batches, not per-worker samples (``.with_epoch`` on the dataset would count in
  each worker). Batches are assembled in the dataset with ``partial=False`` and the loader uses
  ``batch_size=None``, so every batch is full.
- Splitting shards by node is then unnecessary: each rank already sees a different stream because the
  stream is seeded by (seed, rank, worker, epoch); splitting a resampled stream by node would only thin it.
  In the non-resampled mode (one pass, for evaluation-like reads) each shard is read once per pass and goes
  to one rank and one worker only (``order[rank::world][worker::workers]``, what ``split_by_node`` and
  ``split_by_worker`` do); under DDP that mode needs ``epoch_steps``, since the ranks' shards hold unequal
  sample counts.
- Fewer shards than workers: with resampling every worker samples from all shards, so no worker is empty.
  (webdataset's ``check_empty`` is what raises "No samples found" for a worker without shards; not used.)
- Reproducible: ``wds.WebDataset(resampled=True)`` seeds its shard sampler with the pid, the clock and
  ``os.urandom`` (``webdataset/shardlists.py``, ``ResampledShards.__iter__`` without ``deterministic``), so
  we compose the pipeline from webdataset's stages ourselves, with explicit seeds. The rank is read in the
  main process when an epoch starts (torch.distributed is not initialised inside spawned workers), and
  the epoch number travels to the workers with the dataset, so every epoch draws a new stream.
"""

from __future__ import annotations

import itertools
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tokenizers import Tokenizer
from webdataset.tariterators import base_plus_ext

from diffusion.data.locations import is_remote
from diffusion.data.shard_reading import (
    DamagedShardError,
    decode_sample,
    expand_urls,
    tar_samples,
    to_model_range,
)
from diffusion.data.tokenizer import encode, trim_padding


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _samples_in(path: str) -> int:
    """Samples in a local tar, from its headers alone (tarfile seeks over the members' data)."""
    keys, last = 0, None
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                parts = base_plus_ext(member.name) if member.isfile() else None
                if parts and parts[0] != last:
                    keys, last = keys + 1, parts[0]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DamagedShardError(f"{path}: damaged shard ({e}); rerun the stage that wrote it") from e
    return keys


def _uniform_start(n: int, rng: random.Random) -> int:
    return rng.randrange(n) if n > 1 else 0


def _start_inside_first_shard(samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
    """Begin a pass at a uniformly drawn sample of its first shard (the ones before it are not used).

    A training pass is one checkpoint interval (``training.exact_resume``) and is cut where the interval ends,
    usually inside a shard, whose later samples it then misses; starting every pass at member 0 would draw a
    shard's first samples more often than its last (by half again for the VAE's defaults, and not at all the
    last third with a 10-step interval). A uniform start makes the cut uniform too, and over the passes every
    position is read equally often: the first shard read from its start point on, the last up to its cut.
    The start needs the shard's sample count: a local tar's headers give it; a shard behind a URL is held in
    memory (raw bytes, one shard) until it ends, so both ways start at the same sample.
    """
    first = next(samples, None)
    if first is None:
        return
    url = first.get("__url__", "")
    if url and not is_remote(url) and Path(url).is_file():
        skip, skipped = _uniform_start(_samples_in(url), rng), 0
        for sample in itertools.chain([first], samples):
            if skipped < skip and sample.get("__url__") == url:
                skipped += 1
                continue
            skipped = skip  # past the first shard: nothing more to skip
            yield sample
        return
    head, keys, following = [first], {first.get("__key__")}, None
    for sample in samples:  # the rest of the first shard (a key seen again: the same shard drawn anew)
        if sample.get("__url__") != url or sample.get("__key__") in keys:
            following = sample
            break
        head.append(sample)
        keys.add(sample.get("__key__"))
    yield from head[_uniform_start(len(head), rng):]
    if following is not None:
        yield following
        yield from samples


class ShardStream(torch.utils.data.IterableDataset):
    """An iterable of full batches read from shards; the dataset half of :func:`make_loader`.

    Every random choice (shards, shuffle buffer, caption dropout) comes from a ``random.Random`` seeded by
    ``(seed, rank, worker, epoch)``, so runs are reproducible and ranks and workers differ.
    `rank`, `world_size` and `epoch` are set by :class:`StreamLoader` in the main process before each epoch.
    """

    def __init__(
        self,
        urls: list[str],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        resampled: bool,
        caption_dropout: float,
        image_keys: Sequence[str],
        replay_urls: Sequence[str] = (),
        replay_fraction: float = 0.0,
    ):
        super().__init__()
        self.urls, self.tokenizer, self.batch_size = urls, tokenizer, batch_size
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        self.caption_dropout, self.image_keys = caption_dropout, tuple(image_keys)
        self.replay_urls, self.replay_fraction = list(replay_urls), replay_fraction
        self.rank, self.world_size, self.epoch = 0, 1, 0

    def _rng(self, worker: int, purpose: str) -> random.Random:
        # Seeding with a str is stable across processes and Python runs (it is hashed with SHA-512,
        # not with the salted hash()).
        return random.Random(f"{self.seed}/{self.rank}/{worker}/{self.epoch}/{purpose}")

    def _shard_urls(self, worker: int, num_workers: int, urls: list[str] | None = None,
                    purpose: str = "") -> Iterator[dict[str, str]]:
        if self.resampled:  # infinite, with replacement, different for every (rank, worker, epoch)
            rng, urls = self._rng(worker, purpose + "shards"), urls or self.urls
            while True:
                yield {"url": rng.choice(urls)}
        # One pass: a permutation shared by all ranks and workers (seeded by epoch only), then
        # split by node and by worker so each shard is read by exactly one of them.
        order = list(self.urls)
        random.Random(f"{self.seed}/{self.epoch}/order").shuffle(order)
        yield from ({"url": u} for u in order[self.rank :: self.world_size][worker::num_workers])

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        return {
            "image": to_model_range(torch.from_numpy(np.stack([s["image"] for s in samples]))),  # (B,3,H,W)
            "tokens": trim_padding(encode(self.tokenizer, captions)),  # (B, T)
            "caption": captions,
            "meta": [s["meta"] for s in samples],
            "key": [s["key"] for s in samples],
        }

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One raw WebDataset sample -> the fields `_collate` batches (a subclass reads other shards)."""
        return decode_sample(sample, self.image_keys)

    def augment(self, samples: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        """A per-sample step after decoding, before caption dropout (identity here; the latent loader's random
        flip)."""
        return samples

    def batches(self, batches: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        """A last per-batch step in the worker (identity here; the latent loader samples the posterior)."""
        return batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = tar_samples(self._shard_urls(worker, num_workers))
        if self.resampled:
            samples = _start_inside_first_shard(samples, self._rng(worker, "offset"))
        if self.replay_fraction > 0:  # (resampled only: stream_loader) a second endless stream, mixed sample by sample
            replay = _start_inside_first_shard(tar_samples(self._shard_urls(worker, num_workers, self.replay_urls,
                                                                            "replay/")),
                                               self._rng(worker, "replay/offset"))
            samples = _mix(samples, replay, self.replay_fraction, self._rng(worker, "replay"))
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(
                self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=self._rng(worker, "shuffle")
            )(samples)
        samples = self.augment((self.decode(s) for s in samples), worker)
        if self.caption_dropout > 0:
            samples = _drop_captions(samples, self.caption_dropout, self._rng(worker, "dropout"))
        batches = wds.batched(self.batch_size, collation_fn=self._collate, partial=False)(samples)
        yield from self.batches(batches, worker)


def _mix(samples: Iterator[dict], replay: Iterator[dict], p: float, rng: random.Random) -> Iterator[dict]:
    """Each sample from `replay` with probability `p`, else from `samples` (both endless): a fixed share of
    every batch, in expectation, from the replayed data, whatever the two sets' sizes and shard sizes. Before the
    shuffle buffer, which mixes them within batches further."""
    while True:
        yield next(replay) if rng.random() < p else next(samples)


def _drop_captions(samples: Iterator[dict], p: float, rng: random.Random) -> Iterator[dict]:
    """Replace the caption with the null caption ``""`` with probability `p` (pitfall 2:
    dropout at load time, so every epoch drops different captions and the model learns the null
    condition that classifier-free guidance uses at sampling)."""
    for s in samples:
        if rng.random() < p:
            s = {**s, "caption": ""}
        yield s


class StreamLoader(wds.WebLoader):
    """``wds.WebLoader`` that, at the start of every pass, tells the dataset the rank and the epoch.

    ``iterator1`` runs in the main process once per pass over the DataLoader (also on each repetition
    made by ``with_epoch``), before the workers are started and handed a copy of the dataset. Workers are
    therefore not persistent: a persistent worker would keep the first epoch's copy.
    """

    def __init__(self, dataset: ShardStream, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.stream = dataset
        self.workers = kwargs.get("num_workers", 0)
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at `epoch` (e.g. when resuming); passes count up from there."""
        self._next_epoch = epoch

    def iterator1(self):
        self.stream.rank, self.stream.world_size = dist_info()
        if not self.stream.resampled and self.stream.world_size > 1:
            # Checked here, not when the loader is built: Lightning's DDP sets up the process group after that,
            # so there rank 0 saw one process and only the others raised (rank 0 was then killed without a word).
            if len(self.stream.urls) < self.stream.world_size:
                raise ValueError(f"{len(self.stream.urls)} shards for {self.stream.world_size} ranks: use "
                                 "resampled=True or more shards")
            if self.nsamples <= 0:
                # Each rank reads its own shards, which hold different sample counts: the rank that runs out first
                # leaves the others waiting in their next all-reduce (pitfall 1).
                raise ValueError("resampled=False under DDP needs epoch_steps: the ranks' shards give unequal "
                                 "numbers of batches, and DDP hangs when one rank runs out first")
        self.stream.epoch = self._next_epoch
        self._next_epoch += 1
        return super().iterator1()

    def iterator(self):
        """WebDataset's pass-repeating iterator (``with_epoch``), except that a pass with no batch is an error.

        WebDataset stops repeating for good at a pass that yields nothing, so the epoch would end short of
        ``len()`` on this rank alone (the DDP hang of pitfall 1). In single-pass mode each worker drops its last
        partial batch, so a rank whose share of the shards holds less than a batch per worker yields none.
        """
        for _ in range(self.repetitions):
            count = 0
            for sample in self.iterator1():
                yield sample
                count += 1
            if count == 0:
                rank, world = dist_info()
                raise RuntimeError(
                    f"a pass over the shards gave rank {rank} of {world} no full batch of {self.stream.batch_size} "
                    f"(resampled={self.stream.resampled}; each of the {max(self.workers, 1)} loading "
                    "process(es) drops its last partial batch): use resampled=True, a smaller batch_size, fewer "
                    "num_workers, or more data"
                )


def make_loader(
    urls: Sequence[str] | str,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    epoch_steps: int | None = None,
    seed: int = 0,
    resampled: bool = True,
    caption_dropout: float = 0.0,
    image_key_order: Sequence[str] = ("png", "jpg"),
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> StreamLoader:
    """A training loader over WebDataset shards, correct under DDP (see the module docstring).

    Args:
        urls: shard paths/URLs, a brace pattern, or a folder of ``.tar`` files.
        tokenizer: encodes captions to (T,) ids (``[BOS] ... [EOS] [PAD]*``).
        batch_size: samples per batch; every batch is full.
        num_workers: DataLoader worker processes (0: load in the main process).
        shuffle_buffer: samples in the shuffle buffer (<= 1: no sample shuffling).
        epoch_steps: batches per epoch, exactly, on every rank. None: endless when resampled, one pass
            over this rank's shards otherwise.
        seed: base seed; streams are seeded by (seed, rank, worker, epoch).
        resampled: draw shards with replacement (training). False: each shard once per pass, split
            across ranks and workers (needs at least as many shards as ranks).
        caption_dropout: probability of replacing a caption with ``""`` (the null condition).
        image_key_order: image extensions to look for, first found wins.
        pin_memory: page-locked batches, for faster copies to a GPU.
        prefetch_factor: batches each worker loads ahead (with ``num_workers`` > 0).
    """
    return stream_loader(
        ShardStream, urls, tokenizer, batch_size=batch_size, num_workers=num_workers, epoch_steps=epoch_steps,
        resampled=resampled, caption_dropout=caption_dropout, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor, shuffle_buffer=shuffle_buffer, seed=seed, image_keys=image_key_order,
    )


def stream_loader(
    stream_cls: type[ShardStream], urls: Sequence[str] | str, tokenizer: Tokenizer, *, batch_size: int,
    num_workers: int, epoch_steps: int | None, resampled: bool, caption_dropout: float, pin_memory: bool = False,
    prefetch_factor: int = 2, **stream_kwargs: Any,
) -> StreamLoader:
    """Check the arguments, build a `stream_cls` stream over `urls` and its DDP-correct loader; shared by
    the image loader (`make_loader`) and the latent loader (`data.latents.make_latent_loader`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout: expected a probability in [0, 1], got {caption_dropout}")
    if epoch_steps is not None and epoch_steps < 1:
        raise ValueError(f"epoch_steps: expected >= 1 or None, got {epoch_steps}")
    fraction = stream_kwargs.get("replay_fraction", 0.0)
    if not 0.0 <= fraction < 1.0 or (fraction > 0) != bool(stream_kwargs.get("replay_urls")) \
            or (fraction > 0 and not resampled):
        raise ValueError(f"replay_fraction: expected a share in [0, 1) with replay_urls, of a resampled stream; got "
                         f"{fraction} with {len(stream_kwargs.get('replay_urls') or ())} replay shard(s), "
                         f"resampled={resampled}")
    urls = expand_urls(urls)
    stream = stream_cls(urls, tokenizer, batch_size=batch_size, resampled=resampled, caption_dropout=caption_dropout,
                        **stream_kwargs)
    # The DataLoader's own generator for each iterator's base seed (worker seeds): by default it draws that from
    # the global torch generator, which the training step's noise comes from (training.exact_resume.ExactResume).
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": num_workers, "pin_memory": pin_memory,
                              "generator": torch.Generator().manual_seed(stream_kwargs.get("seed", 0))}
    if num_workers > 0:
        kwargs["prefetch_factor"] = prefetch_factor
    loader = StreamLoader(stream, **kwargs)
    if epoch_steps is not None:
        # On the loader, not the dataset (pitfall 1): exactly `epoch_steps` batches per rank;
        # with_length gives Lightning a len().
        loader = loader.with_epoch(epoch_steps).with_length(epoch_steps, silent=True)
    return loader
