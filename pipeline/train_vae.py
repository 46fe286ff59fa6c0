"""Stage `train_vae`: image shards -> the KL autoencoder, with its latent scale and shift.

Reads the `train_vae` section of params.yaml (`diffusion.stage_configs.TrainVAEConfig`) and writes

    <out_dir>/model.pt, <out_dir>/config.json   the VAE, its config, latent_scale and latent_shift
                                                 (diffusion.training.latent_stats; load with load_vae)
    <metrics_path>                               val PSNR/SSIM, final losses, latent scale/shift, steps
    <checkpoint_dir>/train_vae-<key>/            resumable checkpoints (diffusion.training.checkpointing)

and logs to one MLflow run: params, per-step losses, validation metrics, reconstruction grids, the final
metrics. Killed and rerun with the same parameters, data and code, it resumes from its last checkpoint in
the same MLflow run; with anything changed, it starts afresh. Deterministic for a given seed on the CPU.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffusion.atomic import atomic_write_json, check_replaceable
from diffusion.config import ConfigError
from diffusion.data.locations import read_manifest, require_split
from diffusion.run_keys import DEFAULT_EXCLUDE
from diffusion.stage_configs import TrainVAEConfig
from diffusion.training.latent_stats import CONFIG_FILE, WEIGHTS_FILE

STAGE = "train_vae"
#: Fields that change where outputs go or how much is evaluated, not the trained weights (run key).
#: Shard and tokenizer *paths* are excluded too: the data itself is fingerprinted instead.
EXCLUDE = (*DEFAULT_EXCLUDE, "shards_dir", "tokenizer_path", "out_dir", "metrics_path", "val_batches",
           "grid_images", "scale_batches")


class TrainVAEError(RuntimeError):
    """An input of the stage is missing (shards, tokenizer); nothing was written."""


def validate(cfg: TrainVAEConfig) -> tuple[list[str], list[str]]:
    """Checks that need the inputs, before any work. Returns the (train, val) shard paths."""
    urls = {}
    for split in ("train", "val"):
        urls[split] = require_split(cfg.shards_dir, split, "train_vae.shards_dir", "shard", TrainVAEError,
                                    f"{split} shards")
    if not Path(cfg.tokenizer_path).is_file():
        raise TrainVAEError(f"train_vae.tokenizer_path: {cfg.tokenizer_path} not found; run `python cli.py shard` first")
    # save_vae replaces the whole folder: pointed at data/ it would have deleted the shards after training.
    check_replaceable(cfg.out_dir, (WEIGHTS_FILE, CONFIG_FILE), "train_vae.out_dir")
    _check_resolution(cfg, read_manifest(cfg.shards_dir))
    return urls["train"], urls["val"]


def _check_resolution(cfg: TrainVAEConfig, manifest: dict[str, Any] | None) -> None:
    try:
        resolution = int(manifest["resolution"])
    except (KeyError, TypeError, ValueError):
        return  # shards made elsewhere: the VAE's own check reports a size it cannot take
    factor = cfg.model.downsample_factor
    if resolution % factor:
        raise ConfigError(
            f"train_vae.model.channel_mult: downsampling factor {factor} does not divide the shards' "
            f"resolution {resolution}"
        )
    from diffusion.training.discriminator import NLayerDiscriminator

    d = cfg.discriminator
    if d.enabled and resolution < NLayerDiscriminator.min_size(d.num_layers):
        raise ConfigError(
            f"train_vae.discriminator.num_layers: {d.num_layers} layers need images of at least "
            f"{NLayerDiscriminator.min_size(d.num_layers)} px, the shards have {resolution}"
        )


def image_batches(urls: list[str], batch_size: int, max_batches: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Up to `max_batches` batches ``{"image": (B, 3, H, W)}`` (the last may be short) of a seeded, uniform choice
    of the split's images (all if fewer), in shard order: ``data.in_memory.load_split``, held as uint8 and made
    float a batch at a time. Not the first images: shards are in key order, class order for class folders, so
    the validation and the latent scale would see the first classes only."""
    from diffusion.data.in_memory import load_split

    chosen = load_split(urls, limit=batch_size * max_batches, require_attributes=False, seed=seed)
    for images in chosen.images.split(batch_size):
        yield {"image": images.float().div(127.5).sub(1.0)}  # the loader's range, [-1, 1]


