"""Benchmark: samples/s through `make_loader` (read + decode + tokenize + batch), 0 and 2 workers.

Writes N procedural 64-px samples (the dummy dataset's coloured shapes) into temporary shards first.
``--latents`` times the train stage's loader instead, `make_latent_loader` (read the float16 posterior,
draw z ~ q(z|x), tokenize, batch), over random posteriors of ``--latent-shape`` (default 4x32x32, the GPU
profile's 256 px latents): can a few worker processes feed a GPU's training step?
A script that prints figures, not a test (STYLE.md 15).

    python bench/bench_loader.py --num-samples 5000 --batch-size 64
    python bench/bench_loader.py --latents --num-samples 8192 --batch-size 256 --workers 0 1 2
    python bench/bench_loader.py --iter-shards --image-size 256 --image-format jpg --num-samples 1000 --workers 1 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from diffusion.data.dataset import _COLOURS, _PLACES, _SHAPES, draw_shape
from diffusion.data.latents import LatentRecord, make_latent_loader, write_latent_shards
from diffusion.data.loader import make_loader
from diffusion.data.records import Sample
from diffusion.data.shard_reading import iter_shards
from diffusion.data.shards import write_shards
from diffusion.data.tokenizer import train_tokenizer


def samples(n: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        colour, shape, place = rng.choice(list(_COLOURS)), rng.choice(_SHAPES), rng.choice(list(_PLACES))
        caption = f"a {colour} {shape} in the {place}"
        meta = {"attributes": {"color": colour, "shape": shape, "position": place}}
        yield Sample(f"{i:07d}", draw_shape(size, colour, shape, place), caption, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--image-format", choices=["png", "jpg"], default="png")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--latents", action="store_true", help="time make_latent_loader over latent shards")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"))
    parser.add_argument("--iter-shards", action="store_true", help="time iter_shards, --workers decoding threads")
    args = parser.parse_args()
    if args.latents:
        latents(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # --iter-shards: the built-in shapes, whose noise texture makes a 256 px image cost what a photo does to
        # decode (the flat dummy shapes decode several times faster)
        source = shapes(args.num_samples, args.image_size) if args.iter_shards else samples(args.num_samples,
                                                                                            args.image_size)
        shards = write_shards(source, Path(tmp) / "shards",
                              samples_per_shard=args.samples_per_shard, image_format=args.image_format)
        write_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in shards) / 1e6
        print(f"wrote {shards.num_samples} samples in {len(shards)} shards ({size_mb:.1f} MB) "
              f"in {write_s:.1f} s: {shards.num_samples / write_s:,.0f} samples/s")
        if args.iter_shards:
            return read_in_order([str(p) for p in shards], args)
        tok = train_tokenizer((s.caption for s in samples(1000, 8)), vocab_size=256, max_length=32)
        steps = max(1, args.num_samples // args.batch_size)
        for workers in args.workers:
            loader = make_loader([str(p) for p in shards], tok, batch_size=args.batch_size,
                                 num_workers=workers, epoch_steps=steps, shuffle_buffer=1000)
            t0 = time.perf_counter()
            n = sum(batch["image"].shape[0] for batch in loader)
            dt = time.perf_counter() - t0
            print(f"make_loader workers={workers}: {n} samples in {dt:.2f} s: {n / dt:,.0f} samples/s "
                  f"(batch {args.batch_size}, {args.image_size}px {args.image_format}, startup included)")


def shapes(n: int, size: int):
    from diffusion.data.shapes import generate_shapes
    from diffusion.data_configs import ShapesConfig

    return generate_shapes(ShapesConfig(num_train=n, holdout=[]), "train", size, seed=0)


def read_in_order(shards: list[str], args: argparse.Namespace) -> None:
    """iter_shards with 1, 2, ... decoding threads, alternated over three rounds (this machine is shared)."""
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    for _ in range(3):
        for workers in args.workers:
            t0 = time.perf_counter()
            n = sum(1 for _ in iter_shards(shards, workers=max(1, workers)))
            rates[workers].append(n / (time.perf_counter() - t0))
    base = statistics.median(rates[args.workers[0]])
    for workers, r in rates.items():
        print(f"iter_shards workers={workers}: {statistics.median(r):,.0f} samples/s (median of 3; "
              f"{statistics.median(r) / base:.2f}x workers={args.workers[0]}; {args.image_size}px {args.image_format})")


def latent_records(n: int, shape: list[int], seed: int = 0):
    """Random float16 posteriors (the loader's cost does not depend on their values) with the shapes' captions."""
    rng = np.random.default_rng(seed)
    for i, sample in enumerate(samples(n, 8, seed)):
        mean = rng.standard_normal(shape).astype(np.float16)
        logvar = (rng.standard_normal(shape) - 4).astype(np.float16)
        yield LatentRecord(sample.key, mean, logvar, sample.caption, sample.meta)


def latents(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        records = latent_records(args.num_samples, args.latent_shape)
        groups = ((f"shard-{i:05d}.tar", [r for _, r in zip(range(args.samples_per_shard), records)])
                  for i in range(-(-args.num_samples // args.samples_per_shard)))
        t0 = time.perf_counter()
        shards = write_latent_shards(groups, Path(tmp) / "latents")
        print(f"wrote {shards.num_samples} latents {tuple(args.latent_shape)} float16 in {len(shards)} shards "
              f"in {time.perf_counter() - t0:.1f} s")
        tok = train_tokenizer((s.caption for s in samples(1000, 8)), vocab_size=256, max_length=77)
        steps = max(1, args.num_samples // args.batch_size)
        for workers in args.workers:
            loader = make_latent_loader([str(p) for p in shards], tok, batch_size=args.batch_size,
                                        latent_scale=1.0, latent_shift=0.0, num_workers=workers, epoch_steps=steps)
            it = iter(loader)
            next(it)  # startup (worker processes, the first shuffle buffer) apart from the steady rate
            t0 = time.perf_counter()
            n = sum(batch["latents"].shape[0] for batch in it)
            dt = time.perf_counter() - t0
            print(f"make_latent_loader workers={workers}: {n} samples in {dt:.2f} s: {n / dt:,.0f} samples/s "
                  f"(batch {args.batch_size}, after the first batch)")


if __name__ == "__main__":
    main()
