"""Stage `encode_latents`: the image shards, encoded once by the frozen VAE, as latent shards.

Reads the `encode_latents` section of params.yaml (`diffusion.data_configs.EncodeLatentsConfig`), the image shards
written by `shard` and the VAE written by `train_vae`, and writes

    <out_dir>/train/*.tar, <out_dir>/val/*.tar   posterior mean and log-variance, caption, metadata
    <out_dir>/manifest.json                      counts, shards, latent shape, the VAE's scale and shift

(format: `diffusion.data.latents`). Training then reads latents instead of running the VAE on every step.

The VAE runs frozen (eval mode, no gradients, float32), in batches, over the shards in order; with
`samples_per_shard: null` every image shard becomes a latent shard of the same name and size. Everything is
written to a temporary folder and swapped into place when complete, so a killed run leaves the previous
output (or none); a rerun with the same inputs writes byte-identical files.

Resumable (with `samples_per_shard: null`): each latent shard is also kept, as it completes, in
``<checkpoint_dir>/encode_latents-<key>/{train,val}/``, the key a hash of what decides its bytes (the parameters,
the image shards' digests, the VAE's files, this stage's code), as the training stages key their checkpoints. A
run killed after hours of a large dataset restarts at the first shard it had not finished, and its output is the
uninterrupted run's, byte for byte: the VAE's batches never cross a shard, so a shard's bytes depend on that
shard alone. The folder is removed when the output is in place. Re-chunked output (`samples_per_shard` set)
batches across shards and starts over.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffusion.atomic import atomic_write_json, check_replaceable, pid_alive, staged_dir
from diffusion.config import ConfigError
from diffusion.data.latents import (
    LOGVAR_FLIP_EXT,
    MEAN_FLIP_EXT,
    LatentRecord,
    encode_records,
    rechunk,
    write_latent_shards,
)
from diffusion.data.locations import read_manifest, require_split, split_shards
from diffusion.data.ordered_pool import usable_cores
from diffusion.data.shard_reading import iter_shards
from diffusion.data.shards import ShardList, list_shards
from diffusion.data_configs import EncodeLatentsConfig
from diffusion.training.latent_stats import encoder_digest, load_vae, vae_problem

STAGE = "encode_latents"
SPLITS: tuple[str, ...] = ("train", "val")


class EncodeLatentsError(RuntimeError):
    """An input (the VAE or the image shards) is missing: the message names the stage that writes it."""


def validate(cfg: EncodeLatentsConfig) -> None:
    """Check the inputs exist before any work; a missing one names the stage to run first."""
    # train/ and val/ count as its own only holding tars (a latent shard is named as its image shard).
    check_replaceable(cfg.out_dir, ("train/*.tar", "val/*.tar", "manifest.json"), "encode_latents.out_dir")
    if problem := vae_problem(cfg.vae_dir):
        raise EncodeLatentsError(f"encode_latents.vae_dir: {problem}. It is written by the train_vae stage: "
                                 "run `python cli.py train-vae` (or `dvc repro train_vae`) first")
    for split in SPLITS:
        # An empty val folder is legitimate (val_fraction 0); an empty train folder is not.
        require_split(cfg.shards_dir, split, "encode_latents.shards_dir", "shard", EncodeLatentsError,
                      "image shards", allow_empty=split != "train")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encode_latents.device: 'cuda' requested but no GPU is available; use 'cpu' or 'auto'")


def _device(cfg: EncodeLatentsConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_frozen_vae(cfg: EncodeLatentsConfig) -> tuple[torch.nn.Module, Any, Any]:
    """The VAE in eval mode, float32, without gradients, on the configured device; and its scale/shift."""
    vae, scale, shift = load_vae(cfg.vae_dir)
    vae = vae.to(device=_device(cfg), dtype=torch.float32).eval().requires_grad_(False)
    if torch.device(_device(cfg)).type == "cuda":
        # cuDNN's autotuner may pick a different kernel per run; fixed kernels keep reruns identical.
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    return vae, scale, shift


def _expected_counts(cfg: EncodeLatentsConfig) -> dict[str, int | None]:
    """Samples per split from the shard manifest, for the progress bar (None if there is no manifest)."""
    try:
        counts = read_manifest(cfg.shards_dir)["counts"]
        return {split: int(counts[split]) for split in SPLITS}
    except (KeyError, TypeError, ValueError):
        return dict.fromkeys(SPLITS)


def _encoded(cfg: EncodeLatentsConfig, vae: torch.nn.Module, urls: list[str], bar: tqdm,
             flip: bool) -> Iterator[LatentRecord]:
    """The latent records of the image shards `urls`, in order, counted on `bar`, with the mirrored images'
    posteriors if `flip`. The images decode on one thread per usable core when they are large enough for that to
    pay (``iter_shards``' `workers`)."""
    for record in encode_records(vae, iter_shards(urls, workers=usable_cores()), cfg.batch_size, flip):
        bar.update(1)
        yield record


def _groups(
    cfg: EncodeLatentsConfig, vae: torch.nn.Module, shards: list[tuple[str, str]], bar: tqdm, flip: bool
) -> Iterator[tuple[str, Iterable[LatentRecord]]]:
    """(shard name, records): one per image shard (`shards`: (name, path or URL)), or re-chunked to
    `samples_per_shard`."""
    if not shards:  # an empty split (e.g. no val images): nothing to encode, an empty folder is written
        return
    if cfg.samples_per_shard is None:
        # Batches stay within a shard; the last batch of each shard may be smaller, deterministically.
        for name, url in shards:
            yield name, _encoded(cfg, vae, [url], bar, flip)
    else:
        records = _encoded(cfg, vae, [url for _, url in shards], bar, flip)
        yield from rechunk(records, cfg.samples_per_shard)


def encode_split(
    cfg: EncodeLatentsConfig, vae: torch.nn.Module, split: str, dest: Path, total: int | None,
    kept: Path | None = None,
) -> ShardList:
    """Encode ``<shards_dir>/<split>`` into ``dest`` (a folder), with a progress bar; with `kept` (a resume
    folder, one latent shard per image shard only), shard by shard through it (:func:`_encode_resumably`). The
    mirrored images (`flip`) only for the train split: validation and evaluation read the images as they are."""
    shards, flip = split_shards(cfg.shards_dir, split), cfg.flip and split == "train"
    with tqdm(total=total, desc=f"encode_latents {split}", unit="img", mininterval=1.0) as bar:
        if kept is not None:
            return _encode_resumably(cfg, vae, shards, dest, kept, bar, flip)
        return write_latent_shards(_groups(cfg, vae, shards, bar, flip), dest)


def _encode_resumably(
    cfg: EncodeLatentsConfig, vae: torch.nn.Module, shards: list[tuple[str, str]], dest: Path, kept: Path, bar: tqdm,
    flip: bool,
) -> ShardList:
    """Each image shard's latent shard: taken from `kept` if an earlier run of the same key finished it, else
    encoded into `kept` (under a temporary name, renamed when complete: a killed run leaves no half shard there);
    then linked (or copied) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    kept.mkdir(parents=True, exist_ok=True)
    for stale in kept.glob(".partial-*"):  # a killed run's half shard (its pid gone, or our own from before)
        if not pid_alive(int(stale.name.rsplit("-", 1)[1])) or stale.name == f".partial-{os.getpid()}":
            shutil.rmtree(stale, ignore_errors=True)
    # Per process: a second run of the same key (the same out_dir) encoding at the same time writes its own half
    # shard, and the complete ones it renames in are the same bytes.
    work = kept / f".partial-{os.getpid()}"
    paths, counts, reused = [], [], 0
    for name, url in shards:
        done = kept / name
        if done.is_file():
            count = _count_latents(done)
            bar.update(count)
            reused += count
        else:
            shutil.rmtree(work, ignore_errors=True)
            written = write_latent_shards([(name, _encoded(cfg, vae, [url], bar, flip))], work)
            if not written:  # an empty image shard: no latent shard (as without resuming)
                continue
            os.replace(written[0], done)
            count = written.counts[0]
        _link_or_copy(done, dest / name)
        paths.append(dest / name)
        counts.append(count)
    shutil.rmtree(work, ignore_errors=True)
    out = ShardList(paths, counts)
    out.reused = reused  # samples taken from a killed run's shards, not encoded now (for the throughput)
    return out


def _count_latents(path: Path) -> int:
    """Samples in a latent shard: its posterior means (tar headers only; the arrays are not read)."""
    from diffusion.data.latents import MEAN_EXT

    with tarfile.open(path) as tar:
        return sum(m.name.endswith(f".{MEAN_EXT}") for m in tar)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no second copy of the bytes on disk), or a copy where links are not possible (another
    filesystem, or one without them). Safe: nothing writes to a finished shard in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def resume_folder(cfg: EncodeLatentsConfig) -> Path | None:
    """``<checkpoint_dir>/encode_latents-<key>``, where finished latent shards are kept for a rerun of the same
    key; None for re-chunked output (`samples_per_shard` set), which is not resumable (module docstring).

    The key covers everything a shard's bytes depend on: the parameters that are not paths (batch size, device),
    the image shards (their manifest's sha256, or name and size: ``files_fingerprint``), the VAE's files, and the
    code that encodes (this stage, the latent format, the VAE's layers); and `out_dir`, which does not change the
    bytes but keeps the runs of two output folders (a reference run beside a killed one) from sharing shards."""
    if cfg.samples_per_shard is not None:
        return None
    from diffusion import run_keys
    from diffusion.data import latents
    from diffusion.models import layers, vae

    inputs = [url for split in SPLITS for _, url in split_shards(cfg.shards_dir, split)]
    extra = {"data": run_keys.files_fingerprint(inputs), "vae": run_keys.contents_fingerprint([cfg.vae_dir]),
             "code": run_keys.source_fingerprint(__file__, latents.__file__, vae.__file__, layers.__file__),
             "device": _device(cfg).type}  # 'auto' resolved: a GPU's bytes are not the CPU's
    key = run_keys.run_key({**cfg.to_dict(), "out_dir": _as_recorded(cfg.out_dir)},
                           exclude=("shards_dir", "vae_dir", "checkpoint_dir"), extra=extra)
    return Path(cfg.checkpoint_dir) / f"{STAGE}-{key}"


def _latent_shape(folder: Path) -> list[int]:
    from diffusion.data.latents import iter_latents

    first = next(iter_latents(list_shards(folder)), None)
    return list(first["mean"].shape) if first is not None else []


def _as_recorded(path: str) -> str:
    """`path` as the manifest records it: relative to the working folder (the project root under DVC) when it lies
    inside it, normalised, so that ``models/vae``, ``./models/vae/`` and its absolute path give one manifest (a
    different one would be new bytes for DVC to hash, and make every later stage run again)."""
    # abspath, not resolve(): a DVC cache of type symlink makes models/vae a link into .dvc/cache.
    absolute, here = Path(os.path.abspath(path)), Path(os.path.abspath("."))
    return absolute.relative_to(here).as_posix() if absolute.is_relative_to(here) else absolute.as_posix()


def _manifest(
    cfg: EncodeLatentsConfig, written: dict[str, ShardList], tmp: Path, scale: Any, shift: Any
) -> dict[str, Any]:
    """What was written; no timings, so the file is identical on a rerun. ``flip`` (the train split's samples hold
    the mirrored images' posteriors too) only when set, so the manifest of a run without it is as it was."""
    flipped = {"flip": True, "flip_members": [MEAN_FLIP_EXT, LOGVAR_FLIP_EXT]} if cfg.flip else {}
    return {
        "counts": {split: shards.num_samples for split, shards in written.items()},
        "shards": {split: shards.summary()["shards"] for split, shards in written.items()},
        "sha256": {split: shards.digests() for split, shards in written.items()},  # what training runs key on
        "latent_shape": _latent_shape(tmp / "train"),
        "dtype": "float16",
        "members": ["mean.npy", "logvar.npy", "txt", "json"],
        "vae": {
            "dir": _as_recorded(cfg.vae_dir),
            "encoder_sha256": encoder_digest(cfg.vae_dir),  # which VAE made them: the train stage checks it
            # For reference only: the loader takes scale and shift from the VAE itself (pitfall 4).
            "latent_scale": torch.as_tensor(scale).tolist(),
            "latent_shift": torch.as_tensor(shift).tolist(),
        },
        **flipped,
    }


def run(cfg: EncodeLatentsConfig) -> dict[str, Any]:
    """Run the stage; returns the manifest plus ``seconds``, ``samples_per_s`` (of the samples this run encoded)
    and ``reused_samples`` (taken from an interrupted run's shards)."""
    validate(cfg)
    vae, scale, shift = load_frozen_vae(cfg)
    out_dir = Path(cfg.out_dir)
    print(f"encode_latents: {cfg.shards_dir}/{{train,val}} with the VAE in {cfg.vae_dir} "
          f"(device {_device(cfg)}, batch {cfg.batch_size}) -> {out_dir}")
    kept = resume_folder(cfg)
    finished = _finished(kept)
    if finished:
        print(f"encode_latents: resuming: {finished} latent shard(s) that an interrupted run finished are in {kept}")
    try:
        with staged_dir(out_dir) as tmp:  # the finished tree is swapped into place whole (as the shard stage's)
            start, expected = time.perf_counter(), _expected_counts(cfg)
            written = {split: encode_split(cfg, vae, split, tmp / split, expected[split],
                                           None if kept is None else kept / split) for split in SPLITS}
            seconds = time.perf_counter() - start
            manifest = _manifest(cfg, written, tmp, scale, shift)
            atomic_write_json(tmp / "manifest.json", manifest)
    except KeyboardInterrupt:
        if _finished(kept):
            print(f"encode_latents: interrupted; the {_finished(kept)} latent shard(s) finished are kept in {kept}: "
                  "the same command resumes from them", file=sys.stderr)
        raise
    if kept is not None:
        shutil.rmtree(kept, ignore_errors=True)  # the output holds every shard now
    counts, total = manifest["counts"], sum(manifest["counts"].values())
    reused = sum(getattr(shards, "reused", 0) for shards in written.values())
    # The rate of this run's encoding: samples taken from an interrupted run's shards took no VAE time.
    rate = (total - reused) / seconds if seconds > 0 else float("nan")
    note = f"; {reused} taken from an interrupted run's shards" if reused else ""
    print(f"encode_latents: wrote {counts['train']} train and {counts['val']} val latents "
          f"{tuple(manifest['latent_shape'])} float16 to {out_dir}/{{train,val}} in {seconds:.1f} s ({rate:.1f} img/s"
          f"{note})")
    print(f"encode_latents: manifest {out_dir / 'manifest.json'}")
    return {**manifest, "seconds": seconds, "samples_per_s": rate, "reused_samples": reused}


def _finished(kept: Path | None) -> int:
    """The latent shards finished in a resume folder (0 if there is none)."""
    return 0 if kept is None else sum(1 for split in SPLITS for _ in (kept / split).glob("*.tar"))


def main(cfg: EncodeLatentsConfig) -> dict[str, Any]:
    """The DVC stage: validate, then run inside the stage's MLflow run (counts and throughput as metrics)."""
    import mlflow

    from diffusion.tracking import stage_run

    validate(cfg)  # before opening a run: a missing input should not leave an empty run behind
    with stage_run(STAGE, cfg.to_dict()) as active:
        result = run(cfg)
        mlflow.log_metrics({
            "train_samples": result["counts"]["train"],
            "val_samples": result["counts"]["val"],
            "seconds": result["seconds"],
            "samples_per_s": result["samples_per_s"],  # of the samples encoded by this run
            "reused_samples": result["reused_samples"],  # taken from an interrupted run's shards
        })
        mlflow.log_dict({k: v for k, v in result.items() if k not in ("seconds", "samples_per_s", "reused_samples")},
                        "manifest.json")
        print(f"encode_latents: MLflow run {active.info.run_id} in {mlflow.get_tracking_uri()}")
    return result
