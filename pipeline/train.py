"""Stage `train`: latent shards -> the text encoder and the U-Net or DiT, with EMA, resumable.

Reads the `train` section of params.yaml (`diffusion.stage_configs.TrainConfig`), the tokenizer (from `shard`),
the VAE and its latent scale/shift (from `train_vae`) and the latent shards (from `encode_latents`), and, to
fine-tune, a trained model whose text encoder and denoiser it starts from (`train.init_from`: training/init_from.py),
and writes

    <out_dir>/config.json, model.pt, tokenizer.json   the EMA weights, the config that built them, the
                                                      tokenizer: all that sampling needs (load with
                                                      LatentDiffusionModel.from_pretrained)
    <metrics_path>                                    final figures for `dvc metrics show`
    <loss_curve_path>                                 (step, loss) for `dvc plots show`
    <val_curve_path>                                  the EMA weights' held-out and seen loss at each validation
                                                      (step, loss, seen_loss, loss_t...; training/val_loss.py)
    <checkpoint_dir>/train-<key>/                     resumable checkpoints (training/checkpointing.py)

and logs to one MLflow run: params, the loss per step, the validation loss every val_every_n_steps
(`val/loss`, `val/seen_loss`, `val/loss_t...`; train.val_batches, 0 for none), sample grids for fixed prompts (EMA
weights: both), the final metrics. Killed and rerun with the same parameters, data and code, it resumes from its last
checkpoint (step, optimizer, EMA) in the same MLflow run; with anything changed, it starts afresh.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from diffusion.atomic import atomic_write_json, staged_dir
from diffusion.run_keys import DEFAULT_EXCLUDE
from diffusion.stage_configs import TrainConfig
from diffusion.training import init_from
from diffusion.training.replay import replay_urls
from diffusion.training.train_inputs import TrainError, read_val_set, validate

STAGE = "train"
#: Fields that do not change the trained weights (paths: the data, the VAE, the tokenizer and the init_from weights
#: are fingerprinted by content; the sample grids and the validation only look at the model: tests/test_val_loss.py
#: checks the weights are the same to the bit with and without validation). Not `compile`: Inductor's kernels round
#: differently from eager ones, so a run resumed with the other setting would end with weights neither gives.
EXCLUDE = (*DEFAULT_EXCLUDE, "latents_dir", "replay.latents_dir", "tokenizer_path", "vae_dir", "init_from", "out_dir",
           "metrics_path", "loss_curve_path", "val_curve_path", "val_batches", "sample_every_n_steps", "sample_prompts",
           "sample_sampler", "sample_steps", "sample_guidance")


def resolve_derived(cfg: TrainConfig, latent_shape: list[int] | None) -> TrainConfig:
    """`cfg` with the fields that follow from the stage's inputs set to what builds the network, so that MLflow
    logs, and the run key hashes, what trains: the text encoder's vocabulary, length and padding id from the
    tokenizer; the denoiser's channels from the VAE, its context width from the text encoder, and the DiT's
    nominal input_size from the latents. A value given for one of them that says otherwise is refused, naming
    the key, before the run opens (the model refused it at build time, with the run open and a checkpoint
    folder made); a field left at its default takes the derived value."""
    from diffusion.data.tokenizer import PAD_ID, load_tokenizer, max_length_of
    from diffusion.models.registry import resolve_config
    from diffusion.training.latent_stats import read_vae_config

    tokenizer = load_tokenizer(cfg.tokenizer_path)
    latent_dim = int(read_vae_config(cfg.vae_dir)["vae"]["latent_dim"])
    text = resolve_config(type(cfg.text_encoder), cfg.text_encoder, {
        "vocab_size": (tokenizer.get_vocab_size(), f"the vocabulary of {cfg.tokenizer_path}"),
        "max_length": (max_length_of(tokenizer), f"the length {cfg.tokenizer_path} pads to"),
        "pad_token_id": (PAD_ID, "the id the tokenizer pads with"),
    }, "train.text_encoder")
    denoiser = cfg.denoiser_config()
    forced = {"in_channels": (latent_dim, f"the latent_dim of the VAE in {cfg.vae_dir}"),
              "context_dim": (text.width, "train.text_encoder.width")}
    if "out_channels" in denoiser.to_dict():  # the U-Net's; the DiT's follows from in_channels
        forced["out_channels"] = forced["in_channels"]
    if "input_size" in denoiser.to_dict() and latent_shape and latent_shape[1] == latent_shape[2]:
        forced["input_size"] = (int(latent_shape[1]), f"the side of the latents in {cfg.latents_dir}")
    denoiser = resolve_config(type(denoiser), denoiser, forced, f"train.{cfg.denoising_type}")
    return cfg.replace(text_encoder=text.to_dict(), **{cfg.denoising_type: denoiser.to_dict()})


def run_params(cfg: TrainConfig) -> dict[str, Any]:
    """What MLflow logs and the run key hashes: the section but the denoiser section it does not build, whose derived
    fields nothing resolved (MLflow's Compare showed a DiT run's unet.in_channels 4 against a U-Net run's 8)."""
    unbuilt = {"unet", "dit"} - {cfg.denoising_type}
    return {key: value for key, value in cfg.to_dict().items() if key not in unbuilt}


def build_model(cfg: TrainConfig) -> Any:
    """The LatentDiffusionModel: the trained VAE (frozen) with a fresh text encoder and denoiser, sized by `cfg`
    as :func:`resolve_derived` left it (vocabulary and length from the tokenizer, channels from the VAE)."""
    from diffusion.models import LatentDiffusionModel
    from diffusion.training.latent_stats import load_vae

    vae, scale, shift = load_vae(cfg.vae_dir)
    model = LatentDiffusionModel(
        vocab_size=cfg.text_encoder.vocab_size, denoising_type=cfg.denoising_type, text_encoder=cfg.text_encoder,
        vae=vae.cfg, denoiser=cfg.denoiser_config(), latent_scale=scale, latent_shift=shift,
    )
    model.vae.load_state_dict(vae.state_dict())
    if cfg.init_from is not None:  # fine-tuning: the text encoder and denoiser start from a trained model's
        init_from.start_from(model, cfg)  # (frozen, with LoRA adapters, under train.lora)
    return model


def _fingerprints(cfg: TrainConfig, urls: list[str]) -> dict[str, str]:
    """The data, the VAE and tokenizer, and the code that shape the weights (part of the run key: see
    checkpointing). The VAE and the tokenizer by content: a retrained VAE writes latents of the same size."""
    import diffusion.data.latents as latents
    import diffusion.data.loader as loader
    import diffusion.data.shard_reading as reading
    import diffusion.data.tokenizer as tokenizer
    import diffusion.models as models
    import diffusion.scheduler as scheduler
    import diffusion.training.callbacks as callbacks
    import diffusion.training.diffusion_system as system
    import diffusion.training.exact_resume as resume
    import diffusion.training.nonfinite as nonfinite
    import diffusion.training.optim as optim
    import diffusion.training.trainer as trainer
    from diffusion.run_keys import contents_fingerprint, files_fingerprint, source_fingerprint

    # trainer: precision ("auto"), clipping, accumulation; nonfinite: when a run stops; init: fine-tuning's start.
    modules = (latents, loader, reading, tokenizer, scheduler, system, optim, callbacks, resume, trainer, nonfinite,
               init_from)
    code = [Path(models.__file__).parent, *(m.__file__ for m in modules), __file__]
    # The weights fine-tuning starts from by content too (a folder trained further keeps its path).
    inputs = [cfg.vae_dir, cfg.tokenizer_path, *([cfg.init_from] if cfg.init_from is not None else [])]
    return {"data": files_fingerprint(urls), "inputs": contents_fingerprint(inputs), "code": source_fingerprint(*code)}


def _callbacks(cfg: TrainConfig, run: Any, loader: Any, scheduler: Any, tokenizer: Any, side: int,
               val_set: Any) -> list:
    from diffusion.data.tokenizer import encode
    from diffusion.training import checkpointing as ckpt
    from diffusion.training.exact_resume import ExactResume, run_identity
    from diffusion.training.callbacks import EMA, SampleGrid
    from diffusion.training.nonfinite import NonFiniteLossCheck
    from diffusion.training.val_loss import ValLoss

    prompts = encode(tokenizer, list(cfg.sample_prompts)) if cfg.sample_prompts else None
    return [
        NonFiniteLossCheck(cfg.log_every_n_steps),
        ExactResume(loader, cfg.seed, cfg.checkpoint_every_n_steps, run_identity(run.point.key, cfg)),
        # EMA once per optimizer step, saved in and restored from the checkpoint (pitfall 8).
        EMA(decay=cfg.ema_decay, warmup=cfg.ema_warmup),
        # After the EMA (it reads the average of the same step), before the checkpoint (Lightning puts it last).
        *([ValLoss(val_set, cfg.val_every_n_steps)] if val_set is not None else []),
        SampleGrid(prompts, scheduler, side, cfg.sample_every_n_steps if prompts is not None else 0,
                   sampler=cfg.sample_sampler, num_steps=cfg.sample_steps, guidance=cfg.sample_guidance,
                   final_step=cfg.max_steps),  # that step's grid is drawn once, as samples/final.png (_finish)
        ckpt.checkpoint_callback(run.point.dir, cfg.checkpoint_every_n_steps),
    ]


def _fit(cfg: TrainConfig, run: Any, urls: list[str], val_set: Any, replay: list[str]) -> tuple[Any, Any, Any]:
    """Build tokenizer, model, loader, system and Trainer; train (resuming). Returns (trainer, system, grid)."""
    from diffusion.data.latents import iter_latents, make_latent_loader
    from diffusion.data.tokenizer import load_tokenizer
    from diffusion.scheduler import DDPMScheduler
    from diffusion.training.callbacks import SampleGrid
    from diffusion.training.diffusion_system import DiffusionSystem, OptimSettings
    from diffusion.training.trainer import build_trainer

    tokenizer = load_tokenizer(cfg.tokenizer_path)
    model = build_model(cfg)
    if cfg.lora.rank and run.run_id is not None:  # once, not once per DDP rank
        print(f"train: {init_from.lora_summary(model)}")
    scheduler = DDPMScheduler.from_config(cfg.scheduler)
    loader = make_latent_loader(
        urls, tokenizer, batch_size=cfg.batch_size, latent_scale=model.latent_scale, latent_shift=model.latent_shift,
        num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
        # One loader epoch per checkpoint interval: each starts a freshly seeded pass (ExactResume).
        epoch_steps=cfg.checkpoint_every_n_steps * cfg.accumulate_grad_batches, caption_dropout=cfg.caption_dropout,
        pin_memory=torch.cuda.is_available(), replay_urls=replay, replay_fraction=cfg.replay.fraction,
        random_flip=cfg.random_flip, flip_swaps=cfg.flip_swaps,
    )
    side = next(iter_latents(urls[:1]))["mean"].shape[-1] * model.vae.downsample_factor  # the images' side
    optim = OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                          warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, lr_schedule=cfg.lr_schedule,
                          min_lr_ratio=cfg.min_lr_ratio, min_snr_gamma=cfg.min_snr_gamma, min_snr_on=cfg.min_snr_on,
                          noise_offset=cfg.noise_offset, input_perturbation=cfg.input_perturbation)
    system = DiffusionSystem(model, scheduler, optim, compile_denoiser=cfg.compile)
    callbacks = _callbacks(cfg, run, loader, scheduler, tokenizer, side, val_set)
    # No Lightning validation loop: the validation loss is a callback at the optimizer step (val_loss.ValLoss).
    trainer = build_trainer(cfg, callbacks=callbacks, logger=run.logger, default_root_dir=run.point.dir,
                            loss_curve=cfg.loss_curve_path, limit_val_batches=0)
    if run.point.resuming and run.run_id is not None:  # once, not once per DDP rank
        print(f"train: resuming from {run.point.ckpt_path}")
    trainer.fit(system, loader, ckpt_path=run.point.ckpt_path)
    grid = next(cb for cb in callbacks if isinstance(cb, SampleGrid))
    return trainer, system, grid


