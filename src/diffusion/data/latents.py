"""Latent shards: the VAE's posterior of every image, cached once, and the training loader that reads them.

Format (written by the ``encode_latents`` stage to ``data/latents/{train,val}/*.tar``): WebDataset tars in
which each sample is a group of members sharing a key, as in the image shards (:mod:`diffusion.data.shards`):

    <key>.mean.npy     float16 (C, h, w)   mean of q(z|x), the VAE's posterior
    <key>.logvar.npy   float16 (C, h, w)   its log-variance (already clamped by the VAE)
    <key>.txt          the caption, UTF-8, exactly as in the image shard
    <key>.json         the metadata (attributes ...), JSON with sorted keys

and, in the train split of latents encoded with ``encode_latents.flip``, the posterior of the image mirrored left
to right, for ``train.random_flip`` (diffusers' ``--random_flip``, which flips the image before its VAE encodes it:
with cached latents that means encoding both ways once, as the VAE is not mirror-equivariant):

    <key>.mean_flip.npy, <key>.logvar_flip.npy

Why this and not a latent:

- The posterior, not a sample of it, is stored (pitfall 3): a cached sample would give the
  diffusion model the same latent for an image in every epoch, a frozen draw of what the VAE was trained
  to treat as random. The loader draws ``z = mean + std * eps`` afresh every time, from a seeded generator.
- No tokens are stored (pitfall 2): the tokenizer runs at load time, after caption dropout, so every epoch
  drops different captions, and the tokenizer can change without re-encoding.
- float16 halves the size; logvar is clamped to [-30, 20] by the VAE, well inside float16's range.
- The latents are *not* scaled: the scale and shift are measured with the VAE (pitfall 4) and applied by
  the loader, ``latents = (z - shift) * scale``, so re-measuring them does not need re-encoding.

Determinism (a second ``dvc repro`` must see unchanged outputs): samples keep the image shards' order, the
``.npy`` members are written by ``np.lib.format.write_array`` (format 1.0: a fixed header from dtype, order
and shape only), and tar members get fixed headers (mtime 0, no owner), so a rerun writes byte-identical
shards.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import random
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from diffusion.data.loader import ShardStream, StreamLoader, stream_loader
from diffusion.data.shard_reading import expand_urls, tar_samples
from diffusion.data.shards import ShardList, add_tar_member, check_sample_key
from diffusion.data.tokenizer import encode, trim_padding

MEAN_EXT, LOGVAR_EXT = "mean.npy", "logvar.npy"
#: The mirrored image's posterior (``encode_latents.flip``).
MEAN_FLIP_EXT, LOGVAR_FLIP_EXT = "mean_flip.npy", "logvar_flip.npy"
#: The dtype latents are stored in.
STORE_DTYPE = np.float16
#: npy format version: 1.0 has a 64-byte-aligned header that depends only on dtype, order and shape.
NPY_VERSION = (1, 0)


@dataclass(frozen=True)
class LatentRecord:
    """One encoded sample, ready to write.

    Attributes:
        key: the image shard's key.
        mean, logvar: (C, h, w) float16 arrays, the posterior q(z|x).
        caption: the caption text.
        meta: JSON-serialisable metadata (``meta["attributes"]``...).
        mean_flip, logvar_flip: the posterior of the image mirrored left to right, or None (``encode_latents.flip``).
    """

    key: str
    mean: np.ndarray
    logvar: np.ndarray
    caption: str
    meta: dict[str, Any]
    mean_flip: np.ndarray | None = None
    logvar_flip: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------
# Encoding and writing
# --------------------------------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as ``.npy`` bytes with a fixed header (no pickle), so equal arrays give equal bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), version=NPY_VERSION, allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes (pickled objects refused: shards may come from anywhere)."""
    array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    # read_array wraps the bytes without copying (read-only); torch wants a writable array.
    return array if array.flags.writeable else array.copy()


