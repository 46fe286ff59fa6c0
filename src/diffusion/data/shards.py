"""Write samples into WebDataset tar shards, deterministically and atomically.

Layout (the one img2dataset writes, so its shards are accepted as they are; docs/INTERFACES.md, Data): each
sample is a group of tar members that share a key, ``<key>.png`` (or ``.jpg``), ``<key>.txt`` (the caption,
UTF-8) and ``<key>.json`` (the metadata). WebDataset groups consecutive members by the part of the file name
before the first dot, so a key must not contain a dot.

Determinism: the same samples in the same order give byte-identical tars, so a second ``dvc repro`` sees
unchanged outputs. We write with :mod:`tarfile` directly and fix every header field that would otherwise
record the machine or the clock (mtime, uid/gid, user and group names, mode); there is no gzip (its header
holds a timestamp). webdataset's ``TarWriter`` stamps ``mtime=time.time()`` unless it is given one
(``webdataset/writer.py``, ``ti.mtime = self.mtime if self.mtime is not None else now``).

Atomicity: shards are written into a hidden sibling folder and swapped into place only when all are complete
(``diffusion.atomic``), so a killed run leaves either the previous complete set or nothing, never a half-written
one that a later stage would silently train on.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from diffusion.atomic import file_sha256, remove_stale_temps, replace_dir
from diffusion.data.ordered_pool import OrderedPool
from diffusion.data.records import Sample

ImageFormat = Literal["png", "jpg"]
IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg")

#: PNG: zlib level 6 without Pillow's `optimize` search, so the bytes depend only on the pixels (and the
#: zlib version). JPEG: quality 95, baseline, standard tables; libjpeg is deterministic for fixed options.
_ENCODE_OPTIONS: dict[str, dict[str, Any]] = {
    "png": {"format": "PNG", "compress_level": 6, "optimize": False},
    "jpg": {"format": "JPEG", "quality": 95, "optimize": False, "progressive": False},
}


class ShardList(list):
    """The shard paths written (a ``list[Path]``), with the number of samples in each.

    Attributes:
        counts: samples in each shard, in the same order as the paths.
    """

    def __init__(self, paths: Iterable[Path] = (), counts: Iterable[int] = ()):
        super().__init__(paths)
        self.counts: list[int] = list(counts)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def digests(self) -> dict[str, str]:
        """sha256 of each shard file, by name: recorded in the manifest, so that a training run can tell this
        data from other data of the same shard names and sizes (tar pads to 10 KiB: an edited caption or a
        changed image usually keeps the size) without hashing the shards at every start
        (``run_keys.files_fingerprint``)."""
        return {Path(p).name: file_sha256(p) for p in self}

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary for a manifest: shard file names and sample counts."""
        return {
            "num_shards": len(self),
            "num_samples": self.num_samples,
            "shards": {Path(p).name: n for p, n in zip(self, self.counts)},
        }