def export(cfg: TrainConfig, model: Any, image_size: int, adapted: Any = None) -> Path:
    """Write the EMA model, its config, the tokenizer and the training resolution to out_dir, atomically
    (a temporary folder that replaces the old one when complete); under train.lora also the adapters of `adapted`,
    the EMA model before the merge, as lora.pt."""
    with staged_dir(cfg.out_dir) as tmp:
        model.save_pretrained(tmp)
        init_from.save_adapters(adapted, tmp, cfg)
        shutil.copyfile(cfg.tokenizer_path, tmp / "tokenizer.json")
        # The train section that made it (its scheduler is the sampling schedule) and the image side the
        # latents decode to, the default size for sampling.
        atomic_write_json(tmp / "train_config.json", {**cfg.to_dict(), "image_size": image_size})
    return Path(cfg.out_dir)


def _finish(cfg: TrainConfig, run: Any, trainer: Any, system: Any, grid: Any, seconds: float) -> dict[str, Any]:
    """Export the EMA weights, write the metrics and the loss curve, log them. Rank 0 only."""
    import mlflow

    from diffusion.tracking import is_finite_number
    from diffusion.training.callbacks import ema_model
    from diffusion.training.step_means import step_means
    from diffusion.training.val_loss import ValLoss

    # Under train.lora, with the adapters merged into their layers: an ordinary model (models/lora.py).
    ema = system.restore_frozen_vae(ema_model(trainer, system))
    model = init_from.exported_model(ema, cfg.lora)
    export(cfg, model, grid.image_size, ema)
    curve = step_means(trainer)
    curve.write()
    final_loss = curve.recent_loss(10)  # the mean over the last 10 windows' steps
    val = next((cb for cb in trainer.callbacks if isinstance(cb, ValLoss)), None)  # None: train.val_batches 0
    if val is not None and val.points and val.last_samples not in (None, len(val.val_set)):
        # A finished run rerun with another val_batches: its last figures are another set's (val_samples would not
        # count the latents they measured); measured again on this one below.
        val.points.pop()
    if val is not None and (not val.points or val.points[-1][0] != trainer.global_step):
        # A finished run rerun with validation newly asked for resumes its last checkpoint and trains no step.
        val.validate(trainer, system)
    metrics = {
        "steps": trainer.global_step,
        "final_loss": final_loss if final_loss is not None else float("nan"),
        # The last validation's (the one after the last step), as in MLflow's val/loss, val/seen_loss, val/loss_t...,
        # and the held-out latents it measured (as many seen ones): val_batches * batch_size, or a smaller split whole.
        **({**{f"val_{k}": v for k, v in val.last.items()}, "val_samples": len(val.val_set)}
           if val is not None else {}),
        "train_seconds": round(seconds, 1),  # over every execution of this run (ExactResume.train_seconds)
        "parameters_denoiser": sum(p.numel() for p in model.denoiser.parameters()),
        "parameters_text_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
        "parameters_trained": sum(p.numel() for p in system.trainable_parameters()),  # fewer with train.lora
    }
    # A loss that is not a finite number is left out: JSON has no NaN.
    metrics = {k: v for k, v in metrics.items() if is_finite_number(v)}
    Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.metrics_path, metrics)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)
    mlflow.log_artifact(cfg.loss_curve_path, "plots")
    if val is not None:
        val.write(cfg.val_curve_path)
        mlflow.log_artifact(cfg.val_curve_path, "plots")
    else:
        # A declared DVC output: DVC fails a stage that does not write one, and a previous run's curve must not stay
        # beside this run's model. Without validation it holds the header only.
        from diffusion.atomic import atomic_write_text

        atomic_write_text(cfg.val_curve_path, "step,loss,seen_loss\n")
    mlflow.log_dict(model.config, "model/config.json")
    if cfg.lora.rank:  # the adapters alone, small: runs:/<id>/model/lora.pt for sample --lora
        mlflow.log_artifact(str(Path(cfg.out_dir) / "lora.pt"), "model")
    if grid.tokens is not None:  # every run's last grid has this name (no step_<max_steps>.png): runs compare by it
        mlflow.log_image(grid.render(model), "samples/final.png")
    return metrics


