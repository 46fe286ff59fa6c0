"""Benchmark: the shard stage on a folder of photos, with 1 and more threads (`shard.workers`).

Writes `--images` photo-like JPEGs (smooth gradients, a few shapes and sensor noise, `--size` wide at 4:3, with a
side-car caption each) into a temporary folder first, then runs the stage (`pipeline.shard.run`: list, read,
decode, resize, deduplicate, split, encode, write the tars, train the tokenizer) once per `--workers` value,
alternating, and prints images/s, the ratio to one thread, and whether the outputs are byte-identical (they
must be: the threads only read, decode and encode; the stream's order settles the rest).
A script that prints figures, not a test (STYLE.md 15).

    python bench/bench_shard.py --images 300 --size 2000 --workers 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from diffusion.data_configs import ShardConfig
from pipeline import shard


def photo(i: int, width: int) -> Image.Image:
    """A 4:3 image that compresses like a photo: gradients, shapes, noise (random noise alone is incompressible)."""
    rng = np.random.default_rng(i)
    height = width * 3 // 4
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(x / width) * 255, (y / height) * 255, np.full_like(x, rng.uniform(0, 255))], axis=-1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 1), rng.integers(0, height - 1)
        r = int(rng.integers(width // 20, width // 5))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=2000, help="width of the photos (px); height is 3/4 of it")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--image-format", default="jpg", choices=["jpg", "png"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "photos"
        src.mkdir()
        t0 = time.perf_counter()
        for i in range(args.images):
            photo(i, args.size).save(src / f"img_{i:05d}.jpg", quality=90)
            (src / f"img_{i:05d}.txt").write_text(f"photo number {i}")
        print(f"{args.images} photos of {args.size}x{args.size * 3 // 4} written in {time.perf_counter() - t0:.1f} s; "
              f"stage at {args.resolution} px, {args.image_format}")
        times: dict[int, list[float]] = {w: [] for w in args.workers}
        digests: dict[int, str] = {}
        for _ in range(args.repeats):
            for w in args.workers:  # alternated, so a slow minute on a shared machine hits every setting
                out = Path(tmp) / f"out{w}"
                cfg = ShardConfig.from_dict({
                    "source": "folder", "path": str(src), "resolution": args.resolution, "workers": w,
                    "image_format": args.image_format, "samples_per_shard": 1000, "vocab_size": 64,
                    "out_dir": str(out), "tokenizer_path": str(out / "tokenizer.json")})
                start = time.perf_counter()
                shard.run(cfg)
                times[w].append(time.perf_counter() - start)
                digests[w] = digest(out)
                shutil.rmtree(out)
        base = min(times[args.workers[0]])
        print(f"\n{'workers':>8} {'best s':>8} {'images/s':>9} {'ratio':>6}  outputs")
        for w in args.workers:
            best = min(times[w])
            same = "identical" if digests[w] == digests[args.workers[0]] else "DIFFERENT"
            print(f"{w:>8} {best:>8.2f} {args.images / best:>9.1f} {base / best:>5.2f}x  {same}")


if __name__ == "__main__":
    main()