# --------------------------------------------------------------------------------------------------
# Encoding one sample
# --------------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, image_format: ImageFormat) -> bytes:
    """Encode an image to PNG or JPEG bytes with fixed options (deterministic). Converts to RGB."""
    if image_format not in _ENCODE_OPTIONS:
        raise ValueError(f"image_format: expected one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, **_ENCODE_OPTIONS[image_format])
    return buf.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one file with every machine- and time-dependent header field fixed."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def check_sample_key(key: str, seen: set[str]) -> None:
    """Refuse a key WebDataset would split wrongly or that repeats one in `seen`; then add it to `seen`."""
    if not key or "." in key or key.startswith("/") or key.endswith("/"):
        raise ValueError(
            f"sample key {key!r}: must be non-empty and contain no '.' (WebDataset splits a member name "
            "into key and extension at the first dot)"
        )
    if key in seen:
        raise ValueError(f"sample key {key!r}: duplicate (keys identify samples and must be unique)")
    seen.add(key)


def _write_sample(tar: tarfile.TarFile, sample: Sample, image_format: ImageFormat, image: bytes) -> None:
    """`image`: the sample's image, already encoded in `image_format` (`encode_image`)."""
    add_tar_member(tar, f"{sample.key}.{image_format}", image)
    add_tar_member(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
    meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False)
    add_tar_member(tar, f"{sample.key}.json", meta.encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# Shard sets
# --------------------------------------------------------------------------------------------------


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    *,
    samples_per_shard: int,
    image_format: ImageFormat = "png",
    prefix: str = "shard",
    workers: int = 1,
) -> ShardList:
    """Write `samples`, in the order given, to ``out_dir/{prefix}-000000.tar``, ...; replace `out_dir`.

    The caller sorts (shards hold samples in iteration order). Samples are streamed: one shard is open at a
    time. Everything goes to ``out_dir.parent/.{out_dir.name}.tmp-<pid>`` first; only when the last shard is
    closed is the old `out_dir` removed and the new one renamed into place. If iterating `samples` raises,
    the temporary folder is removed and the previous `out_dir` is left as it was. `workers` threads encode the
    images (:class:`ShardWriter`); the bytes written do not depend on it.

    Returns:
        the shard paths (inside `out_dir`) as a :class:`ShardList`, with ``.counts`` per shard.
    """
    writer = ShardWriter(out_dir, samples_per_shard=samples_per_shard, image_format=image_format, prefix=prefix,
                         workers=workers)
    try:
        for sample in samples:
            writer.add(sample)
        return writer.finish()
    finally:
        writer.discard()


class ShardWriter:
    """:func:`write_shards` one sample at a time: for a caller that routes one stream to several shard sets
    (the shard stage's train and val splits), each written as the samples come instead of held in memory.

    ``add`` each sample, then ``finish()`` swaps the set into `out_dir` and returns it; ``discard()`` (a no-op
    after ``finish``) removes what was written, leaving the previous `out_dir` as it was. Same atomicity and
    bytes as :func:`write_shards`.

    With `workers` > 1 the images are encoded on that many threads when an image takes long enough for that to
    pay (`data.ordered_pool`; zlib and libjpeg run without Python's lock, and a PNG of a 256 px photo takes ~20
    ms, more than decoding and resizing it), while the writing stays in the order the samples were added: the
    same bytes whatever `workers` is. An image is encoded after ``add`` returns (up to a few dozen samples later),
    so a sample's image must not change once added (an image sharing a buffer the caller refills would be written
    as the buffer is then).
    """

    def __init__(
        self, out_dir: str | Path, *, samples_per_shard: int, image_format: ImageFormat = "png", prefix: str = "shard",
        workers: int = 1,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard: expected >= 1, got {samples_per_shard}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format: expected one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
        if workers < 1:
            raise ValueError(f"workers: expected >= 1, got {workers}")
        self.out_dir = Path(out_dir)
        self.samples_per_shard, self.image_format, self.prefix = samples_per_shard, image_format, prefix
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out_dir)
        self.tmp: Path | None = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.names: list[str] = []
        self.counts: list[int] = []
        self._added = 0
        self._seen: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._encoder = OrderedPool(lambda sample: encode_image(sample.image, image_format), workers, "shard-encode")

    def __len__(self) -> int:
        """Samples added so far."""
        return self._added

    def add(self, sample: Sample) -> None:
        if self.tmp is None:
            raise RuntimeError(f"{self.out_dir}: shard set already finished or discarded")
        check_sample_key(sample.key, self._seen)  # here, so a bad key stops at the sample that has it
        self._added += 1
        for done in self._encoder.put(sample):
            self._write(*done)

    def finish(self) -> ShardList:
        """Write what is still being encoded, close the last shard and swap the set into `out_dir`; returns its
        paths and counts."""
        if self.tmp is None:
            raise RuntimeError(f"{self.out_dir}: shard set already finished or discarded")
        for done in self._encoder.drain():
            self._write(*done)
        self._stop()
        replace_dir(self.tmp, self.out_dir)
        self.tmp = None
        return ShardList((self.out_dir / n for n in self.names), self.counts)

    def discard(self) -> None:
        """Remove the unfinished set (nothing to do after ``finish``)."""
        try:
            self._stop()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None

    def _write(self, sample: Sample, image: bytes) -> None:
        if self._tar is None or self.counts[-1] == self.samples_per_shard:
            self._close_tar()
            self.names.append(f"{self.prefix}-{len(self.names):06d}.tar")
            self.counts.append(0)
            # PAX is tarfile's default; it adds extended headers only for names that need them
            # (non-ASCII, long), from the name alone, so the bytes stay deterministic.
            self._tar = tarfile.open(self.tmp / self.names[-1], "w", format=tarfile.PAX_FORMAT)
        _write_sample(self._tar, sample, self.image_format, image)
        self.counts[-1] += 1

    def _stop(self) -> None:
        """Close the open shard and the encoding threads (dropping what they have not started)."""
        self._encoder.close()
        self._close_tar()

    def _close_tar(self) -> None:
        tar, self._tar = self._tar, None
        if tar is not None:
            tar.close()


def list_shards(directory: str | Path) -> list[str]:
    """Sorted paths (as strings, ready for WebDataset) of the ``*.tar`` files in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: shard folder not found (run `python cli.py shard` first)")
    return sorted(str(p) for p in directory.glob("*.tar"))