def _to_store(x: torch.Tensor, name: str, keys: Sequence[str]) -> np.ndarray:
    """(B, C, h, w) float32 -> float16 numpy; a value float16 cannot hold is an error, not an inf on disk."""
    out = x.detach().float().cpu().numpy().astype(STORE_DTYPE)  # (B, C, h, w)
    bad = ~np.isfinite(out).reshape(len(keys), -1).all(axis=1)
    if bad.any():
        raise ValueError(
            f"VAE posterior {name} is not finite in float16 for samples {[k for k, b in zip(keys, bad) if b][:5]}"
            " (a diverged VAE? retrain it with `python cli.py train-vae`)"
        )
    return out


@torch.no_grad()
def encode_batch(vae: torch.nn.Module, images: torch.Tensor, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Posterior of a batch: images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, C, h, w) float16.

    The VAE runs in float32 (pitfall 10) on the device its parameters are on.
    """
    device = next(vae.parameters()).device
    posterior = vae.encode(images.to(device=device, dtype=torch.float32))
    return _to_store(posterior.mean, "mean", keys), _to_store(posterior.logvar, "logvar", keys)


def encode_records(vae: torch.nn.Module, samples: Iterable[dict[str, Any]], batch_size: int,
                   flip: bool = False) -> Iterator[LatentRecord]:
    """Encode samples (``{"key", "image": (3,H,W), "caption", "meta"}``, as ``iter_shards`` yields them) in
    batches of `batch_size`, keeping their order. Put `vae` in eval mode first (done by the stage).

    `flip`: also encode each image mirrored left to right, as a second forward of the same batch size, so the
    unmirrored posteriors are the bytes a run without `flip` writes."""
    it = iter(samples)
    while batch := list(itertools.islice(it, batch_size)):
        keys = [s["key"] for s in batch]
        images = torch.stack([s["image"] for s in batch])  # (B, 3, H, W)
        mean, logvar = encode_batch(vae, images, keys)  # (B, C, h, w) x 2
        mirrored = encode_batch(vae, images.flip(-1), keys) if flip else (None, None)
        for i, s in enumerate(batch):
            extra = {} if not flip else {"mean_flip": mirrored[0][i], "logvar_flip": mirrored[1][i]}
            yield LatentRecord(s["key"], mean[i], logvar[i], s["caption"], s["meta"], **extra)


def rechunk(
    records: Iterable[LatentRecord], samples_per_shard: int, prefix: str = "latents"
) -> Iterator[tuple[str, Iterator[LatentRecord]]]:
    """Split a stream of records into shards of `samples_per_shard`: ``(name, records)`` pairs.

    Each group must be consumed before the next is taken (they share one iterator), as
    :func:`write_latent_shards` does.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: expected >= 1, got {samples_per_shard}")
    it = iter(records)
    for i in itertools.count():
        first = next(it, None)
        if first is None:
            return
        yield f"{prefix}-{i:06d}.tar", itertools.chain([first], itertools.islice(it, samples_per_shard - 1))


