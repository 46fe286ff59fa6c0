"""The train stage's checks of its inputs, made before any work: before the model is built and the MLflow run
opens, a missing or mismatched input stops the stage with a message naming the key to fix, and nothing is written.
Kept out of ``pipeline/train.py`` so that the stage script reads as the run it makes.

Checked here: the latent shards (train, and val for the validation loss), the tokenizer, the VAE and that it is
the one that encoded the latents (with their mirrored images for train.random_flip), a latent size the denoiser can
take, and an out_dir holding only what the stage writes. The validation loss's fixed samples are read here too
(:func:`read_val_set`), so that a val split without a sample stops the stage as early. ``train.replay``'s shards
and ``train.init_from``'s model are checked by training/replay.py and training/init_from.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from diffusion.atomic import check_replaceable
from diffusion.config import ConfigError
from diffusion.data.locations import read_manifest, require_split
from diffusion.stage_configs import TrainConfig

#: What the stage writes in out_dir (anything else there stops it: check_replaceable).
MODEL_ENTRIES = ("config.json", "model.pt", "tokenizer.json", "train_config.json", "lora.pt")


class TrainError(RuntimeError):
    """An input of the stage is missing; nothing was written."""


def validate(cfg: TrainConfig) -> tuple[list[str], list[str], list[int] | None]:
    """Checks that need the inputs, before any work. Returns the train and val latent shards (no val shards when
    train.val_batches is 0) and the latents' shape [C, h, w] from their manifest (None if it does not say)."""
    urls = require_split(cfg.latents_dir, "train", "train.latents_dir", "encode_latents", TrainError, "latent shards")
    check_replaceable(cfg.out_dir, MODEL_ENTRIES, "train.out_dir")
    if not Path(cfg.tokenizer_path).is_file():
        raise TrainError(f"train.tokenizer_path: {cfg.tokenizer_path} not found; run `python cli.py shard` first")
    from diffusion.training.latent_stats import vae_problem

    if problem := vae_problem(cfg.vae_dir):
        raise TrainError(f"train.vae_dir: {problem}; run `python cli.py train-vae` first")
    manifest = read_manifest(cfg.latents_dir) or {}
    _check_latents_vae(cfg, manifest)
    if cfg.random_flip and not manifest.get("flip"):
        raise TrainError(f"train.random_flip: the latents in {cfg.latents_dir} hold no mirrored images; encode them "
                         "with encode_latents.flip: true first (`dvc repro` with it set), or set train.random_flip false")
    val_urls = _val_urls(cfg, manifest)
    shape = manifest.get("latent_shape")  # [C, h, w], from encode_latents
    denoiser = cfg.denoiser_config()
    multiple = getattr(denoiser, "downsample_factor", getattr(denoiser, "patch_size", 1))
    if shape and any(side % multiple for side in shape[1:]):
        # Found here rather than at the first step, inside Lightning, with the MLflow run already open.
        what = "dit.patch_size" if cfg.denoising_type == "dit" else "unet.channel_mult (2 ** (levels - 1))"
        raise ConfigError(f"train.{what}: the {cfg.denoising_type} needs latent sides divisible by {multiple}, and "
                          f"the latents in {cfg.latents_dir} are {shape[1]}x{shape[2]}; use a shard.resolution that "
                          f"is a multiple of {multiple} times the VAE's factor, or another {what.split(' ')[0]}")
    return urls, val_urls, shape


def _val_urls(cfg: TrainConfig, manifest: dict[str, Any]) -> list[str]:
    """The val latent shards the validation loss needs (none with train.val_batches 0), counted by the manifest
    where there is one: no val split, or an empty one, stops the stage here. Latents without a manifest are counted
    when the set is read, still before the run opens (:func:`read_val_set`)."""
    if not cfg.val_batches:
        return []
    try:
        urls = require_split(cfg.latents_dir, "val", "train.val_batches", "encode_latents", TrainError,
                             "val latent shards", allow_empty=True)
    except TrainError as e:
        raise TrainError(f"{e}; or set train.val_batches: 0 to train without a validation loss") from e
    count = (manifest.get("counts") or {}).get("val")
    if not urls or count == 0:
        raise TrainError(_no_val(cfg))
    return urls


def _no_val(cfg: TrainConfig) -> str:
    return (f"train.val_batches: {cfg.val_batches} batches of held-out latents asked for, and {cfg.latents_dir}/val "
            "holds none; hold images out (shard.val_fraction, or a val folder) and rerun shard and encode_latents, or "
            "set train.val_batches: 0 to train without a validation loss")


def read_val_set(cfg: TrainConfig, urls: list[str], val_urls: list[str]) -> Any:
    """The validation loss's fixed samples (training/val_loss.py), read before the run opens; None without. A val
    split smaller than one batch (a small folder of the user's, 5% held out) is used whole, with a warning: a noisy
    estimate is still the only held-out one."""
    if not cfg.val_batches:
        return None
    from diffusion.data.tokenizer import load_tokenizer
    from diffusion.training.latent_stats import read_vae_config
    from diffusion.training.val_loss import prepare_val_set

    vae = read_vae_config(cfg.vae_dir)  # the scale and shift build_model gives the model and the loader
    try:
        found = prepare_val_set(val_urls, urls, load_tokenizer(cfg.tokenizer_path), batch_size=cfg.batch_size,
                                batches=cfg.val_batches, latent_scale=float(vae["latent_scale"]),
                                latent_shift=float(vae["latent_shift"]), num_timesteps=cfg.scheduler.num_timesteps,
                                seed=cfg.seed)
    except ValueError as e:  # shards without a sample (latents made elsewhere, no manifest to count them)
        raise TrainError(_no_val(cfg)) from e
    if len(found) < cfg.batch_size:
        warnings.warn(f"train.val_batches: {cfg.latents_dir}/val holds {len(found)} latents, less than one batch of "
                      f"{cfg.batch_size}: the validation loss is measured on all of them, a noisier estimate (hold "
                      "more images out with shard.val_fraction for a steadier one)", UserWarning, stacklevel=2)
    return found


def _check_latents_vae(cfg: TrainConfig, manifest: dict[str, Any]) -> None:
    """The latents must come from the VAE the model is packaged with (``latent_stats.encoded_elsewhere``). Run stage
    by stage (`cli.py train-vae` again, then `cli.py train`), nothing else notices: DVC would rerun encode_latents."""
    from diffusion.training.latent_stats import encoded_elsewhere

    if detail := encoded_elsewhere(manifest, cfg.vae_dir):
        raise TrainError(f"train.vae_dir: the latents in {cfg.latents_dir} were encoded by another VAE than the one in "
                         f"{cfg.vae_dir} ({detail}); a denoiser trained on them would draw through the wrong decoder. "
                         "Rerun `python cli.py encode-latents` with this VAE, or set train.vae_dir to the VAE that "
                         "encoded them")
