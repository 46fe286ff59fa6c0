"""Stage `shard`: a source of images and captions -> WebDataset shards, a tokenizer and a manifest.

Reads the `shard` section of params.yaml (`diffusion.data_configs.ShardConfig`) and writes

    <out_dir>/train/shard-*.tar, <out_dir>/val/shard-*.tar   (layout: diffusion.data.shards)
    <out_dir>/manifest.json                                  (counts, skipped inputs by reason, how split)
    <out_dir>/skipped.jsonl                                  (every skipped input: source, reason, detail)
    <tokenizer_path>                                         (BPE trained on the train captions)

Everything is written to a temporary folder first and moved into place only when complete, so a killed
run leaves the previous output (or none), never a half-written one. A rerun with the same parameters
writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from diffusion.config import ConfigError
from diffusion.data.ordered_pool import usable_cores
from diffusion.data.records import Sample, Skipped
from diffusion.data.shape_captions import attribute_values
from diffusion.data.shapes import generate_shapes, validate_holdout
from diffusion.atomic import atomic_write_json, atomic_write_text, check_replaceable, staged_dir
from diffusion.data.shards import ShardWriter, write_shards
from diffusion.data.sources import FolderSource, SourceError, iter_folder, iter_webdataset, summarise
from diffusion.data.tokenizer import save_tokenizer, train_tokenizer
from diffusion.data_configs import ShardConfig

#: What the stage writes in out_dir (anything else there stops it: check_replaceable). The split folders as
#: patterns of their files: a train/ or val/ folder of images (a dataset split into folders) is not the stage's.
SHARD_ENTRIES = ("train/shard-*.tar", "val/shard-*.tar", "manifest.json", "skipped.jsonl")


class ShardError(RuntimeError):
    """The source gave nothing usable, or cannot be read; nothing was written."""


def validate(cfg: ShardConfig) -> Iterable[Sample | Skipped] | None:
    """Checks that need more than the config itself, run before any work (bad input stops early).

    Returns the user's source, checked (None for the built-in dataset), for `run`: a folder is listed and its
    metadata parsed once per stage, which for a folder of a million images takes minutes, not milliseconds.
    """
    items = None
    _check_outputs_apart_from_inputs(cfg)
    if cfg.source == "shapes":
        validate_holdout(cfg.shapes)
    else:
        try:
            # Lists the folder, picks its layout and parses its metadata.jsonl files, or expands the tar patterns,
            # reading no image: a pattern that matches nothing, a folder whose captions cannot be found or a
            # malformed metadata line stops here (exit code 2), not after the MLflow run opens.
            items = _user_items(cfg)
        except SourceError as error:
            raise ConfigError(f"shard.{error.key}: {error}") from error
    inside = _tokenizer_inside(cfg)
    check_replaceable(cfg.out_dir, SHARD_ENTRIES + ((inside.as_posix(),) if inside else ()), "shard.out_dir")
    tokenizer = Path(cfg.tokenizer_path)
    if tokenizer.is_dir() or any(parent.is_file() for parent in tokenizer.parents):
        raise ConfigError(f"shard.tokenizer_path: {tokenizer} is a folder or lies under a file; expected a file path")
    return items


def _check_outputs_apart_from_inputs(cfg: ShardConfig) -> None:
    """Refuse an out_dir that is the source folder, lies inside it or holds it (or, for tars, holds one of them),
    and a tokenizer_path that is an input. The stage replaces out_dir whole: a folder split into train/ and
    val/, given as both path and out_dir, was deleted. Inside the source it would add its tars to the images
    read next time. Paths are resolved, so ``ds/x`` and ``./ds/x/`` or a link to it are one folder.
    """
    if cfg.source == "shapes" or not cfg.path:
        return
    out, tokenizer = Path(cfg.out_dir).resolve(), Path(cfg.tokenizer_path).resolve()
    if cfg.source == "folder":
        src = Path(cfg.path).resolve()
        if out == src or src in out.parents or out in src.parents:
            how = "is" if out == src else "lies inside" if src in out.parents else "holds"
            raise ConfigError(f"shard.out_dir: {cfg.out_dir} {how} the source folder shard.path={cfg.path}; the "
                              "stage replaces out_dir whole, so it must be a folder apart from the images")
        if tokenizer == src or src in tokenizer.parents:
            raise ConfigError(f"shard.tokenizer_path: {cfg.tokenizer_path} lies inside the source folder "
                              f"shard.path={cfg.path}; expected a path outside the images")
        return
    try:
        from diffusion.data.sources.tars import expand_urls, is_remote

        tars = [Path(url).resolve() for url in expand_urls(cfg.path) if not is_remote(url)]
    except SourceError:
        return  # said, with its key, when the source is opened (validate)
    held = [tar for tar in tars if out in tar.parents or tar == out]
    if held:
        raise ConfigError(f"shard.out_dir: {cfg.out_dir} holds {held[0]}, an input tar of shard.path={cfg.path!r}"
                          f"{f' (and {len(held) - 1} more)' if len(held) > 1 else ''}; the stage replaces out_dir "
                          "whole, so it must be a folder apart from its inputs")
    if tokenizer in tars:
        raise ConfigError(f"shard.tokenizer_path: {cfg.tokenizer_path} is an input tar of shard.path={cfg.path!r}; "
                          "expected a path of its own")


def _tokenizer_inside(cfg: ShardConfig) -> Path | None:
    """The tokenizer's path relative to out_dir if it is written inside it (then it moves with the folder)."""
    try:
        return Path(cfg.tokenizer_path).resolve().relative_to(Path(cfg.out_dir).resolve())
    except ValueError:
        return None


