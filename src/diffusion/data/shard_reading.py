"""Read the stages' own WebDataset shards: tar members to samples, a damaged shard named, images decoded.

What the two ways of reading shards share. The training streams (`diffusion.data.loader.make_loader` over
images, `diffusion.data.latents.make_latent_loader` over latents) build on `tar_samples` and `expand_urls`,
the image stream also on `decode_sample`, and add resampling, shuffling and DDP on top. Where every sample
must be seen exactly once, in order (encode_latents; through `diffusion.data.in_memory.load_split`,
train_vae's validation images, the judge and evaluation), `iter_shards` reads in this process with none of
that machinery. Every stage's command turns `DamagedShardError` into exit code 1 (`diffusion.cli.run_stage`).

A shard sample (DESIGN.md, Data format) holds ``__key__``, an image (``png`` or ``jpg``), ``txt`` (the
caption) and ``json`` (the metadata); decoded it is ``{"key", "image", "caption", "meta"}``, the image in
the model's range [-1, 1] (``x / 127.5 - 1``) or, inside the training stream, still uint8.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tokenizers import Tokenizer

from diffusion.data.shards import list_shards
from diffusion.data.tokenizer import encode


class DamagedShardError(RuntimeError):
    """A shard that cannot be read to its end (cut short, overwritten): the message names it."""


def raise_damaged_shard(exn: Exception) -> bool:
    """WebDataset's exception handler for the stages' own shards: re-raise as :class:`DamagedShardError` naming
    the shard (WebDataset appends the stream and the URL to the error's args; tarfile's message names nothing).
    A stage's own shard is never skipped: a silent gap would change what trains."""
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
    if url is None or isinstance(exn, DamagedShardError):
        raise exn
    raise DamagedShardError(f"{url}: damaged shard ({exn.args[0]}); rerun the stage that wrote it") from exn


def tar_samples(sources: Any) -> Iterator[dict[str, Any]]:
    """``wds.tarfile_to_samples`` over `sources` (``{"url": ...}`` dicts), a damaged shard named."""
    return wds.tarfile_to_samples(handler=raise_damaged_shard)(sources)


def expand_urls(urls: Sequence[str] | str) -> list[str]:
    """A list of shard URLs from a list, a brace pattern (``shard-{000000..000009}.tar``) or a folder."""
    if isinstance(urls, (str, os.PathLike)):
        urls = str(urls)
        if os.path.isdir(urls):
            out = list_shards(urls)
        else:
            out = list(wds.shardlists.expand_urls(urls))
    else:
        out = [str(u) for u in urls]
    if not out:
        raise FileNotFoundError(f"no shards found in {urls!r} (run `python cli.py shard` first)")
    return out


def _decode_rgb(data: bytes) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]."""
    return pixels.movedim(-1, -3).float().div_(127.5).sub_(1.0).contiguous()


def decode_image(data: bytes) -> torch.Tensor:
    """Image bytes -> (3, H, W) float32 in [-1, 1]."""
    return to_model_range(torch.tensor(_decode_rgb(data)))  # copies the read-only array


def _sample_fields(sample: dict[str, Any], image_keys: Sequence[str]) -> dict[str, Any]:
    """A raw WebDataset sample (bytes per extension) -> key, caption, meta and its image's bytes (not decoded)."""
    key = sample["__key__"]
    image_key = next((k for k in image_keys if k in sample), None)
    if image_key is None:
        raise KeyError(f"{sample.get('__url__', '?')}: sample {key!r} has none of {list(image_keys)}")
    caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return {"key": key, "image": sample[image_key], "caption": caption, "meta": meta}


def decode_sample(sample: dict[str, Any], image_keys: Sequence[str]) -> dict[str, Any]:
    """A raw WebDataset sample (bytes per extension) -> key, image (H, W, 3) uint8, caption, meta.

    Images stay uint8 until a whole batch is stacked: one float conversion per batch, a quarter of the
    bytes through the shuffle buffer and worker queues' pickling."""
    out = _sample_fields(sample, image_keys)
    out["image"] = _decode_rgb(out["image"])
    return out


def iter_shards(
    urls: Sequence[str] | str, tokenizer: Tokenizer | None = None, keep: Callable[[dict[str, Any]], bool] | None = None,
    workers: int = 1,
) -> Iterator[dict[str, Any]]:
    """Every sample of `urls` exactly once, in shard order then file order, in this process.

    Yields ``{"key", "image": (3,H,W) float in [-1,1], "caption", "meta"}`` (plus ``"tokens": (T,) long``
    when a tokenizer is given). For evaluation and latent encoding, where nothing may be skipped or doubled.
    `keep`, if given, sees each sample's key, caption and meta first (``"image"`` still its encoded bytes): a
    sample it refuses is passed over without decoding its image.

    `workers` > 1 lets the images decode on that many threads when one takes long enough for threads to pay
    (`diffusion.data.ordered_pool`: a 256 px JPEG or PNG, not a 32 px PNG). Pillow's decoders run without Python's
    lock, and on a GPU encode_latents otherwise spent as long decoding a batch on one core as the VAE spent
    encoding it. The samples come back in the same order whatever `workers` is; but `keep` then runs ahead of
    them (it is called as a sample is read, up to ``8 * (workers + 1)`` samples before that sample is yielded), so a
    `keep` whose caller reads state it sets (``in_memory.load_split``'s reservoir slot) needs ``workers=1``.
    """
    from diffusion.data.ordered_pool import OrderedPool

    pool = OrderedPool(_decoded, workers, "decode")
    try:
        for sample in tar_samples({"url": u} for u in expand_urls(urls)):
            out = _sample_fields(sample, ("png", "jpg", "jpeg"))
            if keep is not None and not keep(out):
                continue
            yield from _finish(pool.put(out), tokenizer)
        yield from _finish(pool.drain(), tokenizer)
    finally:  # also when the caller stops early (a generator's close)
        pool.close()


def _decoded(out: dict[str, Any]) -> torch.Tensor:
    return decode_image(out["image"])  # (3, H, W)


def _finish(done: list[tuple[dict[str, Any], torch.Tensor]], tokenizer: Tokenizer | None) -> Iterator[dict[str, Any]]:
    """(sample, its decoded image) pairs from the pool -> the samples iter_shards yields."""
    for out, image in done:
        out["image"] = image
        if tokenizer is not None:
            out["tokens"] = encode(tokenizer, [out["caption"]])[0]
        yield out
