"""Benchmark the built-in shapes dataset: images per second, with and without PNG encoding.

    python bench/bench_shapes.py                       # 10,000 images at 64 px, single objects
    python bench/bench_shapes.py --n 2000 --resolution 32 --level pair

Generation alone is what `diffusion.data.shapes` owns; the PNG figure adds the encoding the shard writer
does (Pillow, default compression), to show which of the two dominates a `shard` run.
"""

from __future__ import annotations

import argparse
import io
import time

from diffusion.data.shapes import generate_shapes
from diffusion.data_configs import ShapesConfig


def _run(cfg: ShapesConfig, resolution: int, encode: bool) -> tuple[float, int]:
    """(seconds, PNG bytes) for generating cfg.num_train images, optionally encoding each as PNG."""
    total_bytes = 0
    start = time.perf_counter()
    for sample in generate_shapes(cfg, "train", resolution, seed=0):
        if encode:
            buf = io.BytesIO()
            sample.image.save(buf, format="PNG")
            total_bytes += buf.tell()
    return time.perf_counter() - start, total_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images to generate")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels")
    parser.add_argument("--level", choices=["single", "pair"], default="single")
    args = parser.parse_args()

    cfg = ShapesConfig(num_train=args.n, level=args.level)
    print(f"shapes: {args.n} images, {args.resolution} px, level {args.level}")
    for encode in (False, True):
        seconds, size = _run(cfg, args.resolution, encode)
        label = "generate + PNG" if encode else "generate only "
        extra = f", {size / args.n / 1024:.1f} KiB/image" if encode else ""
        print(f"  {label}: {seconds:6.2f} s, {args.n / seconds:8.0f} images/s{extra}")


if __name__ == "__main__":
    main()