def _write_record(tar: tarfile.TarFile, r: LatentRecord) -> None:
    add_tar_member(tar, f"{r.key}.{MEAN_EXT}", npy_bytes(r.mean))
    add_tar_member(tar, f"{r.key}.{LOGVAR_EXT}", npy_bytes(r.logvar))
    if r.mean_flip is not None:
        add_tar_member(tar, f"{r.key}.{MEAN_FLIP_EXT}", npy_bytes(r.mean_flip))
        add_tar_member(tar, f"{r.key}.{LOGVAR_FLIP_EXT}", npy_bytes(r.logvar_flip))
    add_tar_member(tar, f"{r.key}.txt", r.caption.encode("utf-8"))
    add_tar_member(tar, f"{r.key}.json", json.dumps(r.meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def write_latent_shards(groups: Iterable[tuple[str, Iterable[LatentRecord]]], folder: str | Path) -> ShardList:
    """Write each ``(name, records)`` group to ``folder/name`` (an uncompressed tar, fixed headers).

    The caller makes the result atomic by writing into a temporary folder and swapping it into place
    (the stage does, for the whole output tree). Returns the paths with ``.counts`` per shard.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, counts, seen = [], [], set()
    for name, records in groups:
        path, count = folder / name, 0
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for r in records:
                check_sample_key(r.key, seen)
                _write_record(tar, r)
                count += 1
        if count == 0:  # an empty input shard: write nothing rather than a tar WebDataset cannot read
            path.unlink()
            continue
        paths.append(path)
        counts.append(count)
    return ShardList(paths, counts)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def decode_latent_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw WebDataset sample -> ``{"key", "mean", "logvar": (C,h,w) float16 tensors, "caption", "meta"}``, and
    ``"mean_flip", "logvar_flip"`` where the shard holds the mirrored image's posterior (``encode_latents.flip``)."""
    key = sample["__key__"]
    missing = [e for e in (MEAN_EXT, LOGVAR_EXT) if e not in sample]
    if missing:
        raise KeyError(
            f"{sample.get('__url__', '?')}: sample {key!r} has no {', '.join(missing)}: not a latent shard "
            "(latent shards are written by `python cli.py encode-latents`)"
        )
    out = {
        "key": key,
        "mean": torch.from_numpy(read_npy(sample[MEAN_EXT])),  # (C, h, w) float16
        "logvar": torch.from_numpy(read_npy(sample[LOGVAR_EXT])),  # (C, h, w) float16
        "caption": sample["txt"].decode("utf-8") if "txt" in sample else "",
        "meta": json.loads(sample["json"]) if "json" in sample else {},
    }
    if MEAN_FLIP_EXT in sample and LOGVAR_FLIP_EXT in sample:
        out["mean_flip"] = torch.from_numpy(read_npy(sample[MEAN_FLIP_EXT]))  # (C, h, w) float16
        out["logvar_flip"] = torch.from_numpy(read_npy(sample[LOGVAR_FLIP_EXT]))
    return out


def iter_latents(urls: Sequence[str] | str) -> Iterator[dict[str, Any]]:
    """Every sample of the latent shards `urls` exactly once, in shard then file order, in this process.

    Yields ``{"key", "mean", "logvar": (C,h,w) float32, "caption", "meta"}``: the stored posterior, for
    evaluation and checks, where nothing may be skipped, doubled or randomised.
    """
    for sample in tar_samples({"url": u} for u in expand_urls(urls)):
        out = decode_latent_sample(sample)
        out["mean"], out["logvar"] = out["mean"].float(), out["logvar"].float()
        yield out


def _as_stat(value: float | Sequence[float], name: str) -> torch.Tensor:
    """A scalar or per-channel scale/shift as a tensor that broadcasts against (B, C, h, w)."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim > 1:
        raise ValueError(f"{name}: expected a number or one number per latent channel, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite values, got {value!r}")
    return t.reshape(-1, 1, 1) if t.ndim == 1 else t  # (C, 1, 1) or ()


def _exp_one_thread(x: torch.Tensor) -> torch.Tensor:
    """``torch.exp(x)`` on the calling thread only. The first multi-threaded float32 exp of a process is not
    reproducible on this project's CPUs (torch 2.13): in about one process in five, the second OpenMP thread's half
    of it came out up to 1.5e-4 off (0.0192336 for 0.0192322), while every later call, and any call on one thread,
    is exact to the last bit the same way each time. The train stage's validation set is that first call (its draw
    comes before training), so a rerun's `val/loss` moved in the 7th digit; the training loader's worker processes
    run one thread anyway. A one-thread exp over a batch of latents costs microseconds."""
    threads = torch.get_num_threads()
    if threads == 1:
        return torch.exp(x)
    torch.set_num_threads(1)
    try:
        return torch.exp(x)
    finally:
        torch.set_num_threads(threads)


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, scale: float | Sequence[float] | torch.Tensor,
                   shift: float | Sequence[float] | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw of ``z ~ q(z|x)`` from the cached posterior, in the diffusion space: ``(mean + std * eps - shift) *
    scale``, eps from `generator` (pitfall 3). mean, logvar: (B, C, h, w) float32; returns (B, C, h, w).

    What the training loader feeds the denoiser; the train stage's validation set is drawn by it too, so both see
    the same distribution of latents."""
    if not isinstance(scale, torch.Tensor):  # a tensor is already _as_stat's (LatentStream keeps them)
        scale = _as_stat(scale, "latent_scale")
    if not isinstance(shift, torch.Tensor):
        shift = _as_stat(shift, "latent_shift")
    eps = torch.randn(mean.shape, generator=generator)  # (B, C, h, w)
    z = mean + _exp_one_thread(0.5 * logvar) * eps
    if scale.ndim and scale.shape[0] != z.shape[1]:
        raise ValueError(f"latent_scale has {scale.shape[0]} channels, the latents {z.shape[1]}")
    return (z - shift) * scale


@functools.lru_cache(maxsize=8)
def _swap_table(swaps: tuple[tuple[str, str], ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """The pattern and replacements of :func:`mirror_caption`, built once per `swaps` (it runs for every mirrored
    sample the loader draws)."""
    table = {}
    for a, b in swaps:
        table.update({a: b, b: a, a.capitalize(): b.capitalize(), b.capitalize(): a.capitalize()})
    return re.compile(r"\b(" + "|".join(map(re.escape, sorted(table, key=len, reverse=True))) + r")\b"), table


def mirror_caption(caption: str, swaps: Sequence[tuple[str, str]]) -> str:
    """`caption` as it reads for the image mirrored left to right: each word of a pair in `swaps` (whole words,
    also capitalised) replaced by the other, in one pass (``("left", "right")``: "top left" -> "top right")."""
    if not swaps:
        return caption
    pattern, table = _swap_table(tuple(tuple(pair) for pair in swaps))
    return pattern.sub(lambda m: table[m.group(0)], caption)


def _flip(samples: Iterator[dict[str, Any]], rng: random.Random,
          swaps: Sequence[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """Each sample that holds the mirrored image's posterior takes it with probability 1/2, its caption mirrored
    by `swaps` (``train.random_flip``); one draw per sample either way, so the choice of a sample does not depend
    on whether the samples before it could flip."""
    for s in samples:
        if rng.random() < 0.5 and "mean_flip" in s:
            s = {**s, "mean": s["mean_flip"], "logvar": s["logvar_flip"],
                 "caption": mirror_caption(s["caption"], swaps)}
        yield s


class LatentStream(ShardStream):
    """The dataset half of :func:`make_latent_loader`: :class:`ShardStream` (same shard sampling, shuffle,
    seeding by (seed, rank, worker, epoch) and caption dropout) over latent shards, drawing
    ``z ~ q(z|x)`` at load time and scaling it: ``latents = (z - shift) * scale``; with `random_flip`, half the
    samples that hold a mirrored posterior take it (:func:`_flip`)."""

    def __init__(self, urls: list[str], tokenizer: Tokenizer, *, latent_scale: float | Sequence[float],
                 latent_shift: float | Sequence[float], random_flip: bool = False,
                 flip_swaps: Sequence[tuple[str, str]] = (), **kwargs: Any):
        super().__init__(urls, tokenizer, image_keys=(), **kwargs)
        self.scale = _as_stat(latent_scale, "latent_scale")
        self.shift = _as_stat(latent_shift, "latent_shift")
        self.random_flip, self.flip_swaps = random_flip, tuple(flip_swaps)

    def augment(self, samples: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        return _flip(samples, self._rng(worker, "flip"), self.flip_swaps) if self.random_flip else samples

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [s["caption"] for s in samples]
        return {
            "mean": torch.stack([s["mean"] for s in samples]).float(),  # (B, C, h, w)
            "logvar": torch.stack([s["logvar"] for s in samples]).float(),  # (B, C, h, w)
            "tokens": trim_padding(encode(self.tokenizer, captions)),  # (B, T), after dropout
            "caption": captions,
            "meta": [s["meta"] for s in samples],
            "key": [s["key"] for s in samples],
        }

    def _sample(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        mean, logvar = batch.pop("mean"), batch.pop("logvar")
        return {"latents": sample_latents(mean, logvar, self.scale, self.shift, generator), **batch}

    def decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        return decode_latent_sample(sample)

    def batches(self, batches: Iterator[dict[str, Any]], worker: int) -> Iterator[dict[str, Any]]:
        # The posterior noise, like every other draw, is seeded by (seed, rank, worker, epoch).
        generator = torch.Generator().manual_seed(self._rng(worker, "posterior").getrandbits(63))
        for batch in batches:
            yield self._sample(batch, generator)


def make_latent_loader(
    urls: Sequence[str] | str,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    latent_scale: float | Sequence[float],
    latent_shift: float | Sequence[float],
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    epoch_steps: int | None = None,
    seed: int = 0,
    caption_dropout: float = 0.1,
    resampled: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    replay_urls: Sequence[str] = (),
    replay_fraction: float = 0.0,
    random_flip: bool = False,
    flip_swaps: Sequence[tuple[str, str]] = (),
) -> StreamLoader:
    """The training loader over latent shards, DDP-correct as :func:`diffusion.data.loader.make_loader`.

    Batches: ``{"latents": (B,C,h,w) float32 = (mean + std*eps - shift) * scale, "tokens": (B,T) long,
    "caption": list[str] ("" where dropped), "meta": list[dict], "key": list[str]}``.

    Args:
        urls: latent shard paths, a brace pattern, or a folder of ``.tar`` files.
        tokenizer: encodes the captions (after dropout) to (T,) ids.
        batch_size: samples per batch; every batch is full.
        latent_scale, latent_shift: measured with the VAE (``load_vae``); a number or one per channel.
        num_workers: DataLoader worker processes (0: load in the main process).
        shuffle_buffer: samples in the shuffle buffer (<= 1: none).
        epoch_steps: batches per epoch on every rank (None: endless when resampled, one pass otherwise).
        seed: base seed; shards, shuffle, dropout and posterior noise are seeded by (seed, rank, worker, epoch).
        caption_dropout: probability of replacing a caption with the null caption ``""`` (pitfall 2).
        resampled: draw shards with replacement (training); False: each shard once per pass.
        pin_memory: page-locked batches, for faster copies to a GPU.
        prefetch_factor: batches each worker loads ahead (with ``num_workers`` > 0).
        replay_urls, replay_fraction: latent shards of other data (of the same VAE) from which that share of the
            samples is drawn, at random, sample by sample (``train.replay``: rehearsal of a fine-tuned model's
            original data); resampled only.
        random_flip: each sample whose shard holds the mirrored image's posterior (``encode_latents.flip``) takes
            it with probability 1/2, seeded as the other draws; flip_swaps: word pairs its caption then swaps
            (``("left", "right")``).
    """
    return stream_loader(
        LatentStream, urls, tokenizer, batch_size=batch_size, num_workers=num_workers, epoch_steps=epoch_steps,
        resampled=resampled, caption_dropout=caption_dropout, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
        latent_scale=latent_scale, latent_shift=latent_shift, shuffle_buffer=shuffle_buffer, seed=seed,
        replay_urls=expand_urls(replay_urls) if replay_urls else (), replay_fraction=replay_fraction,
        random_flip=random_flip, flip_swaps=flip_swaps,
    )
