"""Benchmark: samples/s through `make_loader` (read + decode + tokenize + batch), 0 and 2 workers.

Writes N procedural 64-px samples (the dummy dataset's coloured shapes) into temporary shards first.
A script that prints figures, not a test (STYLE.md 15).

    python bench/bench_loader.py --num-samples 5000 --batch-size 64
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from diffusion.data.dataset import _COLOURS, _PLACES, _SHAPES, draw_shape
from diffusion.data.loader import make_loader
from diffusion.data.records import Sample
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
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = write_shards(samples(args.num_samples, args.image_size), Path(tmp) / "shards",
                              samples_per_shard=args.samples_per_shard, image_format="png")
        write_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in shards) / 1e6
        print(f"wrote {shards.num_samples} samples in {len(shards)} shards ({size_mb:.1f} MB) "
              f"in {write_s:.1f} s: {shards.num_samples / write_s:,.0f} samples/s")
        tok = train_tokenizer((s.caption for s in samples(1000, 8)), vocab_size=256, max_length=32)
        steps = max(1, args.num_samples // args.batch_size)
        for workers in args.workers:
            loader = make_loader([str(p) for p in shards], tok, batch_size=args.batch_size,
                                 num_workers=workers, epoch_steps=steps, shuffle_buffer=1000)
            t0 = time.perf_counter()
            n = sum(batch["image"].shape[0] for batch in loader)
            dt = time.perf_counter() - t0
            print(f"make_loader workers={workers}: {n} samples in {dt:.2f} s: {n / dt:,.0f} samples/s "
                  f"(batch {args.batch_size}, {args.image_size}px png, startup included)")


if __name__ == "__main__":
    main()