def main(cfg: TrainConfig) -> dict[str, Any] | None:
    """The DVC stage. Returns the metrics (None on DDP ranks other than 0, which only train)."""
    import pytorch_lightning as pl

    from diffusion.tracking import tracking_uri
    from diffusion.training.checkpointing import print_rank_report, resumable_stage_run
    from diffusion.training.exact_resume import ExactResume
    from diffusion.training.trainer import check_hardware

    check_hardware(cfg, STAGE)  # before validate: reading the shards takes longer
    urls, val_urls, latent_shape = validate(cfg)
    replay = replay_urls(cfg, latent_shape, TrainError)  # train.replay's shards, checked ([] without)
    cfg = resolve_derived(cfg, latent_shape)
    if cfg.init_from is not None:  # fine-tuning: the model's tokenizer, VAE and architecture, or stop here
        init_from.check_init(cfg, urls)
    val_set = read_val_set(cfg, urls, val_urls)  # every rank, before the run opens (no val latents stop it here)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with resumable_stage_run(STAGE, run_params(cfg), cfg.checkpoint_dir, exclude=EXCLUDE,
                             extra=_fingerprints(cfg, urls + replay)) as run:
        if run.run_id is not None:  # once, not once per DDP rank
            print(f"train: {cfg.denoising_type}, {cfg.max_steps} steps, batch {cfg.batch_size} per process"
                  f"{f' x {cfg.accumulate_grad_batches} accumulated' if cfg.accumulate_grad_batches > 1 else ''}, "
                  f"checkpoints in {run.point.dir}")
            if cfg.init_from is not None and not run.point.resuming:
                print(f"train: fine-tuning, from the text encoder and {cfg.denoising_type} of {cfg.init_from}")
            if replay:
                print(f"train: {cfg.replay.fraction:.0%} of the samples from {cfg.replay.latents_dir} (train.replay)")
        trainer, system, grid = _fit(cfg, run, urls, val_set, replay)
        # Every rank says how far it got and a digest of its weights: under DDP both must be equal on every rank,
        # on one machine or several (checkpointing.rank_report). Of the EMA weights, the ones exported: the live
        # module holds them only after Lightning's end-of-training copy, which a rerun of a finished run skips.
        from diffusion.training.callbacks import ema_model

        print_rank_report(STAGE, trainer, ema_model(trainer, system))
        if not trainer.is_global_zero:
            return None
        clock = next(cb for cb in trainer.callbacks if isinstance(cb, ExactResume))
        metrics = _finish(cfg, run, trainer, system, grid, clock.train_seconds)
        held_out = (f"; val loss {metrics['val_loss']:.4f} held out, {metrics['val_seen_loss']:.4f} seen (EMA)"
                    if "val_loss" in metrics and "val_seen_loss" in metrics else "")
        print(f"train: final loss {metrics.get('final_loss', float('nan')):.4f} after {metrics['steps']} steps "
              f"({metrics['train_seconds']:.0f} s){held_out}")
        print(f"train: EMA model -> {cfg.out_dir}{' (adapters alone: lora.pt)' if cfg.lora.rank else ''}; metrics -> "
              f"{cfg.metrics_path}; loss curve -> {cfg.loss_curve_path}"
              f"{f'; val curve -> {cfg.val_curve_path}' if cfg.val_batches else ''}")
        print(f"train: MLflow run {run.run_id} at {tracking_uri()}")
    return metrics