def _fingerprints(train: list[str], val: list[str]) -> dict[str, str]:
    """The data and the code that shape the weights (part of the run key: see checkpointing)."""
    import diffusion.data.loader as loader
    import diffusion.data.shard_reading as reading
    import diffusion.models.layers as layers
    import diffusion.models.vae as vae
    import diffusion.training.discriminator as discriminator
    import diffusion.training.exact_resume as resume
    import diffusion.training.nonfinite as nonfinite
    import diffusion.training.optim as optim
    import diffusion.training.trainer as trainer
    import diffusion.training.vae_system as system
    from diffusion.run_keys import files_fingerprint, source_fingerprint

    # trainer: precision ("auto"), clipping, accumulation; nonfinite: when a run stops. (The latent statistics
    # are measured after training, by every execution, so latent_stats is not part of it.)
    code = [m.__file__ for m in (vae, layers, system, discriminator, optim, loader, reading, resume, trainer, nonfinite)]
    code.append(__file__)
    return {"data": files_fingerprint(train + val), "code": source_fingerprint(*code)}


def _fit(cfg: TrainVAEConfig, run: Any, train_urls: list[str], val_batches: Any) -> Any:
    """Build loader, system and Trainer; train (resuming if a checkpoint exists). Returns (trainer, system)."""
    from diffusion.data.loader import make_loader
    from diffusion.data.tokenizer import load_tokenizer
    from diffusion.training import checkpointing as ckpt
    from diffusion.training.exact_resume import ExactResume, run_identity
    from diffusion.training.nonfinite import NonFiniteLossCheck
    from diffusion.training.trainer import build_trainer
    from diffusion.training.vae_system import ReconstructionGrid, VAESystem

    loader = make_loader(
        train_urls, load_tokenizer(cfg.tokenizer_path), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        # One loader epoch per checkpoint interval: each starts a freshly seeded pass (ExactResume).
        shuffle_buffer=cfg.shuffle_buffer, epoch_steps=cfg.checkpoint_every_n_steps * cfg.accumulate_grad_batches,
        seed=cfg.seed,
    )
    system = VAESystem(cfg)
    callbacks = [
        NonFiniteLossCheck(cfg.log_every_n_steps),
        ExactResume(loader, cfg.seed, cfg.checkpoint_every_n_steps, run_identity(run.point.key, cfg)),
        ReconstructionGrid(min(cfg.grid_images, cfg.batch_size)),
        ckpt.checkpoint_callback(run.point.dir, cfg.checkpoint_every_n_steps),
    ]
    trainer = build_trainer(
        cfg, callbacks=callbacks, logger=run.logger, manual_optimization=cfg.discriminator.enabled,
        default_root_dir=run.point.dir,
    )
    if run.point.resuming and run.run_id is not None:  # once, not once per DDP rank
        print(f"train_vae: resuming from {run.point.ckpt_path}")
    trainer.fit(system, loader, val_batches, ckpt_path=run.point.ckpt_path)
    return trainer, system