def _goes_to_val(item: Sample, cfg: ShardConfig) -> bool:
    """The source's own split where it has one (a folder split into train/ and test/: val_fraction does not
    apply, and no test image can train), else the hash of `_is_val`."""
    if item.split:
        return item.split == "val"
    return _is_val(item.split_key or item.key, cfg)


def _is_val(key: str, cfg: ShardConfig) -> bool:
    """Seeded, order-independent split of a user source: a hash of (seed, key) against val_fraction. The key is
    the sample's `split_key`, which depends on the image's own name only: an image never moves between train
    and val because others were added or removed (val would leak into a model trained on an earlier split)."""
    digest = hashlib.blake2b(f"{cfg.seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.val_fraction


def _user_items(cfg: ShardConfig) -> Iterable[Sample | Skipped]:
    """The user's source, checked as a whole (SourceError), its images not read yet."""
    workers = _workers(cfg)
    if cfg.source == "folder":
        return iter_folder(Path(cfg.path), cfg.folder_layout, cfg.caption_template, cfg.resolution, workers,
                           cfg.folder_splits)
    return iter_webdataset(cfg.path, cfg.resolution, workers)


def _workers(cfg: ShardConfig) -> int:
    """Threads that may decode a user's images and encode the images written (`data.ordered_pool`: used when an
    image takes long enough): `shard.workers`, or one per CPU core this process may run on (a batch scheduler's
    allowance, not the machine's count)."""
    return cfg.workers or usable_cores()


class _Split:
    """Routes one pass over a user source to train (streamed to its writer by `write_shards`) and val (streamed
    to `val`, its own writer, as the items come: a million-image folder's 5% is 50k images, ~10 GB of pixels at
    256 px had they been kept for a second pass)."""

    def __init__(self, cfg: ShardConfig, val: ShardWriter) -> None:
        self.cfg, self.val = cfg, val
        self.skipped: list[Skipped] = []
        self.captions: list[str] = []

    def train(self, items: Iterable[Sample | Skipped]) -> Iterator[Sample]:
        for item in items:
            if isinstance(item, Skipped):
                self.skipped.append(item)
                print(f"  skipped {item.source}: {item.reason} {item.detail}".rstrip())
            elif _goes_to_val(item, self.cfg):
                self.val.add(item)
            else:
                self.captions.append(item.caption)
                yield item


def _with_captions(samples: Iterable[Sample], captions: list[str]) -> Iterator[Sample]:
    for s in samples:
        captions.append(s.caption)
        yield s


def _write(cfg: ShardConfig, tmp: Path, items: Iterable[Sample | Skipped] | None) -> dict[str, Any]:
    """Write both splits into `tmp` from `items` (a user source; None for shapes); return the manifest (without
    paths that depend on `tmp`)."""
    kw = dict(samples_per_shard=cfg.samples_per_shard, image_format=cfg.image_format, workers=_workers(cfg))
    if cfg.source == "shapes":
        captions: list[str] = []
        train = write_shards(
            _with_captions(generate_shapes(cfg.shapes, "train", cfg.resolution, cfg.seed), captions),
            tmp / "train", **kw,
        )
        val = write_shards(generate_shapes(cfg.shapes, "val", cfg.resolution, cfg.seed), tmp / "val", **kw)
        skipped: list[Skipped] = []
        extra = {"attributes": {k: list(v) for k, v in attribute_values(cfg.shapes.level).items()},
                 "holdout": list(cfg.shapes.holdout)}
    else:
        val_writer = ShardWriter(tmp / "val", **kw)
        try:
            split = _Split(cfg, val_writer)
            train = write_shards(split.train(items), tmp / "train", **kw)
            if not split.captions:
                raise _no_usable_image(cfg, items, split.skipped)
            if not len(val_writer) and isinstance(items, FolderSource) and items.splits:
                # The user held those images out on purpose: an empty val split means the held-out folder was
                # read wrongly (another layout than train/'s), not that nothing should be held out. Raised
                # here, in the temporary folder, so the previous output is left as it was.
                raise _empty_held_out(items, split.skipped)
            if not len(val_writer):  # allowed (val_fraction 0), but train_vae, train, train_judge and evaluate refuse it
                print(f"warning: no image fell into the val split ({_split_said(cfg, items)}, "
                      f"{len(split.captions)} train images); train_vae, train (its validation loss, unless "
                      "train.val_batches: 0), train_judge and evaluate need val images")
            val = val_writer.finish()
        finally:
            val_writer.discard()
        captions, skipped = split.captions, split.skipped
        extra = _split_manifest(items)
    return {
        "captions": captions,
        "skipped": skipped,
        "manifest": {
            "source": cfg.source,
            "path": cfg.path,
            "resolution": cfg.resolution,
            "counts": {"train": len(captions), "val": val.num_samples},
            "shards": {"train": [p.name for p in train], "val": [p.name for p in val]},
            "sha256": {"train": train.digests(), "val": val.digests()},  # what training runs key on
            "skipped": summarise(skipped),
            # Never silent: which inputs were skipped and why (first few of each reason; all in skipped.jsonl).
            "skipped_examples": _examples(skipped),
            **extra,
        },
    }


def _split_manifest(items: Iterable[Sample | Skipped] | None) -> dict[str, Any]:
    """How a user source was split, for the manifest (tracked with the shards): ``split: folders`` (the root's
    train/ and test/ folders, named in ``split_folders``) or ``hash`` (val_fraction); a folder's layout."""
    if not isinstance(items, FolderSource):
        return {"split": "hash"}
    if items.splits is None:
        return {"layout": items.layout, "split": "hash"}
    return {"layout": items.layout, "split": "folders", "split_folders": items.splits.to_manifest()}


def _split_said(cfg: ShardConfig, items: Iterable[Sample | Skipped] | None) -> str:
    """How a user source is split, in words: by its folders, or by hash at val_fraction."""
    if isinstance(items, FolderSource) and items.splits:
        return f"by folder: {items.splits.describe()}; shard.val_fraction does not apply"
    note = f"; {items.splits_note}" if isinstance(items, FolderSource) and items.splits_note else ""
    return f"by a hash of each image's path, shard.val_fraction {cfg.val_fraction}{note}"


def _no_usable_image(cfg: ShardConfig, items: Iterable[Sample | Skipped] | None, skipped: list[Skipped]) -> ShardError:
    """The error for a user source that gave no train image: how it was read, what was skipped, what to do."""
    counts = ", ".join(f"{r}={n}" for r, n in summarise(skipped).items() if n) or "none"
    if isinstance(items, FolderSource):
        how = f"read as layout '{items.layout}'" + (f", chosen because {items.reason}" if items.reason else "")
        few = items.captioned * 2 < items.images
        advice = _layout_advice(items) if few else "every image with a caption was skipped (reasons above)"
    else:
        how, advice = "read as WebDataset tars", "expected samples with an image and a caption"
    return ShardError(f"shard.path: no usable image in {cfg.path!r}, {how} (skipped: {counts}); {advice}")


def _empty_held_out(items: FolderSource, skipped: list[Skipped]) -> ShardError:
    """The error for a folder split whose held-out folder gave no image: which folder, and what was skipped
    there, by reason."""
    held = [s for s in skipped if items.splits.split_of(s.source) == "val"]
    counts = ", ".join(f"{r}={n}" for r, n in summarise(held).items() if n) or "nothing skipped"
    folders = " and ".join(f"{f}/" for f in items.splits.val)
    return ShardError(
        f"shard.path: {folders} in {items.root} gave no image for the val split (skipped there: {counts}; read "
        f"as layout '{items.layout}'); give its images captions as train/'s are given, or set "
        "shard.folder_splits=ignore to hash every image by shard.val_fraction. Nothing was written")


def _write_skipped(path: Path, skipped: list[Skipped]) -> None:
    """Every skipped input, one JSON object per line, sorted (the order items were read in is an implementation
    detail; sorted, the file is the same whatever reads the source). Empty when nothing was skipped."""
    rows = sorted((s.source, s.reason, s.detail) for s in skipped)
    lines = (json.dumps({"source": src, "reason": reason, "detail": detail}, ensure_ascii=False) + "\n"
             for src, reason, detail in rows)
    atomic_write_text(path, "".join(lines))


def _examples(skipped: list[Skipped], per_reason: int = 5) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in skipped:
        if len(out.setdefault(s.reason, [])) < per_reason:
            out[s.reason].append(s.source)
    return out


def _layout(items: Iterable[Sample | Skipped] | None) -> str:
    """`` layout=...`` for the console line: which layout a folder is read in, and why when chosen by ``auto``."""
    if not isinstance(items, FolderSource):
        return ""
    return f" layout={items.layout}" + (f" (auto: {items.reason})" if items.reason else "")


def _layout_advice(source: FolderSource) -> str:
    """What to set when the layout read finds few captions: one stray caption among class folders makes ``auto``
    pick ``captions``, and the images without one are then all skipped."""
    if source.layout == "captions" and source.in_subfolders:
        return "if the subfolders are classes, run with -S shard.folder_layout=classes"
    if source.layout == "metadata":  # a metadata.jsonl is there on purpose: what it lacks is rows
        return "give each image a line with its file_name and text in a metadata.jsonl"
    return "set shard.folder_layout to the layout the folder is in (metadata, captions or classes)"


def _warn_on_coverage(items: Iterable[Sample | Skipped] | None) -> None:
    """A warning when ``auto`` picked a layout that gives fewer than half the images a caption."""
    if isinstance(items, FolderSource) and items.reason and items.captioned * 2 < items.images:
        print(f"warning: layout '{items.layout}' ({items.reason}) gives only {items.captioned} of {items.images} "
              f"images a caption; {_layout_advice(items)}")


def run(cfg: ShardConfig, items: Iterable[Sample | Skipped] | None = None) -> dict[str, Any]:
    """Run the stage; returns the manifest. Raises SourceError/ShardError before touching the outputs.

    `items`: what `validate(cfg)` returned, if the caller has validated (else validated here).
    """
    if items is None:
        items = validate(cfg)
    out_dir, tok_path, inside = Path(cfg.out_dir), Path(cfg.tokenizer_path), _tokenizer_inside(cfg)
    # The tokenizer is written in full first, beside its place, and renamed in with the folder (replace_dir):
    # shards and tokenizer cannot end up from two runs, unless the machine stops in the microseconds between the
    # renames. (Inside out_dir it is written into the new folder.)
    tok_tmp = None if inside else tok_path.parent / f".{tok_path.name}.tmp-{os.getpid()}"
    with staged_dir(out_dir, [] if inside else [(tok_tmp, tok_path)]) as tmp:
        print(f"shard: source={cfg.source}{_layout(items)} resolution={cfg.resolution} workers={_workers(cfg)} "
              f"-> {out_dir}")
        if cfg.source != "shapes":
            print(f"shard: split {_split_said(cfg, items)}")
        _warn_on_coverage(items)
        result = _write(cfg, tmp, items)
        manifest = result["manifest"]
        atomic_write_json(tmp / "manifest.json", manifest)
        _write_skipped(tmp / "skipped.jsonl", result["skipped"])
        tokenizer = train_tokenizer(result["captions"], cfg.vocab_size, cfg.max_length)
        save_tokenizer(tokenizer, tmp / inside if inside else tok_tmp)
    counts, skipped = manifest["counts"], {k: v for k, v in manifest["skipped"].items() if v}
    print(f"shard: wrote {counts['train']} train and {counts['val']} val samples to {out_dir}/{{train,val}}")
    print(f"shard: skipped {json.dumps(skipped) if skipped else 'nothing'}; manifest {out_dir / 'manifest.json'}, "
          f"every skip in {out_dir / 'skipped.jsonl'}")
    print(f"shard: tokenizer ({tokenizer.get_vocab_size()} tokens) -> {cfg.tokenizer_path}")
    return manifest


def main(cfg: ShardConfig) -> dict[str, Any]:
    """The DVC stage: validate, then run inside the stage's MLflow run (counts as metrics, the manifest)."""
    import mlflow

    from diffusion.tracking import stage_run

    items = validate(cfg)
    with stage_run("shard", cfg.to_dict()) as active:
        manifest = run(cfg, items)
        mlflow.log_metrics(
            {"train_samples": manifest["counts"]["train"], "val_samples": manifest["counts"]["val"]}
            | {f"skipped_{reason}": n for reason, n in manifest["skipped"].items()}
        )
        mlflow.log_dict(manifest, "manifest.json")
        mlflow.log_artifact(str(Path(cfg.out_dir) / "skipped.jsonl"))  # every skip, where the manifest has 5 each
        print(f"shard: MLflow run {active.info.run_id}")
    return manifest