def _export(cfg: TrainVAEConfig, run: Any, trainer: Any, system: Any, train_urls: list[str],
            logged: dict[str, float]) -> dict[str, Any]:
    """Measure the latent scale, write models/vae and the metrics file, log the metrics. Rank 0 only."""
    import mlflow

    from diffusion.training.latent_stats import measure_latent_stats, save_vae, stats_dict

    generator = torch.Generator().manual_seed(cfg.seed)  # posterior noise on the CPU: the same on any device
    device = "cuda" if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda") else "cpu"
    batches = image_batches(train_urls, cfg.batch_size, cfg.scale_batches, cfg.seed)
    stats = measure_latent_stats(system.vae.to(device), batches, cfg.scale_batches, generator=generator)
    # Nothing run-specific (no MLflow run id) in the artifact: a rerun writes identical bytes.
    save_vae(system.vae, stats, cfg.out_dir, extra={"stage": STAGE, "steps": trainer.global_step,
                                                     "run_key": run.point.key})
    metrics = {
        **{k.replace("/", "_"): v for k, v in logged.items() if k.startswith(("train/", "val/"))},
        **stats_dict(stats),
        "steps": trainer.global_step,
    }
    Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.metrics_path, metrics)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)
    mlflow.log_dict(json.loads((Path(cfg.out_dir) / "config.json").read_text()), "vae/config.json")
    return metrics


def main(cfg: TrainVAEConfig) -> dict[str, Any] | None:
    """The DVC stage. Returns the metrics (None on DDP ranks other than 0, which only train)."""
    import pytorch_lightning as pl

    from diffusion.tracking import tracking_uri
    from diffusion.training.checkpointing import print_rank_report, resumable_stage_run
    from diffusion.training.step_means import step_means
    from diffusion.training.trainer import check_hardware

    check_hardware(cfg, STAGE)  # before validate: reading the shards takes longer
    train_urls, val_urls = validate(cfg)
    # Lightning's own warning for manual optimization checkpoints concerns its test fixture, not us.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # Read once, kept in memory (small); batch_size=None: the DataLoader yields the prepared batches as they
    # are (a bare list would be taken for a list of dataloaders).
    # Its own generator: a DataLoader draws each iterator's base seed from the global generator otherwise, so
    # every validation would shift the training noise that follows (and val_every_n_steps change the weights).
    val_batches = torch.utils.data.DataLoader(list(image_batches(val_urls, cfg.batch_size, cfg.val_batches, cfg.seed)),
                                              batch_size=None, generator=torch.Generator().manual_seed(cfg.seed))
    extra = _fingerprints(train_urls, val_urls)
    with resumable_stage_run(STAGE, cfg.to_dict(), cfg.checkpoint_dir, exclude=EXCLUDE, extra=extra) as run:
        if run.run_id is not None:  # once, not once per DDP rank
            print(f"train_vae: {cfg.max_steps} steps, batch {cfg.batch_size} per process, checkpoints in {run.point.dir}")
        trainer, system = _fit(cfg, run, train_urls, val_batches)
        # The last logging window's training losses (means over its steps and the ranks; restored from the
        # checkpoint if the run had already finished), then a final validation, unless the fit validated after its
        # last step: validation is deterministic (the posterior mean), so that one's figures are the final ones,
        # and running it again logged them twice.
        logged = {f"train/{k}": v for k, v in step_means(trainer).last.items()}
        if system.validated_at == trainer.global_step:
            logged |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        else:
            logged |= {k: float(v) for k, v in trainer.validate(system, val_batches, verbose=False)[0].items()}
        print_rank_report(STAGE, trainer, system)  # as the train stage: equal on every rank
        if not trainer.is_global_zero:
            return None
        metrics = _export(cfg, run, trainer, system, train_urls, logged)
        print(f"train_vae: val PSNR {metrics.get('val_psnr', float('nan')):.2f} dB, "
              f"SSIM {metrics.get('val_ssim', float('nan')):.4f} after {metrics['steps']} steps")
        print(f"train_vae: VAE -> {cfg.out_dir} (latent_scale {metrics['latent_scale']:.5g}, "
              f"latent_shift {metrics['latent_shift']:.5g}); metrics -> {cfg.metrics_path}")
        print(f"train_vae: MLflow run {run.run_id} at {tracking_uri()}")
    return metrics
